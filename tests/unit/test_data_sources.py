"""Data as users bring it: entries (files, folders, hub ids, splits), tool turns, the plain no-template format,
mixtures, the tokenise-once cache and out-of-core pretraining blocks. Labels are checked token by token."""

import json
import logging

import datasets
import numpy as np
import pytest
import torch

import tokensel.trainer.data.formats as formats
import tokensel.trainer.data.sft as sft
from tokensel.errors import ConfigError, DataError
from tokensel.trainer.data import (
    IGNORE,
    MixtureSampler,
    PretrainDataModule,
    ResumableSampler,
    SFTDataModule,
    parse_source,
    parse_sources,
    tokenize_chat,
)
from tokensel.trainer.lm import load_tokenizer

ROWS = [{"prompt": f"question {i}", "response": f"answer {i} " + "x" * i} for i in range(12)]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _sft(tmp_path, train_files, **kw):
    kw = {"max_length": 64, "batch_size": 2, "val_fraction": 0.0, "cache_dir": str(tmp_path / "cache"), **kw}
    return SFTDataModule(train_files=train_files, **kw)


def _decoded_labels(tok, s):
    return tok.decode([i for i, y in zip(s["input_ids"], s["labels"]) if y != IGNORE])


# ---------------------------------------------------------------- entries


def test_entries_parse_paths_splits_mappings_and_hub_ids(tmp_path):
    f = _jsonl(tmp_path / "a.jsonl", ROWS)
    assert parse_source(str(f), "k").path == str(f) and parse_source(str(f), "k").split is None
    assert (parse_source("org/name:train_sft", "k").path, parse_source("org/name:train_sft", "k").split) == \
        ("org/name", "train_sft")
    s = parse_source("org/name:train[:100]", "k")
    assert (s.path, s.split, s.kind) == ("org/name", "train[:100]", "hub")
    m = parse_source({"path": "org/name", "split": "test", "subset": "main", "weight": 2, "name": "gsm"}, "k")
    assert (m.split, m.subset, m.weight, m.label) == ("test", "main", 2.0, "gsm")
    assert parse_source("org/name", "k").label == "name"
    with pytest.raises(ConfigError, match="unknown: wieght"):
        parse_source({"path": "x/y", "wieght": 1}, "data.train_files")
    with pytest.raises(ConfigError, match="weight=-1 must be a positive"):
        parse_source({"path": "x/y", "weight": -1}, "data.train_files")
    with pytest.raises(DataError, match="no such file or folder, and not a hub dataset id"):
        parse_source(str(tmp_path / "missing.jsonl"), "data.train_files")
    with pytest.raises(ConfigError, match="a single file has no splits"):
        parse_source({"path": str(f), "split": "test"}, "data.train_files")
    with pytest.raises(ConfigError, match="some entries have a weight"):
        parse_sources([{"path": str(f), "weight": 1}, "org/name"], "data.train_files")
    with pytest.raises(ConfigError, match="both named 'a'"):
        parse_sources([str(f), str(f)], "data.train_files")


def test_csv_tsv_parquet_and_saved_splits_load_with_row_locations(tmp_path):
    import pandas as pd

    df = pd.DataFrame(ROWS[:5])
    df.to_csv(tmp_path / "d.csv", index=False)
    df.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    df.to_parquet(tmp_path / "d.parquet")
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS[:5]),
                               "test": datasets.Dataset.from_list(ROWS[5:8])})
    dd.save_to_disk(str(tmp_path / "saved"))
    ref = _sft(tmp_path, [str(tmp_path / "d.csv")])
    want = ref.build_samples([str(tmp_path / "d.csv")])
    assert len(want) == 5
    for entry in (str(tmp_path / "d.tsv"), str(tmp_path / "d.parquet"), str(tmp_path / "saved")):
        assert _sft(tmp_path, [entry]).build_samples([entry]) == want, entry
    test_split = _sft(tmp_path, [f"{tmp_path / 'saved'}:test"]).build_samples([f"{tmp_path / 'saved'}:test"])
    assert [s["input_ids"] for s in test_split] == [s["input_ids"] for s in
                                                    _sft(tmp_path, []).build_samples([_jsonl(tmp_path / "t.jsonl",
                                                                                             ROWS[5:8]).as_posix()])]
    with pytest.raises(DataError, match=r"saved:nope: no split 'nope'; the folder has train, test"):
        _sft(tmp_path, [f"{tmp_path / 'saved'}:nope"]).build_samples([f"{tmp_path / 'saved'}:nope"])
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,response\nonly a prompt,\n")
    with pytest.raises(DataError, match=r"bad.csv: row 0: column 'response' must be a string"):
        _sft(tmp_path, [str(bad)]).build_samples([str(bad)])


