"""Supervised fine-tuning data: rows -> chat messages -> token ids with labels on the trained tokens, written
once per fingerprint to a memory-mapped Arrow file in the data cache."""

from __future__ import annotations

import itertools
import multiprocessing as mp
from pathlib import Path
from typing import Any, Literal

from tokensel.errors import ConfigError, DataError
from tokensel.offline import EMBEDDED_SFT
from tokensel.trainer.data.cache import build_once, cache_root, entry_key, read_meta
from tokensel.trainer.data.formats import (
    ROLES,
    SFT_FORMATS,
    TRAIN_ON,
    _read_template,
    _sha_text,
    parse_sft_row,
    row_tools,
    tokenize_chat,
)
from tokensel.trainer.data.modules import SampleView, TextDataModule, TokenizedDataset
from tokensel.trainer.data.packing import PackedDataset, packed_collate
from tokensel.trainer.data.sources import Source, iter_rows, source_identity

CHUNK = 256  # rows per tokenising task
ARROW = "data.arrow"

# ---------------------------------------------------------------- tokenising rows (in this process or workers)

_JOB: dict = {}


def _init_job(job: dict) -> None:
    _JOB.clear()
    _JOB.update(job)


def _tokenize_rows(chunk: list[tuple[str, object]]) -> list[tuple]:
    """("ok", ids, labels) | ("drop",) (no trained token left after truncation) | ("bad", message) per row;
    ("fatal", message) for a configuration error (it stops the run whatever on_bad_row says)."""
    j, out = _JOB, []
    for loc, row in chunk:
        try:
            if isinstance(row, DataError):
                raise row
            msgs = parse_sft_row(loc, row, j["format"], j["column_map"], j["role_map"])
            s = tokenize_chat(j["tokenizer"], msgs, j["max_length"], j["train_on"], j["chat_template"],
                              j["chat_template_kwargs"], row_tools(loc, row, j["column_map"]))
        except DataError as e:
            out.append(("bad", str(e)))
            continue
        except ConfigError as e:
            out.append(("fatal", str(e)))
            continue
        out.append(("drop",) if s is None else ("ok", s["input_ids"], s["labels"]))
    return out


def _chunks(rows, n: int):
    it = iter(rows)
    while chunk := list(itertools.islice(it, n)):
        yield chunk


