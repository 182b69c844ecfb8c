"""Text DataModules: SFT (prompt/response or chat messages) and pretraining text, built on `datasets`.

Every batch carries `input_ids`, `labels` (-100 where no loss: prompt, padding), `attention_mask`
(2-D padding mask), `position_ids` (reset per sample), packed batches also `attention_mask_4d` (bool
block-diagonal causal mask; `model_attention_mask` turns it into the form the model's attention reads), and
`sample_index` / `token_index` `[B, T]` (dataset row and position within it, -1 on padding) so cached
per-token statistics (reference / history losses) can be looked up whatever the batching.

Malformed rows stop the run with the file, line and problem (`on_bad_row: error`), or are skipped and
counted (`on_bad_row: skip`).
"""

from __future__ import annotations

import abc
import json
import logging
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler

from tokensel.errors import ConfigError, DataError
from tokensel.offline import EMBEDDED_SFT

log = logging.getLogger(__name__)
IGNORE = -100


# ---------------------------------------------------------------- reading rows with their locations


def _read_rows(path: str) -> list[tuple[str, object]]:
    """Rows of a JSONL / JSON / parquet file or saved HF dataset folder, each with a location string."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{path}: no such file or folder")
    if p.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # noqa: BLE001 - datasets raises many types for a bad folder
            raise DataError(f"{path}: not a saved Hugging Face dataset folder ({e})") from None
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else next(iter(ds.values()))
        return [(f"{path}: row {i}", r) for i, r in enumerate(ds)]
    if p.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(p))
        except Exception as e:  # noqa: BLE001 - pyarrow / datasets raise many types for a bad file
            raise DataError(f"{path}: not a parquet file datasets can read ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200] if str(e) else ''}); rewrite it or use JSONL") from None
        return [(f"{path}: row {i}", r) for i, r in enumerate(ds)]
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: invalid JSON ({e}); a .json file must hold one array of objects") from None
        except RecursionError:
            raise DataError(f"{path}: invalid JSON (nested too deeply); a .json file must hold one array of "
                            "objects") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: top level is {type(data).__name__}; a .json file must hold an array of objects")
        return [(f"{path}: item {i}", r) for i, r in enumerate(data)]
    if p.suffix in (".jsonl", ".txt", ".text") or p.suffix == "":
        rows = []
        with open(p, "rb") as f:
            for n, raw in enumerate(f, start=1):
                loc = f"{path}:{n}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    rows.append((loc, DataError(f"{loc}: invalid UTF-8 ({e.reason} at byte {e.start})")))
                    continue
                if not line.strip():
                    continue
                if p.suffix == ".jsonl":
                    try:
                        rows.append((loc, json.loads(line)))
                    except json.JSONDecodeError as e:
                        rows.append((loc, DataError(f"{loc}: bad JSON ({e.msg} at column {e.colno})")))
                    except RecursionError:
                        rows.append((loc, DataError(f"{loc}: bad JSON (nested too deeply); one object per line")))
                else:
                    rows.append((loc, {"text": line.rstrip("\n")}))
        return rows
    raise DataError(f"{path}: unknown file type {p.suffix!r}; use .jsonl, .json, .parquet, .txt or a saved dataset")


def _collect(paths: list[str], parse, on_bad_row: str) -> list:
    """Parse every row with `parse(loc, row)`; bad rows raise or are counted, per `on_bad_row`."""
    out, bad = [], 0
    for path in paths:
        for loc, row in _read_rows(path):
            try:
                if isinstance(row, DataError):
                    raise row
                item = parse(loc, row)
            except DataError:
                if on_bad_row == "error":
                    raise
                bad += 1
                continue
            if item is not None:
                out.append(item)
    if bad:
        log.warning("tokensel data: skipped %d malformed rows (on_bad_row=skip)", bad)
        print(f"tokensel data: skipped {bad} malformed rows (on_bad_row=skip)")
    if not out:
        raise DataError(f"{', '.join(paths)}: no usable rows")
    return out


# ---------------------------------------------------------------- SFT rows -> token ids + labels


def _as_str(loc: str, row: dict, key: str, col: str) -> str:
    if col not in row:
        raise DataError(f"{loc}: missing column {col!r} (the {key}); columns are {sorted(row)}; "
                        f"set data.column_map.{key} to the right name")
    v = row[col]
    if not isinstance(v, str):
        raise DataError(f"{loc}: column {col!r} must be a string, got {type(v).__name__}")
    return v


def _read_template(spec: str | None) -> str | None:
    """`chat_template`: a template string, or a path to a file holding one."""
    if spec is None:
        return None
    if "{" not in spec:  # not Jinja: a file name
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ConfigError(f"data.chat_template={spec!r}: no such file, and not a Jinja template string")
        return path.read_text(encoding="utf-8")
    return spec


SFT_FORMATS = ("auto", "prompt_response", "messages", "sharegpt", "alpaca")
# ShareGPT speaker names -> chat roles (LLaMA-Factory / FastChat conventions); `role_map` adds or overrides
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bing": "assistant", "bard": "assistant", "system": "system"}
ROLES = ("system", "user", "assistant")


def _detect_format(row: dict, column_map: dict[str, str]) -> str:
    """`format: auto`: messages if that column exists, else sharegpt (conversations), alpaca (instruction +
    output), else prompt_response."""
    if column_map.get("messages", "messages") in row:
        return "messages"
    if column_map.get("conversations", "conversations") in row:
        return "sharegpt"
    if column_map.get("instruction", "instruction") in row and column_map.get("output", "output") in row:
        return "alpaca"
    return "prompt_response"


def _turns(loc: str, turns, col: str, role_key: str, text_key: str, role_map: dict[str, str]) -> list[dict]:
    """A list of {role_key, text_key} objects -> [{role, content}], roles mapped and checked."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{loc}: column {col!r} must be a non-empty list of {{{role_key}, {text_key}}} objects")
    out = []
    for i, m in enumerate(turns):
        if not isinstance(m, dict) or not isinstance(m.get(role_key), str) or not isinstance(m.get(text_key), str):
            raise DataError(f"{loc}: message {i} of {col!r} needs string {role_key!r} and {text_key!r} fields, "
                            f"got {m!r:.80}")
        role = role_map.get(m[role_key], m[role_key])
        if role not in ROLES:
            known = sorted(k for k, v in role_map.items() if v in ROLES)
            raise DataError(f"{loc}: message {i} has role {m[role_key]!r}; use one of {known or list(ROLES)} or map "
                            f"it with data.init_args.role_map (e.g. {{{m[role_key]}: assistant}})")
        out.append({"role": role, "content": m[text_key]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise DataError(f"{loc}: no non-empty assistant message, so nothing to train on")
    return out


def _system(row: dict, column_map: dict[str, str]) -> list[dict]:
    scol = column_map.get("system", "system")
    return [{"role": "system", "content": row[scol]}] if isinstance(row.get(scol), str) and row[scol] else []


def parse_sft_row(loc: str, row, fmt: str, column_map: dict[str, str],
                  role_map: dict[str, str] | None = None) -> list[dict]:
    """Validate one SFT row and return it as chat messages [{role, content}, ...].

    Formats: `messages` ([{role, content}]), `sharegpt` (`conversations`: [{from, value}], speakers mapped by
    SHAREGPT_ROLES + `role_map`; a `system` column is prepended), `alpaca` (`instruction` + optional `input`,
    joined by a blank line, is the prompt; `output` the response; optional `system`), `prompt_response`.
    `column_map` renames any of these columns; `auto` picks by the columns present (`_detect_format`).
    """
    if not isinstance(row, dict):
        raise DataError(f"{loc}: each row must be a JSON object, got {type(row).__name__}")
    role_map = dict(role_map or {})
    if fmt == "auto":
        fmt = _detect_format(row, column_map)
    if fmt == "messages":
        mcol = column_map.get("messages", "messages")
        return _turns(loc, row.get(mcol), mcol, "role", "content", role_map)
    if fmt == "sharegpt":
        ccol = column_map.get("conversations", "conversations")
        if ccol not in row:
            raise DataError(f"{loc}: missing column {ccol!r} (format sharegpt); columns are {sorted(row)}; set "
                            f"data.column_map.conversations to the right name")
        turns = _turns(loc, row[ccol], ccol, "from", "value", {**SHAREGPT_ROLES, **role_map})
        return (_system(row, column_map) if turns[0]["role"] != "system" else []) + turns
    if fmt == "alpaca":
        instruction = _as_str(loc, row, "instruction", column_map.get("instruction", "instruction"))
        icol = column_map.get("input", "input")
        extra = row.get(icol)
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{loc}: column {icol!r} must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra else instruction
        response = _as_str(loc, row, "output", column_map.get("output", "output"))
    else:
        prompt = _as_str(loc, row, "prompt", column_map.get("prompt", "prompt"))
        response = _as_str(loc, row, "response", column_map.get("response", "response"))
    if not response.strip():
        raise DataError(f"{loc}: empty response, so nothing to train on")
    return _system(row, column_map) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


TRAIN_ON = ("assistant", "last_assistant", "all")
_WARNED: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(msg)


def _label_turns(render, messages: list[dict], turns: list[int]) -> tuple[list[int], list[int]] | None:
    """Ids and labels with the assistant turns `turns` labelled: each one's span is the template rendered
    through it minus the template rendered up to it with the generation prompt. None when the template is not
    prefix-consistent (rendering more turns changes the tokens of earlier ones)."""
    ids: list[int] = []
    labels: list[int] = []
    for i in turns:
        before, through = render(messages[:i], True), render(messages[: i + 1], False)
        if through[: len(before)] != before or before[: len(ids)] != ids:
            return None
        labels += [IGNORE] * (len(before) - len(ids)) + through[len(before):]
        ids = through
    tail = render(messages, False)
    if tail[: len(ids)] != ids:
        return None
    return tail, labels + [IGNORE] * (len(tail) - len(ids))  # later non-labelled turns: context only


def tokenize_chat(tokenizer, messages: list[dict], max_length: int, train_on: str = "assistant",
                  chat_template: str | None = None, template_kwargs: dict | None = None) -> dict | None:
    """Token ids with labels on the trained tokens; None if truncation leaves no labelled token.

    `train_on`: "assistant" (every assistant turn), "last_assistant" (the last one only) or "all" (every token).
    With a chat template (`chat_template` overrides the tokenizer's; `template_kwargs` go to
    `apply_chat_template`), each assistant turn's span is the difference between the template rendered up to
    the turn (with the generation prompt) and through it, so system/user text and the template's role headers
    never get a label. A template that rewrites earlier turns once later ones exist (Qwen3-style thinking
    blocks dropped from past assistant turns) cannot label every turn that way: then the last assistant turn
    alone is labelled, with one warning per run. Without a template, turns are joined with newlines and each
    response ends with the EOS token.
    """
    assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    turns = assistants[-1:] if train_on == "last_assistant" else assistants
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if template:
        def render(msgs, gen):
            out = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen,
                                                chat_template=template, **(template_kwargs or {}))
            return list(out["input_ids"]) if isinstance(out, dict) or hasattr(out, "keys") else list(out)
        got = _label_turns(render, messages, turns)
        if got is None and len(turns) > 1:
            _warn_once("template-fallback", "tokensel data: the chat template rewrites earlier turns once later "
                       "ones exist (e.g. it drops thinking blocks from past assistant turns), so only the last "
                       "assistant turn of each multi-turn sample is labelled (as data.train_on: last_assistant)")
            got = _label_turns(render, messages, assistants[-1:])
        if got is None:
            raise ConfigError("the chat template is not prefix-consistent even for the last assistant turn; set "
                              "data.init_args.chat_template to one that is, or use data.format prompt_response "
                              "with a tokenizer without a chat template")
        ids, labels = got
    else:
        ids, labels = [], []
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, m in enumerate(messages):
            piece = tokenizer(m["content"] + ("" if m["role"] == "assistant" else "\n"), add_special_tokens=False)
            piece = list(piece["input_ids"]) + (eos if m["role"] == "assistant" else [])
            ids += piece
            labels += piece if i in turns else [IGNORE] * len(piece)
    if train_on == "all":
        labels = list(ids)
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == IGNORE for x in labels[1:]):
        return None
    return {"input_ids": ids, "labels": labels}


