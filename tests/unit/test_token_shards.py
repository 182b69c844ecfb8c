"""Token shards (`write_token_shards` -> `TokenBlocks`) give exactly the samples of the old in-memory path.

* Blocks equal, token by token, the old algorithm (one list of every document's ids + EOS, cut into
  blocks, final partial block dropped) for several block lengths, with shards so small that blocks cross
  shard boundaries, and for several batch sizes (documents and characters).
* A 2-process pool (fork and spawn) writes byte-identical files to one process.
* Documents are read lazily, a few batches ahead of what is written.
* Ids are uint32 when the tokenizer has more than 65536 entries.
* A failing document stream, or no documents, leaves no output folder and no temporary folder; a folder
  another process finished first is kept.
* A missing or corrupt folder / meta.json / shard is a `DataError` naming the path and the fix.
* Indices outside [0, len) are an IndexError; the dataset pickles without its memory maps and loads batches.
"""

from __future__ import annotations

import json
import multiprocessing
import pickle
import random

import numpy as np
import pytest
import torch

from tokensel.errors import DataError
from tokensel.trainer.data import shards
from tokensel.trainer.data.shards import TokenBlocks, read_token_meta, write_token_shards
from tokensel.trainer.lm import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def make_docs(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "héllo", "wörld", "✓", "1234", "\n"]
    docs = [" ".join(rng.choice(words) for _ in range(rng.randint(0, 40))) for _ in range(n)]
    return docs + ["", "a", "  two  spaces  "]


def old_blocks(tok, docs: list[str], L: int, eos: int) -> list[dict]:
    """The old PretrainDataModule.build_samples: one Python stream, cut into blocks."""
    stream: list[int] = []
    for t in docs:
        stream += list(tok(t, add_special_tokens=False)["input_ids"]) + [eos]
    return [{"input_ids": b, "labels": list(b)} for b in (stream[i: i + L] for i in range(0, len(stream) - L + 1, L))]


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def no_tmp(out) -> bool:
    return not list(out.parent.glob(out.name + ".tmp-*"))


@pytest.mark.parametrize("shard_tokens,batch_docs,batch_chars", [(7, 5, 2 ** 20), (2 ** 27, 1024, 2 ** 20),
                                                                 (64, 1, 2 ** 20), (13, 1000, 60)])
