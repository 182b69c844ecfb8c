"""Pretraining tokens on disk: written once as flat binary shards, read back as fixed blocks by index.

Why: the old path joined a whole corpus into one Python `list[int]` (about 36 bytes per token: a pointer
and an int object), then copied it into blocks and a dataset: over 100 bytes per token at its peak, hundreds
of GB for a real corpus. `write_token_shards` streams the documents instead: it tokenises one batch of
documents at a time (at most `batch_docs` documents / `batch_chars` characters; optionally in a process
pool, in order) and appends their ids, each document followed by EOS, to raw little-endian uint16 / uint32
shard files, so its memory is O(batch) whatever the corpus size. It is written once, under a temporary name
renamed when complete, so a crash never leaves a folder that looks finished. `TokenBlocks` then presents the
shards as one virtual token stream cut into blocks of `block_len` tokens (the final partial block dropped),
read through memory maps by index: nothing is loaded up front, DataLoader workers share the page cache, and
exact resume is unaffected because a sample is still addressed by its index, as with the in-memory list.

Layout of a folder: `shard-00000.bin`, `shard-00001.bin`, ... and `meta.json`:
{"format": 1, "dtype": "uint16"|"uint32", "shards": [{"file": ..., "tokens": n}], "tokens": total,
"docs": n_docs, "eos_id": ..., "source": {caller's metadata}}.
"""

from __future__ import annotations

import bisect
import itertools
import json
import multiprocessing
import operator
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from tokensel.errors import DataError

FORMAT = 1
META = "meta.json"
DTYPES = ("uint16", "uint32")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.bin"


def token_dtype(tokenizer) -> np.dtype:
    """uint16 when every id of the tokenizer fits (len(tokenizer) <= 65536), else uint32."""
    return np.dtype(np.uint16 if len(tokenizer) <= 2 ** 16 else np.uint32)


def _encode(tokenizer, batch: list[str], eos_id: int, dtype: np.dtype) -> np.ndarray:
    """One batch of documents -> their ids, each document followed by `eos_id`, as one flat array."""
    ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
    n = sum(len(x) for x in ids) + len(ids)
    flat = np.fromiter(itertools.chain.from_iterable(itertools.chain(x, (eos_id,)) for x in ids),
                       dtype=np.int64, count=n)
    lo, hi = (int(flat.min()), int(flat.max())) if n else (0, 0)
    if lo < 0 or hi > np.iinfo(dtype).max:
        raise DataError(f"token id {lo if lo < 0 else hi} does not fit {dtype.name} (len(tokenizer)={len(tokenizer)}):"
                        " the tokenizer returned an id outside its vocabulary")
    return flat.astype(dtype)


_WORKER: dict = {}


def _init_worker(tokenizer, eos_id: int, dtype: str) -> None:
    """Pool initializer: the tokenizer arrives once per worker process, not once per batch."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # num_proc is the parallelism; no nested pools
    _WORKER.update(tokenizer=tokenizer, eos_id=eos_id, dtype=np.dtype(dtype))


def _work(batch: list[str]) -> tuple[int, np.ndarray]:
    return len(batch), _encode(_WORKER["tokenizer"], batch, _WORKER["eos_id"], _WORKER["dtype"])


def _batches(docs: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive batches of at most `max_docs` documents, ended early once they hold `max_chars` characters
    (a longer document is a batch of its own): the tokenizer's working set is about 130 bytes per token of a
    batch, so a batch of whole books must not be taken at once."""
    batch: list[str] = []
    chars = 0
    for i, doc in enumerate(docs):
        if not isinstance(doc, str):
            raise DataError(f"document {i} of the stream is a {type(doc).__name__}, not a str")
        batch.append(doc)
        chars += len(doc)
        if len(batch) == max_docs or chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _throttled(batches: Iterator[list[str]], slots: threading.Semaphore, stop: threading.Event):
    """Hand batches to the pool only while fewer than the semaphore's count are tokenised but not yet
    written: `Pool.imap` would otherwise read ahead and buffer results without bound. Ends on `stop`."""
    for batch in batches:
        while not slots.acquire(timeout=0.1):
            if stop.is_set():
                return
        if stop.is_set():
            return
        yield batch


