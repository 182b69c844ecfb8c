"""The text DataModules' shared machinery: sources -> tokenised parts (cached once) -> split -> views and
resumable (optionally weighted) loaders."""

from __future__ import annotations

import abc
import bisect
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tokensel.errors import ConfigError
from tokensel.trainer.data.packing import pad_collate
from tokensel.trainer.data.sampler import MixtureSampler, ResumableSampler, eval_share
from tokensel.trainer.data.sources import Source, parse_sources


class TokenizedDataset(Dataset):
    """Tokenised samples ({input_ids, labels}) of one source: a memory-mapped `datasets.Dataset` (the cache's
    Arrow file) or, for small in-memory sets, a list of dicts."""

    def __init__(self, samples):
        import datasets

        self.ds = samples if isinstance(samples, datasets.Dataset) else datasets.Dataset.from_list(list(samples))

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]

    def lengths(self) -> np.ndarray:
        import pyarrow.compute as pc

        col = self.ds.data.column("input_ids")
        return np.asarray(pc.list_value_length(col).to_numpy(zero_copy_only=False), dtype=np.int64)[
            self.ds._indices.column(0).to_numpy() if self.ds._indices is not None else slice(None)]


class SampleView(Dataset):
    """The samples `ids` (global sample indices) of the concatenation of `parts` (one per source). Each item
    carries `sample_index` (its global index: the same in every run on the same data, for cached per-token
    statistics) and `source_index` (its part, for per-source metrics)."""

    def __init__(self, parts: list, ids, first_index: int = 0):
        self.parts, self.ids, self.first = parts, np.asarray(ids, dtype=np.int64), first_index
        self.offsets = np.cumsum([0] + [len(p) for p in parts]).tolist()

    def __len__(self) -> int:
        return len(self.ids)

    def locate(self, g: int) -> tuple[int, int]:
        p = bisect.bisect_right(self.offsets, g) - 1
        return p, g - self.offsets[p]

    def source_of(self) -> np.ndarray:
        return np.searchsorted(np.asarray(self.offsets[1:]), self.ids, side="right")

    def __getitem__(self, i: int) -> dict:
        g = int(self.ids[i])
        p, r = self.locate(g)
        item = dict(self.parts[p][r])
        item["sample_index"], item["source_index"] = self.first + g, p
        return item

    def lengths(self) -> np.ndarray:
        all_lengths = np.concatenate([_lengths(p) for p in self.parts]) if self.parts else np.zeros(0, np.int64)
        return all_lengths[self.ids]


def _lengths(part) -> np.ndarray:
    if hasattr(part, "lengths"):
        return np.asarray(part.lengths(), dtype=np.int64)
    return np.asarray([len(part[i]["input_ids"]) for i in range(len(part))], dtype=np.int64)