def test_a_hub_id_loads_from_a_local_folder_offline(tmp_path, monkeypatch, tok):
    """`org/name` that is a local folder of data files (what `load_dataset` reads first) loads its split with
    no network; a hub id that is neither local nor cached fails with one line saying what to do."""
    folder = tmp_path / "myorg" / "gsm_mini"
    folder.mkdir(parents=True)
    _jsonl(folder / "train.jsonl", ROWS[:6])
    _jsonl(folder / "test.jsonl", ROWS[6:9])
    monkeypatch.chdir(tmp_path)
    dm = _sft(tmp_path, ["myorg/gsm_mini:test"])
    dm._tokenizer = tok
    got = dm.build_samples(["myorg/gsm_mini:test"])
    assert [_decoded_labels(tok, s) for s in got] == [f"{r['response']}<|im_end|>\n" for r in ROWS[6:9]]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    dm = _sft(tmp_path, ["no-such-org-xyz/no-such-set"])
    dm._tokenizer = tok
    with pytest.raises(DataError, match=r"no-such-org-xyz/no-such-set: cannot load .*offline, the dataset must be"):
        dm.build_samples(["no-such-org-xyz/no-such-set"])


def test_hub_ids_pass_subset_split_and_streaming_to_datasets(tmp_path, monkeypatch, tok):
    calls = []

    def fake_load_dataset(path, name=None, split=None, streaming=False, **kw):
        calls.append((path, name, split, streaming))
        ds = datasets.Dataset.from_list(ROWS[:4])
        return ds.to_iterable_dataset() if streaming else ds
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    dm = _sft(tmp_path, [{"path": "org/set", "subset": "main", "split": "train[:4]"}], streaming=True)
    dm._tokenizer = tok
    dm.setup()
    assert len(dm.train_set) == 4 and ("org/set", "main", "train[:4]", True) in calls
    dm = _sft(tmp_path, ["org/set"], split="validation")  # the module's split for entries naming none
    dm._tokenizer = tok
    dm.setup()
    assert ("org/set", None, "validation", False) in calls


# ---------------------------------------------------------------- tool turns and the plain format

TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\ntools: {{ tools | map(attribute='name') | join(',') }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "{% for c in m.get('tool_calls', []) %}<call>{{ c['function']['name'] }}({{ c['function']['arguments'] | tojson }})"
    "</call>{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_tool_calls_train_and_tool_results_do_not(tmp_path, tok):
    row = {"messages": [
        {"role": "user", "content": "weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": "{\"city\": \"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain, 4C"},
        {"role": "assistant", "content": "Rain and 4C."}],
        "tools": json.dumps([{"name": "get_weather", "parameters": {"city": "string"}}])}
    f = _jsonl(tmp_path / "tools.jsonl", [row])
    dm = _sft(tmp_path, [str(f)], chat_template=TOOL_TEMPLATE, max_length=256)
    dm._tokenizer = tok
    (s,) = dm.build_samples([str(f)])
    text = tok.decode(s["input_ids"])
    assert text.startswith("<|im_start|>system\ntools: get_weather<|im_end|>")  # the row's tools reach the template
    assert _decoded_labels(tok, s) == ('<call>get_weather({"city": "Oslo"})</call><|im_end|>\nRain and 4C.'
                                       "<|im_end|>\n")
    assert "rain, 4C" in text and "rain, 4C" not in _decoded_labels(tok, s)  # the tool's result is context


def test_sharegpt_function_call_and_observation_turns(tmp_path, tok):
    row = {"conversations": [{"from": "human", "value": "2+2?"},
                             {"from": "function_call",
                              "value": "{\"name\": \"calc\", \"arguments\": {\"x\": \"2+2\"}}"},
                             {"from": "observation", "value": "4"}, {"from": "gpt", "value": "It is 4."}]}
    f = _jsonl(tmp_path / "sg.jsonl", [row, {"conversations": [{"from": "human", "value": "q"},
                                                                {"from": "function_call", "value": "{not json"}]}])
    dm = _sft(tmp_path, [str(f)], chat_template=TOOL_TEMPLATE, max_length=256, on_bad_row="skip")
    dm._tokenizer = tok
    (s,) = dm.build_samples([str(f)])
    assert _decoded_labels(tok, s) == '<call>calc({"x": "2+2"})</call><|im_end|>\nIt is 4.<|im_end|>\n'
    dm = _sft(tmp_path, [str(f)], chat_template=TOOL_TEMPLATE, max_length=256)
    dm._tokenizer = tok
    with pytest.raises(DataError, match=r"sg.jsonl:2: message 1 tool_calls is not valid JSON"):
        dm.build_samples([str(f)])


def test_tool_calls_on_a_user_turn_are_refused_with_the_line(tmp_path):
    f = _jsonl(tmp_path / "t.jsonl", [{"messages": [
        {"role": "user", "content": "x", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "assistant", "content": "y"}]}])
    with pytest.raises(DataError, match=r"t.jsonl:1: message 0 has tool_calls but role 'user'"):
        _sft(tmp_path, [str(f)]).build_samples([str(f)])


def test_plain_format_without_a_template_has_bos_eos_and_warns_once(caplog):
    gpt2 = load_tokenizer("gpt2")
    assert not gpt2.chat_template and gpt2.bos_token_id == gpt2.eos_token_id == 50256
    formats._WARNED.discard("plain-format")
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    with caplog.at_level(logging.WARNING, logger="tokensel.trainer.data"):
        s = tokenize_chat(gpt2, msgs, 64)
        tokenize_chat(gpt2, msgs, 64)
    assert sum("no chat template" in r.message for r in caplog.records) == 1
    hi, hello = gpt2("Hi\n")["input_ids"], gpt2("Hello")["input_ids"]
    assert s["input_ids"] == [50256] + hi + hello + [50256]  # BOS, user turn + newline, answer, EOS
    assert s["labels"] == [IGNORE] * (1 + len(hi)) + hello + [50256]  # BOS and the prompt never train


# ---------------------------------------------------------------- mixtures


def test_mixture_sampler_draws_in_its_weights_and_is_a_function_of_the_epoch():
    groups = [list(range(0, 100)), list(range(100, 150)), list(range(150, 160))]
    s = MixtureSampler(groups, [0.6, 0.3, 0.1], seed=3, batch_size=10, num_samples=6000)
    order = list(s)
    share = np.bincount(np.searchsorted([100, 150], order, side="right"), minlength=3) / len(order)
    # 6000 draws: the binomial sd of a share is at most 0.0065; 0.02 is over 3 sd
    assert np.abs(share - [0.6, 0.3, 0.1]).max() < 0.02, share
    assert set(order[:100]) <= set(range(160)) and len(set(order)) == 160  # every source's samples are drawn
    # a source's samples come in its own permutation: the first 10 draws of source 2 are 10 distinct samples
    assert len({i for i in order if i >= 150}) == 10
    again = MixtureSampler(groups, [0.6, 0.3, 0.1], seed=3, batch_size=10, num_samples=6000)
    assert list(again) == order
    again.fast_forward(0, 7)
    assert list(again) == order[70:]  # resume mid-epoch: exactly the rest
    again.set_epoch(1)
    assert list(again) != order
    # two ranks of batch 5 see the global batches of one rank of batch 10
    ranks = [list(MixtureSampler(groups, [0.6, 0.3, 0.1], 3, 5, r, 2, num_samples=6000)) for r in range(2)]
    merged = [x for g in range(0, 3000, 5) for x in ranks[0][g:g + 5] + ranks[1][g:g + 5]]
    assert merged == order
    with pytest.raises(ValueError):
        MixtureSampler([[0], []], [1, 1], 0, 1)


def test_weighted_sources_mix_resume_exactly_and_name_their_validation_loss(tmp_path, tok):
    a = _jsonl(tmp_path / "alpha.jsonl", [{"prompt": f"a{i}", "response": "A" * (i % 5 + 1)} for i in range(40)])
    b = _jsonl(tmp_path / "beta.jsonl", [{"prompt": f"b{i}", "response": "B" * (i % 5 + 1)} for i in range(10)])
    entries = [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 3.0}]

    def make():
        dm = _sft(tmp_path, entries, val_fraction=0.2, batch_size=4, seed=5)
        dm._tokenizer = tok
        dm.setup()
        return dm
    dm = make()
    assert dm.val_source_names == ["alpha", "beta"] and isinstance(dm._sampler(0, 1), MixtureSampler)
    batches = list(dm.train_dataloader())
    src = torch.cat([bt["source_index"][:, 1] for bt in batches])
    # 3:1 for beta although it has a quarter of alpha's rows (oversampled); 40 draws, so a loose check
    assert 0.6 < float((src == 1).float().mean()) < 0.9
    resumed = make()
    resumed.load_state_dict({"epoch": 0, "batches_done": 4})
    tail = list(resumed.train_dataloader())
    assert len(tail) == len(batches) - 4
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(tail, batches[4:]))
    val = next(iter(dm.val_dataloader()))
    assert set(val["source_index"][val["attention_mask"] == 1].tolist()) <= {0, 1}


