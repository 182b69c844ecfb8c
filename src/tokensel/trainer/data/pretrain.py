"""Pretraining text -> token shards on disk (written once per fingerprint) -> fixed blocks read by index."""

from __future__ import annotations

import tempfile
from typing import Any

from torch.utils.data import Dataset

from tokensel.errors import DataError
from tokensel.offline import EMBEDDED_SFT
from tokensel.trainer.data.cache import cache_root, entry_key, is_ready
from tokensel.trainer.data.formats import _as_str
from tokensel.trainer.data.modules import TextDataModule
from tokensel.trainer.data.shards import TokenBlocks, write_token_shards
from tokensel.trainer.data.sources import Source, iter_rows, source_identity


class Head(Dataset):
    """The first `n` items of a dataset (`max_samples` blocks)."""

    def __init__(self, base, n: int):
        self.base, self.n = base, min(n, len(base))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self.base[i % self.n]

    def lengths(self):
        return self.base.lengths()[: self.n]


class PretrainDataModule(TextDataModule):
    """Pretraining text: plain text (one document per line), JSONL / parquet / CSV / datasets with a `text`
    column; tokenised, each document followed by EOS, and cut into fixed blocks of `max_length` tokens;
    every token is labelled.

    The tokens never sit in one Python list: they are written once, batch by batch, to memory-mapped token
    shards (uint16 when the vocabulary fits, else uint32) in the data cache, and each block is read from
    them by index, so training memory is O(batch) whatever the corpus size, and the exact resume (which
    addresses samples by index) is unchanged. Blocks do not cross sources (each source has its own shards).

    Args:
        train_files: data entries (see `TextDataModule`). Empty = the embedded text (the GSM set's prompts and
            answers); `embedded:shakespeare` / `embedded:wiki` name the shipped texts.
        text_column: the column holding the text.
        max_samples: keep at most this many blocks per source; tokenising stops once they are written.
        (the rest: see `TextDataModule`).
    """

    kind = "pretrain"

    def __init__(self, train_files: list[str | dict[str, Any]] | None = None, text_column: str = "text",
                 **kwargs) -> None:
        super().__init__(train_files=train_files, **kwargs)
        self.text_column = text_column

    def default_sources(self) -> list[Source]:
        return [Source(EMBEDDED_SFT, name="gsm")]

    def settings(self) -> dict:
        return {"text_column": self.text_column, "on_bad_row": self.on_bad_row,
                "max_tokens": self._max_tokens()}

    def _max_tokens(self) -> int | None:
        # one token more than the blocks need: the shard then holds every block max_samples asks for
        return self.max_samples * self.max_length + 1 if self.max_samples else None

    def _docs(self, src: Source, stats: dict):
        col, embedded = self.text_column, src.path == EMBEDDED_SFT
        for loc, row in iter_rows(src, self.streaming):
            try:
                if isinstance(row, DataError):
                    raise row
                if not isinstance(row, dict):
                    raise DataError(f"{loc}: each row must be a JSON object, got {type(row).__name__}")
                text = (row["prompt"] + "\n" + row["response"] if embedded and col not in row
                        else _as_str(loc, row, "text", col))
                stats["docs"] += 1
                yield text
            except DataError:
                if self.on_bad_row == "error":
                    raise
                stats["bad"] += 1

    def build_source(self, src: Source):
        built = getattr(self, "_built", {})
        self._built = built
        if src in built:
            return built[src]
        tok = self.tokenizer
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        name, fp = entry_key(self.kind, source_identity(src, streaming=self.streaming), tok, self.settings())
        folder = cache_root(self.cache_dir) / name if self.cache else None
        if folder is None or not is_ready(folder):
            if folder is None:  # no cache: shards in a temporary folder that lives as long as this module
                self._tmp = getattr(self, "_tmp", None) or tempfile.TemporaryDirectory(prefix="tokensel-shards-")
                folder = cache_root(self._tmp.name) / name
            stats = {"bad": 0, "docs": 0}
            docs = self._docs(src, stats)
            try:
                meta = write_token_shards(docs, tok, folder, eos_id=eos, num_proc=self.num_proc, meta=fp,
                                          max_tokens=self._max_tokens())
            except DataError:
                if stats["docs"]:
                    raise
                raise DataError(f"{src.where}: no usable rows") from None
            if stats["bad"]:
                print(f"tokensel data: {src.where}: skipped {stats['bad']} malformed rows (on_bad_row=skip)")
            print(f"tokensel data: {src.where}: tokenised {meta['docs']} documents, {meta['tokens']} tokens into "
                  f"{folder}")
        else:
            print(f"tokensel data: {src.where}: reusing the token shards in {folder}")
        blocks = TokenBlocks(folder, self.max_length)
        if not len(blocks):
            raise DataError(f"{src.where}: {blocks.tokens} tokens, fewer than one block of max_length="
                            f"{self.max_length}")
        built[src] = Head(blocks, self.max_samples) if self.max_samples else blocks
        return built[src]