class TextDataModule(LightningDataModule, abc.ABC):
    """Shared machinery: sources, tokenizer from the model (or `tokenizer`), tokenise-once cache, split,
    resumable loaders, mixtures.

    Args (shared by the SFT and pretraining modules):
        train_files / val_files: data entries: local files (.jsonl, .json, .txt, .csv, .tsv, .parquet), saved
            dataset folders, folders of data files, hub ids, `embedded:<name>`; each optionally `:split`, or a
            mapping `{path, split, subset, weight, name}` (see `data/sources.py`). Weights on every train entry
            make a mixture: each draw picks a source in those proportions (seeded, resumable); without weights
            the sources are concatenated. Validation loss is logged per source (`val/loss/<name>`) when there
            are several.
        split: the split of entries that name none (default `train`).
        streaming: read sources lazily (`datasets` streaming for hub ids and parquet/csv; local JSONL/text
            are always read line by line), so a raw corpus never has to be loaded or prepared in full; the
            tokens are still written once to the cache.
        num_proc: processes that tokenise (one source at a time, in order, so the result does not depend on it).
        cache: write tokenised data once per (data, tokenizer, settings) fingerprint under `cache_dir`
            (default $TOKENSEL_DATA_CACHE or ~/.cache/tokensel/data) and reuse it in later runs and on other
            ranks; false = tokenise in memory every run.
        max_samples: at most this many samples (SFT) or blocks (pretraining) per source; reading and tokenising
            stop once they are made.
        tokenizer (default: the model's), max_length, batch_size, val_fraction (share held out when no
        val_files), num_workers, on_bad_row ("error" stops at the first bad row naming file:line or source:row;
        "skip" drops and counts), shuffle, seed, reference_fraction / split_part (a curated reference split).
    """

    kind = "text"

    def __init__(self, train_files: list[str | dict[str, Any]] | None = None,
                 val_files: list[str | dict[str, Any]] | None = None, split: str | None = None,
                 streaming: bool = False, num_proc: int = 1, cache: bool = True, cache_dir: str | None = None,
                 tokenizer: str | None = None, max_length: int = 512, batch_size: int = 4,
                 val_fraction: float = 0.05, num_workers: int = 0,
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
        if not isinstance(num_proc, int) or num_proc < 1:
            raise ConfigError(f"data.num_proc={num_proc!r}: must be a positive integer")
        if max_samples is not None and max_samples < 1:
            raise ConfigError(f"data.max_samples={max_samples}: must be positive (or null for all)")
        self.reference_fraction, self.split_part = reference_fraction, split_part
        self.train_files = [train_files] if isinstance(train_files, str | dict) else list(train_files or [])
        self.val_files = [val_files] if isinstance(val_files, str | dict) else (list(val_files) if val_files else None)
        self._train_sources = parse_sources(self.train_files, "data.train_files")
        self._val_sources = parse_sources(self.val_files, "data.val_files")
        if any(s.weight is not None for s in self._val_sources):
            raise ConfigError("data.val_files: weights apply to training sources only; drop them from val_files")
        self.split, self.streaming, self.num_proc = split, streaming, num_proc
        self.cache, self.cache_dir = cache, cache_dir
        self.tokenizer_name, self.max_length, self.batch_size = tokenizer, max_length, batch_size
        self.val_fraction, self.num_workers = val_fraction, num_workers
        self.on_bad_row, self.shuffle, self.seed, self.max_samples = on_bad_row, shuffle, seed, max_samples
        self.train_set = self.val_set = None
        self.sampler: ResumableSampler | None = None
        self.val_source_names: list[str] = []

    # ---- what a subclass provides

    @abc.abstractmethod
    def default_sources(self) -> list[Source]:
        """The sources used when `train_files` is empty (the embedded data)."""

    @abc.abstractmethod
    def build_source(self, src: Source):
        """The tokenised samples of one source (a Dataset of {input_ids, labels} with `lengths()`), read from
        the cache when it is there, else tokenised (and written to the cache when `cache` is on)."""

    # ---- sources

    def train_sources(self) -> list[Source]:
        srcs = self._train_sources or self.default_sources()
        return [self._with_split(s) for s in srcs]

    def val_sources(self) -> list[Source]:
        return [self._with_split(s) for s in self._val_sources]

    def _with_split(self, s: Source) -> Source:
        if s.split is None and self.split is not None and s.kind != "file":
            from dataclasses import replace

            return replace(s, split=self.split)
        return s

    def build_samples(self, entries) -> list[dict]:
        """Every tokenised sample of `entries` (data entries, as in `train_files`) as a list of dicts: for
        tests, notebooks and benchmarks; training reads the memory-mapped parts instead."""
        out = []
        for s in parse_sources(entries, "build_samples"):
            part = self.build_source(self._with_split(s))
            out += [dict(part[i]) for i in range(len(part))]
        return out

    def train_paths(self) -> list[str]:
        """The training files / ids (recorded in cache fingerprints)."""
        return [s.path for s in self.train_sources()]

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

    # ---- building

    def prepare_data(self) -> None:
        """Lightning runs this on local rank 0 only, before `setup` on every rank: tokenise into the cache once."""
        if self.cache:
            for s in self.train_sources() + self.val_sources():
                self.build_source(s)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train_src = self.train_sources()
        parts = [self.build_source(s) for s in train_src]
        total = sum(len(p) for p in parts)
        if self.val_sources():
            val_parts = [self.build_source(s) for s in self.val_sources()]
            val = SampleView(val_parts, np.arange(sum(len(p) for p in val_parts)), first_index=total)
            self.val_source_names = [s.label for s in self.val_sources()]
            train_ids = np.arange(total)
        else:
            g = torch.Generator().manual_seed(self.seed)
            perm = torch.randperm(total, generator=g).numpy()
            n_val = int(round(total * self.val_fraction))
            val = SampleView(parts, perm[:n_val]) if n_val else None
            train_ids = perm[n_val:]
            self.val_source_names = [s.label for s in train_src]
        if self.reference_fraction:
            # a curated split for a Rho-1 reference model: set aside after the validation split (so both runs
            # validate on the same samples), seeded, never trained on by the main (selective) run
            g = torch.Generator().manual_seed(self.seed + 7919)
            perm = torch.randperm(len(train_ids), generator=g).numpy()
            n_ref = int(round(len(train_ids) * self.reference_fraction))
            ref, main = train_ids[perm[:n_ref]], train_ids[perm[n_ref:]]
            train_ids = ref if self.split_part == "reference" else main
            print(f"tokensel data: training on the {self.split_part} part ({len(ref)} reference / {len(main)} main)")
        train = SampleView(parts, train_ids)
        self.train_sources_used = train_src
        self.train_set, self.val_set = self._wrap(train), self._wrap(val) if val is not None and len(val) else None
        n_val = len(val) if val is not None else 0
        print(f"tokensel data: {len(train)} train / {n_val} validation samples"
              + (f" from {len(train_src)} sources ({', '.join(s.label for s in train_src)})" if len(train_src) > 1
                 else ""))

    def _wrap(self, view: SampleView):
        return view

    def _collate(self):
        pad = self.tokenizer.pad_token_id
        return pad_collate(pad if pad is not None else (self.tokenizer.eos_token_id or 0))

    # ---- resume

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

    # ---- loaders

    def _sampler(self, rank: int, world: int) -> ResumableSampler:
        srcs = getattr(self, "train_sources_used", self.train_sources())
        if len(srcs) > 1 and srcs[0].weight is not None:
            view = self.train_set  # samples, or packed rows (each of one source)
            src_of = view.source_of()
            groups = [np.flatnonzero(src_of == s).tolist() for s in range(len(srcs))]
            empty = [srcs[s].where for s, grp in enumerate(groups) if not grp]
            if empty:
                raise ConfigError(f"data.train_files: {', '.join(empty)} has no training samples left after the "
                                  "validation split; give it more rows or drop it")
            return MixtureSampler(groups, [s.weight for s in srcs], self.seed, self.batch_size, rank, world,
                                  num_samples=len(view))
        return ResumableSampler(len(self.train_set), self.shuffle, self.seed, self.batch_size, rank, world)

    def _loader_generator(self) -> torch.Generator:
        """A DataLoader draws a base seed whenever an iterator starts (each epoch); from the global RNG that
        draw would shift every later random number (dropout, random masks) by one at each epoch start, which a
        run resumed at an epoch boundary (its iterator made before the RNG state is restored) cannot replay.
        Its own generator keeps the global stream to the model alone."""
        return torch.Generator().manual_seed(self.seed + 104729)

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.sampler = self._sampler(rank, world)
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
                          collate_fn=self._collate(), num_workers=self.num_workers, drop_last=False,
                          generator=self._loader_generator())

    def val_dataloader(self) -> DataLoader | list:
        """Each data-parallel rank scores its own share of the validation set (`EvalShard`); one process reads
        it all, in order."""
        if self.val_set is None:
            return []
        return DataLoader(eval_share(self.trainer, self.val_set), batch_size=self.batch_size, shuffle=False,
                          collate_fn=self._collate(), num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader | list:
        """`trainer test` reads the validation set (`val_files`, else the `val_fraction` held out): no sample
        of it is trained on, and there is no separate test split."""
        return self.val_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False, collate_fn=self._collate(),
                          num_workers=self.num_workers)