class _ShardWriter:
    """Appends token arrays to `shard-NNNNN.bin` files in `folder`, `shard_tokens` tokens per file."""

    def __init__(self, folder: Path, shard_tokens: int):
        self.folder, self.shard_tokens = folder, shard_tokens
        self.shards: list[dict] = []
        self.fh = None

    def write(self, arr: np.ndarray) -> None:
        while arr.size:
            if self.fh is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self.close()
                self.shards.append({"file": shard_name(len(self.shards)), "tokens": 0})
                self.fh = open(self.folder / self.shards[-1]["file"], "wb")
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, arr = arr[:room], arr[room:]
            part.astype(part.dtype.newbyteorder("<"), copy=False).tofile(self.fh)
            self.shards[-1]["tokens"] += int(part.size)

    def close(self) -> None:
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def write_token_shards(docs: Iterable[str], tokenizer, out_dir: str | os.PathLike, *, eos_id: int,
                       num_proc: int = 1, batch_docs: int = 1024, batch_chars: int = 2 ** 18,
                       shard_tokens: int = 2 ** 27, meta: dict | None = None, max_tokens: int | None = None) -> dict:
    """Tokenise `docs` (any iterable of str, e.g. a generator over a corpus too big for memory) into token
    shards in `out_dir`; returns the metadata written to `out_dir/meta.json` (see the module docstring).

    Each document becomes `tokenizer(doc, add_special_tokens=False)` ids + [eos_id], documents joined in
    order. Documents are tokenised in batches of `batch_docs` documents or `batch_chars` characters, whichever
    comes first (the batching never changes the output); with `num_proc` > 1 in a process pool (the default
    start method; spawn works too), in order, so the files are byte-identical to `num_proc=1`. Memory: about
    2 x num_proc + 1 batches of text and their ids, whatever the corpus size (a single document longer than
    `batch_chars` is tokenised whole); shards are appended batch by batch.
    Everything is written to `<out_dir>.tmp-<pid>` and renamed to `out_dir` at the end (`cache.build_once`); an
    `out_dir` that is already complete, or that another process renamed into place first, is kept (and its
    metadata returned). On any error the temporary folder is removed and no `out_dir` is left. Raises `DataError`
    when there are no tokens.
    `max_tokens`: stop after that many tokens (the rest of `docs` is never read or tokenised).
    """
    if min(batch_docs, batch_chars, shard_tokens, num_proc) < 1:
        raise ValueError(f"batch_docs={batch_docs}, batch_chars={batch_chars}, shard_tokens={shard_tokens}, "
                         f"num_proc={num_proc}: must be >= 1")
    out_dir = Path(out_dir)
    dtype = token_dtype(tokenizer)
    eos_id = int(eos_id)
    if not 0 <= eos_id <= np.iinfo(dtype).max:
        raise ValueError(f"eos_id={eos_id} does not fit {dtype.name} (len(tokenizer)={len(tokenizer)})")
    from tokensel.trainer.data.cache import build_once

    def build(tmp: Path) -> dict:
        writer = _ShardWriter(tmp, shard_tokens)
        try:
            n_docs = _write_docs(docs, tokenizer, writer, eos_id, dtype, num_proc, batch_docs, batch_chars,
                                 max_tokens)
        finally:
            writer.close()
        total = sum(s["tokens"] for s in writer.shards)
        if total == 0:
            raise DataError(f"{out_dir}: no tokens to write ({n_docs} documents); nothing was written")
        return {"format": FORMAT, "dtype": dtype.name, "shards": writer.shards, "tokens": total, "docs": n_docs,
                "eos_id": eos_id, "source": dict(meta or {})}

    build_once(out_dir, build, None)  # temporary sibling, then rename; another process's finished copy is kept
    return read_token_meta(out_dir)  # exactly what the folder holds (`meta` values JSON cannot hold become str)


def _write_docs(docs, tokenizer, writer: _ShardWriter, eos_id: int, dtype: np.dtype, num_proc: int, batch_docs: int,
                batch_chars: int, max_tokens: int | None) -> int:
    """Tokenise `docs` batch by batch (in a pool when num_proc > 1, in order) into `writer`, stopping at
    `max_tokens`; returns the number of documents read."""
    n_docs, written = 0, 0

    def put(arr: np.ndarray) -> bool:
        """Write `arr` (cut at max_tokens); True when max_tokens is reached."""
        nonlocal written
        if max_tokens is not None:
            arr = arr[: max_tokens - written]
        writer.write(arr)
        written += int(arr.size)
        return max_tokens is not None and written >= max_tokens

    batches = _batches(docs, batch_docs, batch_chars)
    if num_proc == 1:
        for batch in batches:
            n_docs += len(batch)
            if put(_encode(tokenizer, batch, eos_id, dtype)):
                break
        return n_docs
    slots, stop = threading.Semaphore(2 * num_proc), threading.Event()
    pool = multiprocessing.get_context().Pool(num_proc, initializer=_init_worker,
                                              initargs=(tokenizer, eos_id, dtype.name))
    try:
        full = False
        for n, arr in pool.imap(_work, _throttled(batches, slots, stop)):
            slots.release()
            n_docs += n
            if full := put(arr):
                break
    except BaseException:
        stop.set()  # unblocks the pool's task thread so that terminate() can join it
        pool.terminate()
        raise
    else:
        if full:  # enough tokens: the batches still queued are not needed
            stop.set()
            pool.terminate()
        else:
            pool.close()
    finally:
        pool.join()
    return n_docs