def test_blocks_equal_old_algorithm(tok, tmp_path, shard_tokens, batch_docs, batch_chars):
    docs = make_docs()
    eos = tok.eos_token_id
    out = tmp_path / "shards"
    meta = write_token_shards(iter(docs), tok, out, eos_id=eos, batch_docs=batch_docs, batch_chars=batch_chars,
                              shard_tokens=shard_tokens, meta={"path": "x.jsonl"})
    stream_len = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs)
    assert meta == read_token_meta(out) == json.loads((out / "meta.json").read_text())
    assert meta["tokens"] == stream_len and meta["docs"] == len(docs) and meta["dtype"] == "uint16"
    assert meta["eos_id"] == eos and meta["source"] == {"path": "x.jsonl"} and meta["format"] == 1
    assert len(meta["shards"]) == -(-stream_len // shard_tokens)
    assert [s["file"] for s in meta["shards"]] == [f"shard-{i:05d}.bin" for i in range(len(meta["shards"]))]
    assert all((out / s["file"]).stat().st_size == 2 * s["tokens"] for s in meta["shards"])
    assert no_tmp(out)
    for L in (1, 3, 7, 16, 50, stream_len):
        ds = TokenBlocks(out, L)
        want = old_blocks(tok, docs, L, eos)
        assert len(ds) == len(want) == stream_len // L and ds.tokens == stream_len
        assert [ds[i] for i in range(len(ds))] == want
        assert ds.lengths().tolist() == [L] * len(ds)
    assert len(TokenBlocks(out, stream_len + 1)) == 0


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_output_byte_identical(tok, tmp_path, monkeypatch, method):
    docs = make_docs(200, seed=1)
    one = tmp_path / "one"
    write_token_shards(docs, tok, one, eos_id=tok.eos_token_id, batch_docs=3, batch_chars=100, shard_tokens=500)
    real = multiprocessing.get_context
    monkeypatch.setattr(shards.multiprocessing, "get_context", lambda method_=None: real(method))
    two = tmp_path / "two"
    write_token_shards((d for d in docs), tok, two, eos_id=tok.eos_token_id, num_proc=2, batch_docs=3,
                       batch_chars=100, shard_tokens=500)
    assert len(list(one.glob("shard-*.bin"))) > 1
    assert folder_bytes(one) == folder_bytes(two)


@pytest.mark.parametrize("num_proc", [1, 2])
def test_documents_are_read_lazily(tok, tmp_path, monkeypatch, num_proc):
    """Memory is O(batch): when a batch is written, at most a few batches beyond it have been read."""
    docs, pulled, ahead = make_docs(400, seed=2), [0], []

    def stream():
        for d in docs:
            pulled[0] += 1
            yield d

    write = shards._ShardWriter.write
    calls = [0]

    def spy(self, arr):
        calls[0] += 1
        ahead.append(pulled[0] - calls[0] * 10)
        write(self, arr)

    monkeypatch.setattr(shards._ShardWriter, "write", spy)
    write_token_shards(stream(), tok, tmp_path / "s", eos_id=tok.eos_token_id, num_proc=num_proc, batch_docs=10)
    assert calls[0] == -(-len(docs) // 10)
    assert max(ahead) <= (0 if num_proc == 1 else (2 * num_proc + 1) * 10)


class BigVocab:
    """A tokenizer-shaped object with 70000 entries: ids above 65535 need uint32."""

    def __len__(self):
        return 70000

    def __call__(self, batch, add_special_tokens=True):
        return {"input_ids": [[69999, len(t), 65536] for t in batch]}


def test_uint32_for_large_vocab(tmp_path):
    out = tmp_path / "big"
    meta = write_token_shards(["a", "bb", "ccc"], BigVocab(), out, eos_id=69998, shard_tokens=5)
    assert meta["dtype"] == "uint32" and meta["tokens"] == 12
    assert sum((out / s["file"]).stat().st_size for s in meta["shards"]) == 4 * 12
    ds = TokenBlocks(out, 4)
    assert [ds[i]["input_ids"] for i in range(len(ds))] == [[69999, 1, 65536, 69998], [69999, 2, 65536, 69998],
                                                            [69999, 3, 65536, 69998]]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_failing_stream_leaves_nothing(tok, tmp_path, num_proc):
    def docs():
        yield from make_docs(30)
        raise RuntimeError("disk read failed")

    out = tmp_path / "shards"
    with pytest.raises(RuntimeError, match="disk read failed"):
        write_token_shards(docs(), tok, out, eos_id=tok.eos_token_id, num_proc=num_proc, batch_docs=4,
                           shard_tokens=16)
    assert not out.exists() and no_tmp(out)


def test_no_documents_or_a_non_string_is_a_data_error(tok, tmp_path):
    out = tmp_path / "empty"
    with pytest.raises(DataError, match=str(out)):
        write_token_shards(iter([]), tok, out, eos_id=tok.eos_token_id)
    assert not out.exists() and no_tmp(out)
    with pytest.raises(DataError, match="document 2 .* NoneType"):
        write_token_shards(["a", "b", None], tok, out, eos_id=tok.eos_token_id)
    assert not out.exists() and no_tmp(out)


def test_folder_finished_first_by_another_process_is_kept(tok, tmp_path):
    out = tmp_path / "shards"
    first = write_token_shards(["first writer"], tok, out, eos_id=tok.eos_token_id)
    before = folder_bytes(out)
    again = write_token_shards(["second writer, other text"], tok, out, eos_id=tok.eos_token_id)
    assert again == first and folder_bytes(out) == before and no_tmp(out)


def test_missing_or_corrupt_folder_is_a_data_error(tok, tmp_path):
    with pytest.raises(DataError, match=str(tmp_path / "nowhere")):
        TokenBlocks(tmp_path / "nowhere", 4)
    out = tmp_path / "shards"
    write_token_shards(make_docs(), tok, out, eos_id=tok.eos_token_id, shard_tokens=100)
    good = (out / "meta.json").read_text()
    meta = json.loads(good)

    def check(text: str | None):
        if text is None:
            (out / "meta.json").unlink()
        else:
            (out / "meta.json").write_text(text)
        with pytest.raises(DataError, match="delete the folder") as e:
            TokenBlocks(out, 4)
        assert str(out) in str(e.value) and "\n" not in str(e.value)

    check(None)
    check("{not json")
    check(json.dumps({**meta, "format": 99}))
    check(json.dumps({**meta, "dtype": "float32"}))
    check(json.dumps({**meta, "tokens": meta["tokens"] + 1}))
    check(json.dumps([1, 2]))
    (out / "meta.json").write_text(good)
    shard = out / meta["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-2])  # truncated
    with pytest.raises(DataError, match=str(shard)):
        TokenBlocks(out, 4)
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        TokenBlocks(out, 4)


def test_index_errors(tok, tmp_path):
    out = tmp_path / "shards"
    write_token_shards(make_docs(), tok, out, eos_id=tok.eos_token_id, shard_tokens=7)
    ds = TokenBlocks(out, 8)
    n = len(ds)
    assert ds[np.int64(n - 1)] == ds[n - 1] == ds[torch.tensor(n - 1)]
    for bad in (-1, -n, n, n + 10):
        with pytest.raises(IndexError):
            ds[bad]
    with pytest.raises(TypeError):
        ds[1.5]
    with pytest.raises(ValueError):
        TokenBlocks(out, 0)


def test_pickles_without_memmaps_and_loads_batches(tok, tmp_path):
    docs = make_docs(100)
    out = tmp_path / "shards"
    write_token_shards(docs, tok, out, eos_id=tok.eos_token_id, shard_tokens=300)
    ds = TokenBlocks(out, 16)
    ds[0], ds[len(ds) - 1]  # open some memory maps
    blob = pickle.dumps(ds)
    assert len(blob) < 4096
    copy = pickle.loads(blob)
    assert all(m is None for m in copy._maps)
    want = old_blocks(tok, docs, 16, tok.eos_token_id)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).tolist()

    def collate(items):
        return {k: torch.tensor([x[k] for x in items]) for k in ("input_ids", "labels")}

    loader = torch.utils.data.DataLoader(copy, batch_size=4, sampler=order, collate_fn=collate, num_workers=0)
    got = [row for b in loader for row in b["input_ids"].tolist()]
    assert got == [want[i]["input_ids"] for i in order]