def test_each_rank_scores_its_own_share_of_the_validation_set_padded_with_unlabelled_copies():
    from tokensel.trainer.data import IGNORE
    from tokensel.trainer.data.sampler import EvalShard

    base = [{"input_ids": [i, i + 1], "labels": [i, i + 1], "sample_index": i} for i in range(7)]
    shares = [EvalShard(base, r, 3) for r in range(3)]
    assert [len(s) for s in shares] == [3, 3, 3]  # the same batch count on every rank (ZeRO-3 collectives)
    items = [s[i] for s in shares for i in range(len(s))]
    scored = sorted(x["sample_index"] for x in items if x["labels"][0] != IGNORE)
    assert scored == list(range(7))  # every sample scored exactly once
    assert [x["sample_index"] for x in shares[0]] == [0, 3, 6]
    pads = [x for x in items if x["labels"][0] == IGNORE]
    assert len(pads) == 2 and all(x["labels"] == [IGNORE, IGNORE] for x in pads)
    assert base[1]["labels"] == [1, 2]  # the copies do not touch the set itself
    packed = EvalShard([[base[0], base[1]], [base[2]], [base[3]]], 1, 2)  # packed rows: row 1, then a pad
    assert [s["labels"] for s in packed[0]] == [[2, 3]]
    assert [(s["input_ids"], s["labels"]) for s in packed[1]] == [([0, 1], [IGNORE] * 2), ([1, 2], [IGNORE] * 2)]
    assert [len(EvalShard(base, r, 1)) for r in range(1)] == [7] and EvalShard(base, 0, 1)[6] is base[6]
    with pytest.raises(IndexError):
        shares[0][3]
    images = [{"image": i, "label": i % 2, "index": i} for i in range(5)]  # weighted: images have no token labels
    w = [[(x["index"], x["label"], x["eval_weight"]) for x in EvalShard(images, r, 2, weighted=True)] for r in (0, 1)]
    assert w == [[(0, 0, 1.0), (2, 0, 1.0), (4, 0, 1.0)], [(1, 1, 1.0), (3, 1, 1.0), (0, 0, 0.0)]]


def test_per_source_validation_loss_is_each_sources_token_weighted_mean():
    from torchmetrics.aggregation import MeanMetric

    from tokensel.trainer.lm import SelectiveLM

    means = {"loss/wiki": MeanMetric(), "loss/math": MeanMetric()}
    loss = torch.tensor([[0.0, 1.0, 3.0], [0.0, 2.0, 9.0]])
    valid = torch.tensor([[False, True, True], [False, True, False]])
    source = torch.tensor([[0, 0, 0], [1, 1, -1]])
    SelectiveLM.update_per_source(means, loss, valid, source, ["wiki", "math"])
    # a second batch, uneven: wiki gets one more token, math none
    SelectiveLM.update_per_source(means, torch.tensor([[5.0, 7.0]]), torch.tensor([[True, False]]),
                                  torch.tensor([[0, 1]]), ["wiki", "math"])
    assert float(means["loss/wiki"].compute()) == pytest.approx((1 + 3 + 5) / 3)  # not the mean of batch means
    assert float(means["loss/math"].compute()) == pytest.approx(2.0)


