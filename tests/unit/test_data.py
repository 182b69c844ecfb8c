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


# ---------------------------------------------------------------- ShareGPT / alpaca / role_map


def _labelled_texts(dm):
    """(trained text, context text) of each sample, decoded."""
    tok = dm.tokenizer
    out = []
    for s in (dm.train_set[i] for i in range(len(dm.train_set))):
        ids, labels = s["input_ids"], s["labels"]
        out.append((tok.decode([i for i, y in zip(ids, labels) if y != IGNORE]),
                    tok.decode([i for i, y in zip(ids, labels) if y == IGNORE])))
    return out


def test_sharegpt_maps_speakers_and_trains_on_gpt_turns_only(tmp_path):
    row = {"system": "Be brief.", "conversations": [
        {"from": "human", "value": "a?"}, {"from": "gpt", "value": "one"},
        {"from": "human", "value": "b?"}, {"from": "gpt", "value": "two"}]}
    for fmt in ("sharegpt", "auto"):
        dm, _ = _dm(tmp_path, [row], format=fmt)
        dm.setup()
        [(trained, context)] = _labelled_texts(dm)
        assert trained == "one<|im_end|>\ntwo<|im_end|>\n"
        assert "Be brief." in context and "a?" in context and "b?" in context and "one" not in context


def test_sharegpt_role_map_extends_the_speaker_names(tmp_path):
    row = {"conversations": [{"from": "client", "value": "hi"}, {"from": "agent", "value": "hello"}]}
    dm, p = _dm(tmp_path, [row], format="sharegpt")
    with pytest.raises(DataError, match=r"d.jsonl:1: message 0 has role 'client'.*role_map"):
        dm.setup()
    dm, _ = _dm(tmp_path, [row], format="sharegpt", role_map={"client": "user", "agent": "assistant"})
    dm.setup()
    assert _labelled_texts(dm)[0][0] == "hello<|im_end|>\n"


def test_alpaca_joins_instruction_and_input_and_trains_on_output(tmp_path):
    rows = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Say hi.", "input": "", "output": "hi"}]
    for fmt in ("alpaca", "auto"):
        dm, _ = _dm(tmp_path, rows, format=fmt)
        dm.setup()
        (t1, c1), (t2, c2) = _labelled_texts(dm)
        assert (t1, t2) == ("5<|im_end|>\n", "hi<|im_end|>\n")
        assert "Add.\n\n2 and 3" in c1 and "Say hi.<|im_end|>" in c2  # an empty input adds nothing


def test_messages_role_map_renames_roles(tmp_path):
    row = {"messages": [{"role": "human", "content": "q"}, {"role": "bot", "content": "r"}]}
    dm, _ = _dm(tmp_path, [row], role_map={"human": "user", "bot": "assistant"})
    dm.setup()
    assert _labelled_texts(dm)[0][0] == "r<|im_end|>\n"


BAD_FORMATS = [
    ("sharegpt", {"conversations": "hi"}, "d.jsonl:2: column 'conversations' must be a non-empty list"),
    ("sharegpt", {"conversations": [{"from": "human"}]},
     "d.jsonl:2: message 0 of 'conversations' needs a string 'value'"),
    ("sharegpt", {"conversations": [{"from": "human", "value": "x"}]}, "d.jsonl:2: no non-empty assistant"),
    ("sharegpt", {"messages": []}, "d.jsonl:2: missing column 'conversations'"),
    ("alpaca", {"instruction": "x"}, "d.jsonl:2: missing column 'output'"),
    ("alpaca", {"instruction": "x", "input": 3, "output": "y"}, "d.jsonl:2: column 'input' must be a string"),
    ("alpaca", {"instruction": "x", "output": " "}, "d.jsonl:2: empty response"),
]


