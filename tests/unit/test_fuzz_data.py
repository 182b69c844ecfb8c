"""Property-based checks of the data loaders: random malformed files either load or stop with one
`DataError` that names the file (and the line / row / item) and what is wrong; never another exception, never
a hang. Bounded: few examples per class, no deadline (CPU machines are shared).

Run with `-s` to see how many cases each class tried."""

import collections
import json
import os
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokensel.errors import DataError
from tokensel.trainer.data import PretrainDataModule, SFTDataModule
from tokensel.trainer.lm import load_tokenizer

CASES = collections.Counter()
OUTCOMES = collections.Counter()
N = int(os.environ.get("TOKENSEL_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nfuzz cases per class: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))
    print("fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(OUTCOMES.items())))


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _check(cls, build, path: Path, located: bool = True):
    """`build()` must return samples or raise one clear DataError naming the file (and the row)."""
    CASES[cls] += 1
    try:
        out = build()
    except DataError as e:
        msg = str(e)
        assert str(path) in msg, msg
        if located:  # the line / row / item, or a whole-file problem
            assert any(s in msg for s in (f"{path}:", "row ", "item ", "no usable rows", "top level", "invalid JSON",
                                          "not a parquet", "fewer than one block")), msg
        assert len(msg) < 2000 and "Traceback" not in msg
        OUTCOMES[f"{cls}:error"] += 1
        return None
    assert isinstance(out, list) and out
    OUTCOMES[f"{cls}:loaded"] += 1
    return out


def _build(cls, tok, path, **kw):
    # the module checks its entries when it is made (a missing file stops the run before anything loads)
    dm = cls(train_files=[str(path)], batch_size=2, val_fraction=0.0, **kw)
    dm._tokenizer = tok
    return dm.build_samples([str(path)])


def _sft(tok, path, **kw):
    return lambda: _build(SFTDataModule, tok, path, max_length=64, **kw)


def _pretrain(tok, path, **kw):
    return lambda: _build(PretrainDataModule, tok, path, max_length=8, **kw)


def _write(name: str, data: bytes) -> Path:
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    p = d / name
    p.write_bytes(data)
    return p


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30)
json_values = st.recursive(json_scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(
    st.text(max_size=10), c, max_size=4), max_leaves=12)
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60)
special = st.sampled_from(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\n", "", " ", "\x00", "\u202e", "😀"])
content = st.one_of(text, special, st.lists(special | text, max_size=4).map("".join))
GOOD = {"prompt": "hi", "response": "there"}


@FUZZ
@given(st.lists(st.binary(max_size=80), min_size=1, max_size=6))
def test_random_bytes_jsonl(tok, lines):
    # raw bytes: invalid UTF-8, broken JSON, stray newlines, NUL bytes
    p = _write("d.jsonl", b"\n".join(lines) + b"\n")
    _check("jsonl_random_bytes", _sft(tok, p), p)


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=5), st.sampled_from(["error", "skip"]))
def test_random_json_rows(tok, rows, on_bad_row):
    # well-formed JSON of any shape and type: lists, numbers, nested objects, wrong column types
    p = _write("d.jsonl", "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    _check("jsonl_wrong_types", _sft(tok, p, on_bad_row=on_bad_row), p)


@FUZZ
@given(st.lists(st.fixed_dictionaries({}, optional={
    "prompt": json_scalars | content, "response": json_scalars | content, "system": json_scalars | content}),
    min_size=1, max_size=5))
def test_prompt_response_rows_missing_empty_wrong(tok, rows):
    p = _write("d.jsonl", "\n".join(json.dumps(r) for r in rows).encode() + b"\n")
    _check("jsonl_prompt_response", _sft(tok, p), p)


message = st.fixed_dictionaries({}, optional={
    "role": st.sampled_from(["system", "user", "assistant", "tool", "", "ASSISTANT"]) | json_scalars,
    "content": content | json_scalars}) | json_scalars
messages = st.lists(message, max_size=5) | json_scalars


@FUZZ
@given(st.lists(messages, min_size=1, max_size=4), st.sampled_from(["auto", "messages"]))
def test_chat_messages_missing_roles(tok, convs, fmt):
    p = _write("d.jsonl", "\n".join(json.dumps({"messages": m}) for m in convs).encode() + b"\n")
    _check("jsonl_chat_messages", _sft(tok, p, format=fmt), p)


@FUZZ
@given(st.sampled_from(["prompt", "response", "content"]), st.integers(0, 200_000),
       st.sampled_from(["a", " ", "7 ", "é", "<|im_end|>", "\n"]))
def test_empty_and_huge_fields(tok, field, n, unit):
    s = (unit * n)[:n]
    row = ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": s}]} if field == "content"
           else dict(GOOD, **{field: s}))
    p = _write("d.jsonl", (json.dumps(row) + "\n").encode())
    _check("jsonl_empty_huge_fields", _sft(tok, p), p)


@FUZZ
@given(st.integers(1, 100_000), st.sampled_from(["[", "{\"a\":"]))
def test_deeply_nested_json(tok, depth, opener):
    p = _write("d.jsonl", (opener * depth + "\n" + json.dumps(GOOD) + "\n").encode())
    _check("jsonl_deep_nesting", _sft(tok, p), p)
    q = _write("d.json", (opener * depth).encode())
    _check("json_deep_nesting", _sft(tok, q), q)


@FUZZ
@given(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_random_json_file(tok, data):
    p = _write("d.json", data)
    _check("json_file", _sft(tok, p), p)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_parquet(tok, data):
    p = _write("d.parquet", data)
    _check("parquet_random_bytes", _sft(tok, p), p)


scalar_col = st.sampled_from([
    st.lists(st.text(max_size=20) | st.none(), min_size=1, max_size=4),
    st.lists(st.integers(-5, 5), min_size=1, max_size=4),
    st.lists(st.lists(st.integers(0, 3), max_size=3), min_size=1, max_size=4),
    st.lists(st.binary(max_size=8), min_size=1, max_size=4),
])


@FUZZ
@given(st.dictionaries(st.sampled_from(["prompt", "response", "messages", "text", "x"]),
                       scalar_col.flatmap(lambda s: s), min_size=1, max_size=3))
def test_parquet_wrong_column_types(tok, cols):
    import pyarrow as pa
    import pyarrow.parquet as pq

    n = min(len(v) for v in cols.values())
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    p = d / "d.parquet"
    pq.write_table(pa.table({k: v[:n] for k, v in cols.items()}), p)
    _check("parquet_wrong_types", _sft(tok, p), p)
    _check("parquet_pretrain", _pretrain(tok, p), p)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["t.txt", "t.jsonl"]))
def test_pretrain_random_bytes(tok, data, name):
    p = _write(name, data)
    _check("pretrain_random_bytes", _pretrain(tok, p), p)


@FUZZ
@given(st.lists(json_values, min_size=1, max_size=5))
def test_pretrain_jsonl_wrong_types(tok, rows):
    p = _write("t.jsonl", "\n".join(json.dumps({"text": r}) for r in rows).encode() + b"\n")
    _check("pretrain_jsonl_types", _pretrain(tok, p), p)


@FUZZ
@given(st.text(alphabet=string.printable, max_size=20))
def test_missing_or_odd_paths(tok, name):
    d = Path(tempfile.mkdtemp(prefix="fuzz"))
    p = d / (name.replace("/", "_").replace("\x00", "") or "x")
    _check("missing_paths", _sft(tok, p), p, located=False)