# ---------------------------------------------------------------- tokenise once


def test_tokenisation_runs_once_and_a_changed_setting_or_file_retokenises(tmp_path, tok, monkeypatch):
    f = _jsonl(tmp_path / "d.jsonl", ROWS)
    calls = {"n": 0}
    real = sft.tokenize_chat

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)
    monkeypatch.setattr(sft, "tokenize_chat", counting)

    def run(**kw):
        dm = _sft(tmp_path, [str(f)], **kw)
        dm._tokenizer = tok
        dm.setup()
        items = sorted((dm.train_set[i] for i in range(len(dm.train_set))), key=lambda s: s["sample_index"])
        return [s["input_ids"] for s in items]
    first = run()
    assert calls["n"] == len(ROWS)
    assert run() == first and calls["n"] == len(ROWS), "the second run tokenised again"
    assert len(list((tmp_path / "cache").iterdir())) == 1
    run(max_length=40)
    assert calls["n"] == 2 * len(ROWS), "a new max_length must retokenise"
    run(train_on="all")
    assert calls["n"] == 3 * len(ROWS)
    run(max_samples=5)
    assert calls["n"] == 3 * len(ROWS) + 5, "max_samples stops before tokenising the rest"
    _jsonl(f, ROWS[::-1])
    assert run() == first[::-1] and calls["n"] == 4 * len(ROWS) + 5, "an edited file must retokenise"
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_a_failed_tokenisation_leaves_no_cache_entry(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", ROWS[:3])
    with open(f, "a") as fh:
        fh.write("{broken\n")
    dm = _sft(tmp_path, [str(f)])
    dm._tokenizer = tok
    with pytest.raises(DataError, match=r"d.jsonl:4: bad JSON"):
        dm.setup()
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_prepare_data_fills_the_cache_that_setup_reads(tmp_path, tok, monkeypatch):
    f = _jsonl(tmp_path / "d.jsonl", ROWS)
    dm = _sft(tmp_path, [str(f)])
    dm._tokenizer = tok
    dm.prepare_data()  # Lightning: local rank 0 only
    other_rank = _sft(tmp_path, [str(f)])
    other_rank._tokenizer = tok
    monkeypatch.setattr(sft, "tokenize_chat", lambda *a, **k: pytest.fail("setup tokenised again"))
    other_rank.setup()
    assert len(other_rank.train_set) == len(ROWS)


def test_two_processes_tokenise_exactly_like_one(tmp_path, tok):
    f = _jsonl(tmp_path / "d.jsonl", ROWS * 30)  # 360 rows: two chunks of 256 rows
    one = _sft(tmp_path, [str(f)], cache=False)
    one._tokenizer = tok
    two = _sft(tmp_path, [str(f)], cache=False, num_proc=2)
    two._tokenizer = tok
    assert one.build_samples([str(f)]) == two.build_samples([str(f)])


# ---------------------------------------------------------------- pretraining out of core


def _old_blocks(tok, texts, L):
    """The old in-memory algorithm: one token list, cut into blocks (the oracle)."""
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return [stream[i: i + L] for i in range(0, len(stream) - L + 1, L)]


def test_pretraining_blocks_come_from_shards_equal_to_the_old_list(tmp_path, tok):
    texts = [f"document {i} " + "word " * (i % 13) for i in range(200)]
    f = _jsonl(tmp_path / "c.jsonl", [{"text": t} for t in texts])
    for L, cap in ((16, None), (37, None), (16, 10)):
        dm = PretrainDataModule(train_files=[str(f)], max_length=L, val_fraction=0.0, shuffle=False,
                                cache_dir=str(tmp_path / "cache"), max_samples=cap)
        dm._tokenizer = tok
        dm.setup()
        want = _old_blocks(tok, texts, L)[:cap]
        got = sorted((dm.train_set[i] for i in range(len(dm.train_set))), key=lambda s: s["sample_index"])
        assert [g["input_ids"] for g in got] == want and all(g["labels"] == g["input_ids"] for g in got)
    # the shards do not depend on the block length, so lengths 16 and 37 share one entry; the cap stops early
    entries = sorted((json.loads((d / "meta.json").read_text()) for d in (tmp_path / "cache").glob("pretrain-*")),
                     key=lambda m: m["tokens"])
    assert len(entries) == 2 and entries[0]["tokens"] == 10 * 16 + 1 < entries[1]["tokens"]
    assert all(p.suffix == ".bin" for p in (tmp_path / "cache").glob("pretrain-*/*") if p.name != "meta.json")


def test_resumable_sampler_still_resumes_exactly():
    s = ResumableSampler(50, True, 1, 4)
    full = list(s)
    s.fast_forward(0, 3)
    assert list(s) == full[12:]


def test_max_tokens_stops_the_shard_writer_with_one_or_two_processes(tmp_path, tok):
    from tokensel.trainer.data.shards import TokenBlocks, write_token_shards

    texts = [f"doc {i} " + "w " * (i % 7) for i in range(3000)]
    metas = [write_token_shards(iter(texts), tok, tmp_path / f"s{n}", eos_id=2, num_proc=n, batch_docs=50,
                                max_tokens=777) for n in (1, 2)]
    assert [m["tokens"] for m in metas] == [777, 777] and metas[0]["docs"] < 3000
    a, b = TokenBlocks(tmp_path / "s1", 7), TokenBlocks(tmp_path / "s2", 7)
    assert len(a) == 111 and [a[i] for i in range(111)] == [b[i] for i in range(111)]
    assert [x for i in range(111) for x in a[i]["input_ids"]] == [x for bl in _old_blocks(tok, texts[:400], 7)
                                                                   for x in bl][:777]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".txt"])
