"""The text DataModules' shared machinery (`TextDataModule`) and supervised fine-tuning (`SFTDataModule`)."""

from __future__ import annotations

import abc
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tokensel.errors import ConfigError
from tokensel.offline import EMBEDDED_SFT
from tokensel.trainer.data.formats import ROLES, SFT_FORMATS, TRAIN_ON, _read_template, parse_sft_row, tokenize_chat
from tokensel.trainer.data.packing import PackedDataset, packed_collate, pad_collate
from tokensel.trainer.data.sampler import ResumableSampler
from tokensel.trainer.data.sources import _collect


class TokenizedDataset(Dataset):
    """A list of tokenized samples (`datasets.Dataset` underneath for memory-mapped storage)."""

    def __init__(self, samples: list[dict]):
        import datasets

        self.ds = datasets.Dataset.from_list(samples)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]



class TextDataModule(LightningDataModule, abc.ABC):
    """Shared machinery: tokenizer from the model (or `tokenizer`), split, resumable loaders."""

    def __init__(self, tokenizer: str | None = None, max_length: int = 512, batch_size: int = 4,
                 val_fraction: float = 0.05, val_files: list[str] | None = None, num_workers: int = 0,
                 on_bad_row: Literal["error", "skip"] = "error", shuffle: bool = True, seed: int = 0,
                 max_samples: int | None = None, reference_fraction: float = 0.0,
                 split_part: Literal["main", "reference"] = "main") -> None:
        super().__init__()
        if on_bad_row not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_row={on_bad_row!r}: use 'error' or 'skip'")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction={val_fraction}: must lie in [0, 1)")
        if not 0.0 <= reference_fraction < 1.0:
            raise ConfigError(f"data.reference_fraction={reference_fraction}: must lie in [0, 1)")
        if split_part not in ("main", "reference"):
            raise ConfigError(f"data.split_part={split_part!r}: use 'main' or 'reference'")
        if split_part == "reference" and reference_fraction == 0:
            raise ConfigError("data.split_part=reference needs data.reference_fraction > 0 (the share set aside)")
        self.reference_fraction, self.split_part = reference_fraction, split_part
        self.tokenizer_name, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.val_fraction, self.val_files, self.num_workers = val_fraction, val_files, num_workers
        self.on_bad_row, self.shuffle, self.seed, self.max_samples = on_bad_row, shuffle, seed, max_samples
        self.train_set = self.val_set = None
        self.sampler: ResumableSampler | None = None

    @abc.abstractmethod
    def build_samples(self, paths: list[str]) -> list[dict]:
        """Tokenized samples of the given files."""

    @abc.abstractmethod
    def train_paths(self) -> list[str]:
        """The training files (or embedded sources) of this data module."""

    @property
    def tokenizer(self):
        if getattr(self, "_tokenizer", None) is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if self.tokenizer_name is None and module is not None and getattr(module, "tokenizer", None) is not None:
                self._tokenizer = module.tokenizer
            else:
                from tokensel.trainer.lm import load_tokenizer

                self._tokenizer = load_tokenizer(self.tokenizer_name)
        return self._tokenizer

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        samples = self.build_samples(self.train_paths())
        if self.max_samples:
            samples = samples[: self.max_samples]
        for i, s in enumerate(samples):  # stable ids (source order) for cached per-token statistics
            s["sample_index"] = i
        if self.val_files:
            val = self.build_samples(self.val_files)
            for i, s in enumerate(val):
                s["sample_index"] = len(samples) + i
        else:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(len(samples), generator=g).tolist()
            n_val = int(round(len(samples) * self.val_fraction))
            val, samples = [samples[i] for i in perm[:n_val]], [samples[i] for i in perm[n_val:]]
        if self.reference_fraction:
            # a curated split for a Rho-1 reference model: set aside after the validation split (so both runs
            # validate on the same samples), seeded, never trained on by the main (selective) run
            g = torch.Generator().manual_seed(self.seed + 7919)
            perm = torch.randperm(len(samples), generator=g).tolist()
            n_ref = int(round(len(samples) * self.reference_fraction))
            ref, main = [samples[i] for i in perm[:n_ref]], [samples[i] for i in perm[n_ref:]]
            samples = ref if self.split_part == "reference" else main
            print(f"tokensel data: training on the {self.split_part} part ({len(ref)} reference / {len(main)} main)")
        self.train_set, self.val_set = self._wrap(samples), self._wrap(val) if val else None
        print(f"tokensel data: {len(samples)} train / {len(val)} validation samples")

    def _wrap(self, samples):
        return TokenizedDataset(samples)

    def _collate(self):
        pad = self.tokenizer.pad_token_id
        return pad_collate(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    def state_dict(self) -> dict:
        """Saved in every checkpoint: where the training loader stands, for an exact mid-epoch resume."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        # samples_done (global, all ranks) lets a run resume under another world size / batch size
        return {"epoch": self.trainer.current_epoch, "batches_done": int(done),
                "samples_done": int(done) * self.batch_size * self.trainer.world_size}

    def load_state_dict(self, state: dict) -> None:
        self._resume = state

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = ResumableSampler(len(self.train_set), self.shuffle, self.seed, self.batch_size, rank, world)
        resume = getattr(self, "_resume", None)
        if resume:
            n_batches = -(-len(self.sampler) // self.batch_size)
            done = resume["batches_done"]
            if "samples_done" in resume:  # in this run's global batches (world size may have changed)
                gb = self.batch_size * world
                done = resume["samples_done"] // gb
                if resume["samples_done"] % gb:
                    print(f"tokensel data: resuming at sample {resume['samples_done']}, not a multiple of the "
                          f"global batch {gb}; starting from sample {done * gb} of the epoch")
            if done < n_batches:  # a finished epoch resumes at the next one's start
                self.sampler.fast_forward(resume["epoch"], done)
            self._resume = None
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=self.sampler,
                          collate_fn=self._collate(), num_workers=self.num_workers, drop_last=False)

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate(),
                          num_workers=self.num_workers)

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate(),
                          num_workers=self.num_workers)


class SFTDataModule(TextDataModule):
    """Supervised fine-tuning data: labels only on response (assistant) tokens.

    Args:
        train_files: JSONL / JSON / parquet files or saved HF dataset folders. Empty = the embedded
            GSM-style math set (600 problems made with reasoning-gym's `gsm_symbolic`, shipped in the package).
        format: "prompt_response" (columns named by `column_map`), "messages" (chat lists), "sharegpt"
            (`conversations` of {from, value}), "alpaca" (instruction / input / output), or "auto" (by columns).
        column_map: e.g. `{prompt: question, response: answer}`; keys prompt, response, system, messages,
            conversations, instruction, input, output.
        role_map: speaker or role names -> system / user / assistant, e.g. `{bot: assistant}`; for sharegpt it
            extends the usual names (human, gpt, ...), for messages it maps non-standard roles.
        train_on: which tokens train: "assistant" (every assistant turn), "last_assistant", or "all".
        chat_template: a Jinja chat template (a string, or a path to a .jinja file) used instead of the
            tokenizer's; chat_template_kwargs: extra variables for it (e.g. `{enable_thinking: false}`).
        packing: pack several samples per row (block-diagonal mask) instead of padding each.
        (the rest: see `TextDataModule`) tokenizer (default: the model's), max_length, batch_size,
        val_fraction / val_files, on_bad_row ("error" stops at the first bad row with file:line; "skip"
        drops and counts), shuffle, seed, max_samples.
    """

    def __init__(self, train_files: list[str] | None = None,
                 format: Literal["auto", "prompt_response", "messages", "sharegpt", "alpaca"] = "auto",
                 column_map: dict[str, str] | None = None, role_map: dict[str, str] | None = None,
                 train_on: Literal["assistant", "last_assistant", "all"] = "assistant",
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                 packing: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
        self.train_on, self.chat_template_kwargs = train_on, dict(chat_template_kwargs or {})
        self.chat_template = _read_template(chat_template)
        if format not in SFT_FORMATS:
            raise ConfigError(f"data.format={format!r}: use one of {', '.join(SFT_FORMATS)}")
        bad = {k: v for k, v in (role_map or {}).items() if v not in ROLES}
        if bad:
            raise ConfigError(f"data.role_map={bad}: roles map to one of {list(ROLES)}")
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files or [])
        self.format, self.column_map, self.packing = format, dict(column_map or {}), packing
        self.role_map = dict(role_map or {})

    def train_paths(self) -> list[str]:
        return self.train_files or [EMBEDDED_SFT]

    def build_samples(self, paths: list[str]) -> list[dict]:
        tok, dropped = self.tokenizer, 0

        def parse(loc, row):
            nonlocal dropped
            msgs = parse_sft_row(loc, row, self.format, self.column_map, self.role_map)
            s = tokenize_chat(tok, msgs, self.max_length, self.train_on, self.chat_template,
                              self.chat_template_kwargs)
            dropped += s is None
            return s
        out = _collect(paths, parse, self.on_bad_row)
        if dropped:
            print(f"tokensel data: {dropped} samples had no response token left after max_length="
                  f"{self.max_length} truncation and were dropped")
        return out

    def _wrap(self, samples):
        base = TokenizedDataset(samples)
        return PackedDataset(base, self.max_length) if self.packing else base

    def _collate(self):
        if not self.packing:
            return super()._collate()
        pad = self.tokenizer.pad_token_id
        return packed_collate(pad if pad is not None else (self.tokenizer.eos_token_id or 0), self.max_length)