def tokenize_source(rows, job: dict, on_bad_row: str, num_proc: int, where: str, out: Path | None,
                    limit: int | None = None):
    """Tokenise `rows` ((loc, row) pairs) with `job`'s settings, in order, into an Arrow file at `out` (or in
    memory when None), stopping once `limit` samples are made (the rest of the source is never read).
    Returns (datasets.Dataset, stats)."""
    import datasets
    import pyarrow as pa

    schema = pa.schema([("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int32()))])
    stats = {"rows": 0, "samples": 0, "dropped": 0, "bad": 0}
    batches: list = []
    writer = pa.ipc.new_stream(str(out), schema) if out is not None else None
    pool, chunk = None, min(CHUNK, limit) if limit else CHUNK
    try:
        if num_proc > 1:
            pool = mp.get_context("spawn").Pool(num_proc, initializer=_init_job, initargs=(job,))
            results = pool.imap(_tokenize_rows, _chunks(rows, chunk))
        else:
            _init_job(job)
            results = map(_tokenize_rows, _chunks(rows, chunk))
        for res in results:
            ids, labels = [], []
            for r in res:
                if limit is not None and stats["samples"] + len(ids) >= limit:
                    break
                stats["rows"] += 1
                if r[0] == "fatal":
                    raise ConfigError(r[1])
                if r[0] == "bad":
                    if on_bad_row == "error":
                        raise DataError(r[1])
                    stats["bad"] += 1
                elif r[0] == "drop":
                    stats["dropped"] += 1
                else:
                    ids.append(r[1])
                    labels.append(r[2])
            if ids:
                batch = pa.record_batch([pa.array(ids, pa.list_(pa.int32())), pa.array(labels, pa.list_(pa.int32()))],
                                        schema=schema)
                stats["samples"] += len(ids)
                (writer.write_batch(batch) if writer is not None else batches.append(batch))
            if limit is not None and stats["samples"] >= limit:
                break
    finally:
        if pool is not None:
            pool.terminate()
        if writer is not None:
            writer.close()
    if stats["bad"]:
        print(f"tokensel data: {where}: skipped {stats['bad']} malformed rows (on_bad_row=skip)")
    if stats["dropped"]:
        print(f"tokensel data: {where}: {stats['dropped']} samples had no trained token left after max_length="
              f"{job['max_length']} truncation and were dropped")
    if not stats["samples"]:
        raise DataError(f"{where}: no usable rows")
    if out is not None:
        return datasets.Dataset.from_file(str(out)), stats
    return datasets.Dataset(pa.Table.from_batches(batches, schema=schema)), stats


class SFTDataModule(TextDataModule):
    """Supervised fine-tuning data: labels only on the trained (by default: assistant) tokens.

    Args:
        train_files: data entries (see `TextDataModule`); empty = the embedded GSM-style math set (600
            problems made with reasoning-gym's `gsm_symbolic`, shipped in the package).
        format: "prompt_response" (columns named by `column_map`), "messages" (chat lists, with `tool` turns
            and assistant `tool_calls` passed to the template), "sharegpt" (`conversations` of {from, value}),
            "alpaca" (instruction / input / output), or "auto" (by the columns of each row).
        column_map: e.g. `{prompt: question, response: answer}`; keys prompt, response, system, messages,
            conversations, instruction, input, output, tools.
        role_map: speaker or role names -> system / user / assistant / tool, e.g. `{bot: assistant}`; for
            sharegpt it extends the usual names (human, gpt, function_call, observation, ...).
        train_on: which tokens train: "assistant" (every assistant turn), "last_assistant", or "all".
        chat_template: a Jinja chat template (a string, or a path to a .jinja file) used instead of the
            tokenizer's; chat_template_kwargs: extra variables for it (e.g. `{enable_thinking: false}`). A
            tokenizer without a template gets the plain format (see `formats.plain_format`) and one warning.
        packing: pack several samples per row (block-diagonal mask) instead of padding each.
        (the rest: see `TextDataModule`).
    """

    kind = "sft"

    def __init__(self, train_files: list[str | dict[str, Any]] | None = None,
                 format: Literal["auto", "prompt_response", "messages", "sharegpt", "alpaca"] = "auto",
                 column_map: dict[str, str] | None = None, role_map: dict[str, str] | None = None,
                 train_on: Literal["assistant", "last_assistant", "all"] = "assistant",
                 chat_template: str | None = None, chat_template_kwargs: dict | None = None,
                 packing: bool = False, **kwargs) -> None:
        super().__init__(train_files=train_files, **kwargs)
        if train_on not in TRAIN_ON:
            raise ConfigError(f"data.train_on={train_on!r}: use one of {', '.join(TRAIN_ON)}")
        self.train_on, self.chat_template_kwargs = train_on, dict(chat_template_kwargs or {})
        self.chat_template = _read_template(chat_template)
        if format not in SFT_FORMATS:
            raise ConfigError(f"data.format={format!r}: use one of {', '.join(SFT_FORMATS)}")
        bad = {k: v for k, v in (role_map or {}).items() if v not in ROLES}
        if bad:
            raise ConfigError(f"data.role_map={bad}: roles map to one of {list(ROLES)}")
        self.format, self.column_map, self.packing = format, dict(column_map or {}), packing
        self.role_map = dict(role_map or {})

    def default_sources(self) -> list[Source]:
        return [Source(EMBEDDED_SFT, name="gsm")]

    def settings(self) -> dict:
        """Everything besides the source and tokenizer that changes the tokenised samples."""
        return {"format": self.format, "column_map": self.column_map, "role_map": self.role_map,
                "train_on": self.train_on, "max_length": self.max_length, "max_samples": self.max_samples,
                "chat_template": _sha_text(self.chat_template), "chat_template_kwargs": self.chat_template_kwargs,
                "on_bad_row": self.on_bad_row}

    def _job(self) -> dict:
        return {"tokenizer": self.tokenizer, "format": self.format, "column_map": self.column_map,
                "role_map": self.role_map, "max_length": self.max_length, "train_on": self.train_on,
                "chat_template": self.chat_template, "chat_template_kwargs": self.chat_template_kwargs}

    def _tokenize(self, src: Source, out: Path | None):
        return tokenize_source(iter_rows(src, self.streaming), self._job(), self.on_bad_row, self.num_proc, src.where,
                               out, self.max_samples)

    def build_source(self, src: Source) -> TokenizedDataset:
        built = getattr(self, "_built", {})
        self._built = built
        if src in built:
            return built[src]
        if not self.cache:
            ds, _ = self._tokenize(src, None)
            built[src] = TokenizedDataset(ds)
            return built[src]
        import datasets

        name, fp = entry_key(self.kind, source_identity(src, streaming=self.streaming), self.tokenizer,
                             self.settings())
        folder = cache_root(self.cache_dir) / name

        def build(tmp: Path) -> dict:
            return self._tokenize(src, tmp / ARROW)[1]
        folder, fresh = build_once(folder, build, fp)
        meta = read_meta(folder)
        print(f"tokensel data: {src.where}: {'tokenised' if fresh else 'reusing tokenised'} {meta['samples']} "
              f"samples {'into' if fresh else 'from'} {folder}")
        built[src] = TokenizedDataset(datasets.Dataset.from_file(str(folder / ARROW)))
        return built[src]

    def _wrap(self, view: SampleView):
        return PackedDataset(view, self.max_length) if self.packing else view

    def _collate(self):
        if not self.packing:
            return super()._collate()
        pad = self.tokenizer.pad_token_id
        return packed_collate(pad if pad is not None else (self.tokenizer.eos_token_id or 0), self.max_length)