@pytest.mark.parametrize("fmt,bad,msg", BAD_FORMATS, ids=[m.split(": ", 1)[1][:24] for _, _, m in BAD_FORMATS])
def test_bad_sharegpt_and_alpaca_rows_name_file_line_and_problem(tmp_path, fmt, bad, msg):
    good = {"sharegpt": {"conversations": [{"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]},
            "alpaca": {"instruction": "a", "output": "b"}}[fmt]
    dm, _ = _dm(tmp_path, [good, bad, good], format=fmt)
    with pytest.raises(DataError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        dm.setup()


def test_bad_format_and_role_map_settings_are_config_errors():
    from tokensel.errors import ConfigError

    with pytest.raises(ConfigError, match="data.format='chatml'.*sharegpt, alpaca"):
        SFTDataModule(format="chatml")
    with pytest.raises(ConfigError, match=r"data.role_map=\{'bot': 'robot'\}"):
        SFTDataModule(role_map={"bot": "robot"})


# ---------------------------------------------------------------- train_on, chat_template, rewriting templates

TWO_TURNS = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "one"},
             {"role": "user", "content": "b?"}, {"role": "assistant", "content": "two"}]
PLAIN = ("{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>{% endfor %}"
         "{% if add_generation_prompt %}<|im_start|>assistant:{% endif %}")
# Qwen3-style: a past assistant turn loses its thinking block once a later turn exists
THINKING = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
            "{% if m.role == 'assistant' and not loop.last and '</think>' in m.content %}"
            "{{ m.content.split('</think>')[-1] }}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _trained(tok, s):
    return tok.decode([i for i, y in zip(s["input_ids"], s["labels"]) if y != IGNORE])


def test_train_on_last_assistant_and_all(tok):
    assert _trained(tok, tokenize_chat(tok, TWO_TURNS, 256)) == "one<|im_end|>\ntwo<|im_end|>\n"
    assert _trained(tok, tokenize_chat(tok, TWO_TURNS, 256, train_on="last_assistant")) == "two<|im_end|>\n"
    s = tokenize_chat(tok, TWO_TURNS, 256, train_on="all")
    assert s["labels"] == s["input_ids"] and "a?" in tok.decode(s["input_ids"])


def test_chat_template_string_and_file_override_the_tokenizers(tok, tmp_path):
    s = tokenize_chat(tok, TWO_TURNS, 256, chat_template=PLAIN)
    assert tok.decode(s["input_ids"]) == \
        "<|im_start|>user: a?<|im_end|><|im_start|>assistant: one<|im_end|><|im_start|>user: b?<|im_end|>" \
        "<|im_start|>assistant: two<|im_end|>"
    assert _trained(tok, s) == " one<|im_end|> two<|im_end|>"
    (tmp_path / "t.jinja").write_text(PLAIN)
    dm, _ = _dm(tmp_path, [{"messages": TWO_TURNS}], chat_template=str(tmp_path / "t.jinja"), train_on="last_assistant")
    dm.setup()
    assert _labelled_texts(dm)[0][0] == " two<|im_end|>"


def test_template_that_rewrites_past_turns_falls_back_to_the_last_turn_once(tok, caplog):
    import tokensel.trainer.data as data

    data._WARNED.discard("template-fallback")
    msgs = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "<think>hmm</think>one"},
            {"role": "user", "content": "b?"}, {"role": "assistant", "content": "<think>so</think>two"}]
    with caplog.at_level("WARNING", logger="tokensel.trainer.data"):
        s1 = tokenize_chat(tok, msgs, 256, chat_template=THINKING)
        s2 = tokenize_chat(tok, msgs, 256, chat_template=THINKING)
    assert _trained(tok, s1) == "<think>so</think>two<|im_end|>\n" and s1 == s2
    assert "hmm" not in tok.decode(s1["input_ids"])  # the past turn is rendered as the template wants
    assert sum("only the last assistant turn" in r.message for r in caplog.records) == 1
    one_turn = msgs[:2]  # a single turn is consistent: no fallback needed
    assert _trained(tok, tokenize_chat(tok, one_turn, 256, chat_template=THINKING)) == \
        "<think>hmm</think>one<|im_end|>\n"


def test_bad_train_on_and_missing_template_file_are_config_errors():
    from tokensel.errors import ConfigError

    with pytest.raises(ConfigError, match="data.train_on='prompt'"):
        SFTDataModule(train_on="prompt")
    with pytest.raises(ConfigError, match="data.chat_template='nope.jinja': no such file"):
        SFTDataModule(chat_template="nope.jinja")