def test_byte_order_mark_and_crlf_line_ends_read_like_clean_files(tmp_path, tok, suffix):
    """Files from spreadsheet and Windows tools (a UTF-8 BOM, CRLF line ends) are valid data: same samples."""
    rows = ROWS[:4]
    if suffix == ".jsonl":
        text = "".join(json.dumps(r) + "\n" for r in rows)
    elif suffix == ".json":
        text = json.dumps(rows, indent=1) + "\n"
    elif suffix == ".csv":
        text = "prompt,response\n" + "".join(f"{r['prompt']},{r['response']}\n" for r in rows)
    else:
        text = "".join(f"{r['prompt']} {r['response']}\n" for r in rows)
    clean, dirty = tmp_path / f"clean{suffix}", tmp_path / f"dirty{suffix}"
    clean.write_bytes(text.encode())
    dirty.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    cls = PretrainDataModule if suffix == ".txt" else SFTDataModule
    kw = {"max_length": 4} if suffix == ".txt" else {}
    got = []
    for f in (clean, dirty):
        dm = cls(train_files=[str(f)], val_fraction=0.0, cache_dir=str(tmp_path / "cache"), **kw)
        dm._tokenizer = tok
        got.append(dm.build_samples([str(f)]))
    assert got[0] == got[1] and len(got[0]) >= 4


def test_packed_rows_keep_one_source_each_so_a_mixture_can_draw_them(tmp_path, tok):
    a = _jsonl(tmp_path / "alpha.jsonl", [{"prompt": f"a{i}", "response": "A" * (i % 4 + 1)} for i in range(30)])
    b = _jsonl(tmp_path / "beta.jsonl", [{"prompt": f"b{i}", "response": "B" * (i % 4 + 1)} for i in range(30)])
    dm = _sft(tmp_path, [{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 4.0}], packing=True,
              max_length=64, batch_size=2, seed=2)
    dm._tokenizer = tok
    dm.setup()
    rows = dm.train_set
    assert len(rows) < 60  # several samples per row
    for i in range(len(rows)):
        assert len({s["source_index"] for s in rows[i]}) == 1  # never two sources in one row
        assert {s["source_index"] for s in rows[i]} == {int(rows.source_of()[i])}
    batches = list(dm.train_dataloader())
    src = torch.cat([bt["source_index"][bt["attention_mask"] == 1] for bt in batches])
    assert isinstance(dm.sampler, MixtureSampler) and float((src == 1).float().mean()) > 0.6  # 4:1 for beta
