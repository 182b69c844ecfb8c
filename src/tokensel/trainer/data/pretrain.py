"""Pretraining text -> fixed blocks of tokens, every token labelled."""

from __future__ import annotations

from tokensel.errors import DataError
from tokensel.offline import EMBEDDED_SFT
from tokensel.trainer.data.formats import _as_str
from tokensel.trainer.data.modules import TextDataModule
from tokensel.trainer.data.sources import _collect


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
