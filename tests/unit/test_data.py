"""SFT / pretraining data: response-only labels, packing, and a clear message for each malformed row."""

import json

import pytest
import torch

from tokensel.errors import DataError
from tokensel.trainer.data import IGNORE, PretrainDataModule, SFTDataModule, pack_samples, tokenize_chat
from tokensel.trainer.lm import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _dm(tmp_path, rows, **kw):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    dm = SFTDataModule(train_files=[str(p)], tokenizer=None, max_length=64, batch_size=2, val_fraction=0.0, **kw)
    return dm, p


def test_labels_only_on_response_tokens(tok):
    msgs = [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 5."}]
    s = tokenize_chat(tok, msgs, 128)
    labelled = [i for i, y in zip(s["input_ids"], s["labels"]) if y != IGNORE]
    # the labelled span is exactly the assistant content plus the template's end-of-turn token
    assert tok.decode(labelled) == "It is 5.<|im_end|>\n"
    prompt_part = [i for i, y in zip(s["input_ids"], s["labels"]) if y == IGNORE]
    assert "What is 2+3?" in tok.decode(prompt_part) and "It is 5" not in tok.decode(prompt_part)


def test_multi_turn_labels_every_assistant_turn(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "a"},
            {"role": "assistant", "content": "one"}, {"role": "user", "content": "b"},
            {"role": "assistant", "content": "two"}]
    s = tokenize_chat(tok, msgs, 256)
    text = tok.decode([i for i, y in zip(s["input_ids"], s["labels"]) if y != IGNORE])
    assert text == "one<|im_end|>\ntwo<|im_end|>\n"


def test_batches_have_no_labels_on_prompt_or_padding(tmp_path):
    rows = [{"prompt": "p" * (i + 1), "response": "r" * (3 * i + 1)} for i in range(6)]
    dm, _ = _dm(tmp_path, rows)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()
    assert (batch["sample_index"][batch["attention_mask"] == 0] == -1).all()
    for b in range(batch["labels"].shape[0]):
        lab = batch["labels"][b][batch["labels"][b] != IGNORE]
        assert set(lab.tolist()) <= set(batch["input_ids"][b].tolist())


def test_packing_block_diagonal_and_positions(tmp_path):
    rows = [{"prompt": "q", "response": "x" * (i + 2)} for i in range(5)]
    dm, _ = _dm(tmp_path, rows, packing=True)
    dm.max_length = 64
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    m = batch["attention_mask_4d"][0, 0]
    si = batch["sample_index"][0]
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            same = si[i] == si[j] and si[i] >= 0 and j <= i
            assert bool(m[i, j]) == bool(same) or (si[i] < 0 and i == j)
    assert batch["position_ids"][0][si == si[0]].tolist() == list(range(int((si == si[0]).sum())))


def test_pack_samples_first_fit():
    s = [{"input_ids": [0] * n} for n in (5, 4, 3, 2)]
    assert pack_samples(s, 7) == [[0, 3], [1, 2]]


BAD = [
    ('{"prompt": "a", "response": "b"', "d.jsonl:2: bad JSON"),
    ({"prompt": "a"}, "d.jsonl:2: missing column 'response'"),
    ({"prompt": "a", "response": "   "}, "d.jsonl:2: empty response"),
    ({"prompt": 3, "response": "b"}, "d.jsonl:2: column 'prompt' must be a string, got int"),
    ([1, 2], "d.jsonl:2: each row must be a JSON object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "d.jsonl:2: message 0 has role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "d.jsonl:2: no non-empty assistant message"),
]


@pytest.mark.parametrize("bad,msg", BAD, ids=[m.split(": ", 1)[1][:20] for _, m in BAD])
def test_bad_rows_name_file_line_and_problem(tmp_path, bad, msg):
    good = {"prompt": "hi", "response": "there"}
    dm, _ = _dm(tmp_path, [good, bad, good])
    with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        dm.setup()
    dm, _ = _dm(tmp_path, [good, bad, good], on_bad_row="skip")
    dm.setup()
    assert len(dm.train_set) == 2  # the bad row is skipped and counted, the rest load


def test_invalid_utf8_names_the_line(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff", "response": "b"}\n')
    dm = SFTDataModule(train_files=[str(p)], val_fraction=0.0)
    with pytest.raises(DataError, match="d.jsonl:2: invalid UTF-8"):
        dm.setup()


def test_column_map_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_list([{"question": f"q{i}", "answer": f"a{i}"} for i in range(4)])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    for path in ("d.parquet", "saved"):
        dm = SFTDataModule(train_files=[str(tmp_path / path)], column_map={"prompt": "question", "response": "answer"},
                           val_fraction=0.0)
        dm.setup()
        assert len(dm.train_set) == 4


def test_pretrain_blocks_label_every_token(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("The quick brown fox jumps over the lazy dog.\n" * 40)
    dm = PretrainDataModule(train_files=[str(p)], max_length=16, val_fraction=0.0)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["input_ids"].shape[1] == 16 and torch.equal(b["input_ids"], b["labels"])