# ---------------------------------------------------------------- batching


class TokenizedDataset(Dataset):
    """A list of tokenized samples (`datasets.Dataset` underneath for memory-mapped storage)."""

    def __init__(self, samples: list[dict]):
        import datasets

        self.ds = datasets.Dataset.from_list(samples)

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> dict:
        return self.ds[int(i)]


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation that can start mid-epoch, sharded across data-parallel ranks.

    The module stores (epoch, batches done) in its checkpoints and calls `fast_forward` on resume, so a
    resumed run sees exactly the batches an uninterrupted run would have seen.

    With `world_size` W > 1 every rank draws the same permutation and cuts it into global batches of
    `batch_size * W`; rank r takes the r-th `batch_size` slice of each. So W processes with batch size B see
    exactly the global batches of one process with batch size W * B (the 1-process run's batch g is the
    concatenation of the ranks' batches g). The permutation is padded by wrapping around to a whole number
    of global batches, so every rank runs the same number of steps (no rank waits forever in a collective).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.batch_size = n, shuffle, seed, batch_size
        self.rank, self.world_size = rank, max(1, world_size)
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, epoch: int, batches_done: int) -> None:
        self.epoch, self.skip_batches = epoch, batches_done

    def _order(self) -> list[int]:
        order = (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
                 if self.shuffle else list(range(self.n)))
        if self.world_size == 1:
            return order
        gb = self.batch_size * self.world_size
        total = -(-self.n // gb) * gb
        order = (order * (-(-total // max(1, self.n))))[:total]  # wrap around: equal steps on every rank
        mine = []
        for g in range(0, total, gb):
            mine += order[g + self.rank * self.batch_size: g + (self.rank + 1) * self.batch_size]
        return mine

    def __iter__(self):
        order = self._order()
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return iter(order[start:])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        return -(-self.n // (self.batch_size * self.world_size)) * self.batch_size


def pad_collate(pad_id: int):
    """Right-pad a list of samples to the longest one."""
    def collate(items: list[dict]) -> dict:
        T = max(len(x["input_ids"]) for x in items)
        B = len(items)
        batch = {"input_ids": torch.full((B, T), pad_id), "labels": torch.full((B, T), IGNORE),
                 "attention_mask": torch.zeros(B, T, dtype=torch.long),
                 "position_ids": torch.zeros(B, T, dtype=torch.long),
                 "sample_index": torch.full((B, T), -1), "token_index": torch.full((B, T), -1)}
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            batch["input_ids"][b, :n] = torch.tensor(x["input_ids"])
            batch["labels"][b, :n] = torch.tensor(x["labels"])
            batch["attention_mask"][b, :n] = 1
            batch["position_ids"][b, :n] = torch.arange(n)
            batch["sample_index"][b, :n] = x["sample_index"]
            batch["token_index"][b, :n] = torch.arange(n)
        return batch
    return collate


def pack_samples(samples: list[dict], max_length: int) -> list[list[int]]:
    """Greedy first-fit of whole samples into rows of at most `max_length` tokens (indices per row)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


class PackedDataset(Dataset):
    """Rows of several whole samples; the collate builds a block-diagonal causal mask so samples never see
    each other, and resets positions per sample."""

    def __init__(self, base: TokenizedDataset, max_length: int):
        self.base = base
        self.rows = pack_samples([base[i] for i in range(len(base))], max_length)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.base[j] for j in self.rows[i]]


def packed_collate(pad_id: int, max_length: int):
    """Rows of several samples: `attention_mask_4d` `[B, 1, T, T]` bool (True = may attend) is causal within
    each sample and blocks every other sample; padding positions attend only to themselves (no empty row, so
    no NaN). It is the kernel-independent layout: pass it to a model through `model_attention_mask`."""
    def collate(rows: list[list[dict]]) -> dict:
        B, T = len(rows), max(sum(len(s["input_ids"]) for s in r) for r in rows)
        batch = pad_collate(pad_id)([{"input_ids": [pad_id] * T, "labels": [IGNORE] * T, "sample_index": -1}
                                     for _ in rows])
        mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
        batch["attention_mask"] = torch.zeros(B, T, dtype=torch.long)
        batch["sample_index"].fill_(-1)
        batch["token_index"].fill_(-1)
        for b, r in enumerate(rows):
            at = 0
            for s in r:
                n = len(s["input_ids"])
                sl = slice(at, at + n)
                batch["input_ids"][b, sl] = torch.tensor(s["input_ids"])
                batch["labels"][b, sl] = torch.tensor(s["labels"])
                batch["attention_mask"][b, sl] = 1
                batch["position_ids"][b, sl] = torch.arange(n)
                batch["sample_index"][b, sl] = s["sample_index"]
                batch["token_index"][b, sl] = torch.arange(n)
                mask[b, 0, sl, sl] = torch.tril(torch.ones(n, n, dtype=torch.bool))
                at += n
            mask[b, 0, at:, at:] = torch.eye(T - at, dtype=torch.bool)  # padding attends to itself: no NaN rows
        batch["attention_mask_4d"] = mask
        return batch
    return collate


# attention implementations that can keep packed samples apart through a 4-D mask
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def model_attention_mask(batch: dict, backbone):
    """The `attention_mask` to give `backbone` (a transformers decoder) for `batch`.

    A padded batch: its 2-D padding mask (the model builds its causal mask). A packed batch: its bool
    `attention_mask_4d`, in the form the backbone's attention implementation reads as a mask. transformers
    hands a 4-D mask to the kernel unchanged, and only SDPA treats a bool tensor as a mask; eager attention
    and flex attention *add* a tensor mask to the scores (a bool True is +1: no mask at all, future tokens
    and other samples visible). So: sdpa gets the bool mask; eager gets an additive mask in the model's
    dtype (0 where allowed, the dtype's min where blocked: never -inf, so no NaN); flex_attention gets a
    BlockMask of the same pattern. Other implementations (flash attention, paged, hub kernels) take no 4-D
    mask, so packing is refused with them."""
    mask = batch.get("attention_mask_4d")
    if mask is None:
        return batch.get("attention_mask")
    impl = getattr(backbone.config, "_attn_implementation", None)
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = backbone.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        B, _, T, S = mask.shape
        return create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], B, None, T, S, device=mask.device)
    raise ConfigError(f"data.init_args.packing=true: model.init_args.attn_implementation={impl!r} takes no 4-D mask, "
                      f"so packed samples would see each other; use one of {', '.join(PACKED_ATTENTION)}, or set "
                      "data.init_args.packing=false")


# ---------------------------------------------------------------- DataModules


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


class PretrainDataModule(TextDataModule):
    """Pretraining text: plain text (one document per line, or whole file) or JSONL with a `text`
    column, tokenized, joined with EOS and cut into fixed blocks of `max_length` tokens; every token
    is labelled.

    Args:
        train_files: text / JSONL files. Empty = the embedded text (the GSM set's prompts and answers).
        text_column: JSONL column holding the text.
        (the rest: see `TextDataModule`).
    """

    def __init__(self, train_files: list[str] | None = None, text_column: str = "text", **kwargs) -> None:
        super().__init__(**kwargs)
        self.train_files = [train_files] if isinstance(train_files, str) else list(train_files or [])
        self.text_column = text_column

    def train_paths(self) -> list[str]:
        from tokensel.offline import resolve_text_file  # `embedded:shakespeare` / `embedded:wiki`

        return [resolve_text_file(p) for p in self.train_files] or [EMBEDDED_SFT]

    def build_samples(self, paths: list[str]) -> list[dict]:
        tok = self.tokenizer
        col = self.text_column

        def parse(loc, row):
            if not isinstance(row, dict):
                raise DataError(f"{loc}: each row must be a JSON object, got {type(row).__name__}")
            if paths == [EMBEDDED_SFT] and col not in row:
                return row["prompt"] + "\n" + row["response"]
            return _as_str(loc, row, "text", col)
        texts = _collect(paths, parse, self.on_bad_row)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        stream: list[int] = []
        for t in texts:
            stream += list(tok(t, add_special_tokens=False)["input_ids"]) + [eos]
        L = self.max_length
        blocks = [stream[i: i + L] for i in range(0, len(stream) - L + 1, L)]
        if not blocks:
            raise DataError(f"{', '.join(paths)}: {len(stream)} tokens, fewer than one block of max_length={L}")
        return [{"input_ids": b, "labels": list(b)} for b in blocks]