def _corrupt(folder: Path, what: str) -> DataError:
    return DataError(f"{folder}: {what}; delete the folder {folder} to rebuild the token shards")


def read_token_meta(folder: str | os.PathLike) -> dict:
    """meta.json of a token-shard folder, checked against the shard files (count, size); `DataError` if not."""
    folder = Path(folder)
    path = folder / META
    if not folder.is_dir():
        raise DataError(f"{folder}: no token-shard folder there; build it with write_token_shards "
                        f"(delete any partial copy of the folder to rebuild it)")
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise _corrupt(folder, f"{path} is missing (an unfinished or foreign folder)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _corrupt(folder, f"{path} is unreadable ({str(e).splitlines()[0]})") from None
    try:
        ok = (isinstance(meta, dict) and meta.get("format") == FORMAT and meta.get("dtype") in DTYPES
              and isinstance(meta.get("shards"), list) and isinstance(meta.get("tokens"), int)
              and all(isinstance(s, dict) and isinstance(s.get("file"), str) and isinstance(s.get("tokens"), int)
                      and s["tokens"] >= 0 and Path(s["file"]).name == s["file"] for s in meta["shards"])
              and sum(s["tokens"] for s in meta["shards"]) == meta["tokens"])
    except (TypeError, AttributeError):
        ok = False
    if not ok:
        raise _corrupt(folder, f"{path} is not token-shard metadata of format {FORMAT} "
                               "(needs dtype uint16|uint32 and shards whose token counts sum to tokens)")
    itemsize = np.dtype(meta["dtype"]).itemsize
    for s in meta["shards"]:
        f = folder / s["file"]
        size = f.stat().st_size if f.is_file() else None
        if size != s["tokens"] * itemsize:
            raise _corrupt(folder, f"shard {f} is {'missing' if size is None else f'{size} bytes'}, "
                                   f"meta.json says {s['tokens']} {meta['dtype']} tokens")
    return meta


class TokenBlocks(Dataset):
    """The token shards in `folder` as one stream cut into `len(self) = tokens // block_len` blocks (a final
    partial block is dropped). `self[i]` is {"input_ids": block, "labels": copy of block} (lists of int),
    read through memory maps that each process opens on first access (pickling drops them)."""

    def __init__(self, folder: str | os.PathLike, block_len: int):
        block_len = operator.index(block_len)
        if block_len < 1:
            raise ValueError(f"block_len={block_len}: must be >= 1")
        self.folder, self.block_len = Path(folder), block_len
        self.meta = read_token_meta(self.folder)
        self.dtype = np.dtype(self.meta["dtype"]).newbyteorder("<")
        shards = [s for s in self.meta["shards"] if s["tokens"]]
        self._files = [s["file"] for s in shards]
        self._sizes = [s["tokens"] for s in shards]
        self._starts = [0, *itertools.accumulate(self._sizes)][:-1]  # first stream position of each shard
        self.tokens: int = self.meta["tokens"]
        self._n = self.tokens // block_len
        self._maps: list[np.memmap | None] = [None] * len(self._files)

    def __len__(self) -> int:
        return self._n

    def lengths(self) -> np.ndarray:
        """Every sample's length: block_len, len(self) times."""
        return np.full(self._n, self.block_len, dtype=np.int64)

    def _map(self, k: int) -> np.memmap:
        m = self._maps[k]
        if m is None:
            m = self._maps[k] = np.memmap(self.folder / self._files[k], dtype=self.dtype, mode="r",
                                          shape=(self._sizes[k],))
        return m

    def block(self, i: int) -> np.ndarray:
        """Block `i` as a numpy array (a copy, in the shards' dtype)."""
        i = operator.index(i)
        if not 0 <= i < self._n:
            raise IndexError(f"block index {i} out of range for {self._n} blocks of {self.block_len} tokens "
                             f"in {self.folder}")
        start, end = i * self.block_len, (i + 1) * self.block_len
        k = bisect.bisect_right(self._starts, start) - 1
        parts = []
        while start < end:
            lo = start - self._starts[k]
            hi = min(end - self._starts[k], self._sizes[k])
            parts.append(self._map(k)[lo:hi])
            start += hi - lo
            k += 1
        return np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])

    def __getitem__(self, i: int) -> dict:
        ids = self.block(i).tolist()
        return {"input_ids": ids, "labels": list(ids)}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._files)
        return state
