"""Evaluation numbers against hand counts: perplexity = exp(token-weighted mean loss over the whole set), token
accuracy from the loss pass, final-answer exact match of greedy generations, throughput counts per step."""

import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch.utils.data import DataLoader

from tokensel.trainer.generation import GenerationEval, exact_match, final_answer, prompt_and_reference
from tokensel.trainer.guard import StepSummary
from tokensel.trainer.lm import IGNORE, SelectiveLM, load_tokenizer
from tokensel.trainer.throughput import Throughput

TINY = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "tie_word_embeddings": True, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 0}


def _batch(lengths, labelled, T=12, seed=0):
    """Right-padded rows: row b has lengths[b] tokens, of which the last labelled[b] are labelled."""
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.randint(3, 1024, (B, T), generator=g)
    labels = torch.full((B, T), IGNORE)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, (n, k) in enumerate(zip(lengths, labelled)):
        mask[b, :n] = 1
        labels[b, n - k:n] = ids[b, n - k:n]
        ids[b, n:] = 0
    pos = torch.arange(T).expand(B, T).clone()
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "position_ids": pos}


def _trainer():
    return Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False)


def _loader(batches):
    return DataLoader(batches, batch_size=None)


def _hand_counts(module, batches):
    """(sum of token CE, labelled tokens, greedy hits) from the plain transformers forward with full logits."""
    total, n, hits = 0.0, 0, 0
    with torch.no_grad():
        for bt in batches:
            logits = module.model(input_ids=bt["input_ids"], attention_mask=bt["attention_mask"]).logits
            pred, tgt = logits[:, :-1], bt["labels"][:, 1:]
            keep = tgt != IGNORE
            total += float(F.cross_entropy(pred[keep], tgt[keep], reduction="sum"))
            n += int(keep.sum())
            hits += int((pred[keep].argmax(-1) == tgt[keep]).sum())
    return total, n, hits


def test_perplexity_is_exp_of_the_mean_loss_over_uneven_batches_and_accuracy_a_hand_count():
    torch.manual_seed(0)
    module = SelectiveLM(model_config=dict(TINY))
    # 2 labelled tokens in the first batch, 17 in the second: a mean of per-batch values would weigh them 1:1
    batches = [_batch([6, 5], [1, 1], seed=1), _batch([12, 11, 9], [7, 6, 4], seed=2)]
    total, n, hits = _hand_counts(module, batches)
    assert n == 19
    (val,) = _trainer().validate(module, _loader(batches), verbose=False)
    assert val["val/loss"] == pytest.approx(total / n, rel=1e-5)
    assert val["val/ppl"] == pytest.approx(math.exp(total / n), rel=1e-5)
    assert val["val/token_acc"] == pytest.approx(hits / n, abs=1e-7)
    # what the old per-batch exp average gave, for contrast: it differs
    per_batch = []
    for bt in batches:
        t, k, _ = _hand_counts(module, [bt])
        per_batch.append(math.exp(t / k))
    assert abs(sum(per_batch) / 2 - val["val/ppl"]) > 1e-3 * val["val/ppl"]
    (test,) = _trainer().test(module, _loader(batches), verbose=False)
    assert test["test/ppl"] == pytest.approx(val["val/ppl"], rel=1e-6)
    assert test["test/token_acc"] == pytest.approx(val["val/token_acc"])


def test_epoch_metrics_from_fixed_token_losses():
    """Losses fixed by hand: batch 1 has token losses 1, 2, 3 (2 of 3 greedy hits), batch 2 one loss of 5 (a miss).
    loss = 11 / 4, ppl = exp(2.75) (not (exp(2) + exp(5)) / 2), token_acc = 2 / 4."""
    module = SelectiveLM(model_config=dict(TINY))
    fixed = iter([(torch.tensor([[0.0, 1.0, 2.0, 3.0]]), torch.tensor([True, False, True])),
                  (torch.tensor([[0.0, 5.0, 0.0, 0.0]]), torch.tensor([False]))])

    def token_stats(model, batch, grad, rows_out=None):
        loss, hits = next(fixed)
        valid = loss > 0
        b, t = valid.nonzero(as_tuple=True)
        rows_out.update(hidden=hits, b=b, t=t)
        return loss, torch.zeros_like(loss), valid

    module.token_stats = token_stats
    module._token_accuracy = lambda hidden, targets: hidden
    batches = [{"input_ids": torch.zeros(1, 4, dtype=torch.long), "labels": torch.zeros(1, 4, dtype=torch.long)}] * 2
    (val,) = _trainer().validate(module, _loader(batches), verbose=False)
    assert val["val/loss"] == pytest.approx(2.75)
    assert val["val/ppl"] == pytest.approx(math.exp(2.75), rel=1e-6)
    assert val["val/token_acc"] == pytest.approx(0.5)


def test_token_accuracy_reuses_the_loss_pass():
    module = SelectiveLM(model_config=dict(TINY))
    calls = []
    module.model.model.register_forward_hook(lambda *a: calls.append(1))
    batches = [_batch([6, 5], [2, 2], seed=3), _batch([9], [4], seed=4)]
    _trainer().validate(module, _loader(batches), verbose=False)
    assert len(calls) == 2  # one backbone forward per batch (the old accuracy ran a second one)


# ---------------------------------------------------------------------------------------------- generation


def test_final_answer_extraction():
    assert final_answer("so 12 * 2340 = 28080\n#### 28,080") == "28080"
    assert final_answer("#### 28080.00 pounds") == "28080"
    assert final_answer("#### -3.50") == "-3.5"
    assert final_answer("the answer is 44") is None  # strict: no ####
    assert final_answer("the answer is 44, not 45.", "last_number") == "45"
    assert final_answer("#### 1 #### 2") == "2"  # the last marker
    assert final_answer("  Paris \n", "text") == "Paris"


def test_prompt_is_the_unlabelled_prefix_and_reference_the_first_labelled_span():
    ids = [5, 6, 7, 8, 9, 10, 11]
    labels = [IGNORE, IGNORE, IGNORE, 8, 9, IGNORE, 11]
    assert prompt_and_reference(ids, labels) == ([5, 6, 7], [8, 9])
    assert prompt_and_reference(ids, [IGNORE] * 7) is None
    assert prompt_and_reference(ids, ids) is None  # nothing to prompt with


class _StubLM:
    """`generate` that appends fixed continuations (padded with the pad id), as a greedy model would."""

    def __init__(self, tokenizer, continuations):
        self.tok, self.cont = tokenizer, continuations
        self.seen = []

    def generate(self, input_ids, attention_mask, max_new_tokens, pad_token_id, **kw):
        assert kw["do_sample"] is False
        self.seen.append((input_ids.clone(), attention_mask.clone()))
        outs = self.cont[:input_ids.shape[0]]
        self.cont = self.cont[input_ids.shape[0]:]
        enc = [self.tok(o, add_special_tokens=False)["input_ids"][:max_new_tokens] for o in outs]
        width = max(len(e) for e in enc)
        new = torch.full((input_ids.shape[0], width), pad_token_id)
        for b, e in enumerate(enc):
            new[b, :len(e)] = torch.tensor(e)
        return torch.cat([input_ids, new], 1)


def test_exact_match_of_stub_generations_equals_a_hand_count():
    tok = load_tokenizer(None)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    refs = ["6*7 = 42\n#### 42", "#### 40", "#### 7", "#### 1000", "#### 3"]
    outs = ["so 42\n#### 42", "#### 41", "the answer is 7", "#### 1,000", "#### 3"]
    samples = [(enc(f"question {i}?"), enc(r)) for i, r in enumerate(refs)]
    cb = GenerationEval(n_prompts=5, batch_size=2, max_new_tokens=32)
    stub = _StubLM(tok, list(outs))
    acc, rows = cb.evaluate(stub, tok, samples, torch.device("cpu"))
    # strict `####`: 42 yes, 41 != 40, "7" has no marker, 1,000 == 1000, 3 yes -> 3 / 5
    assert acc == pytest.approx(3 / 5)
    assert [r["correct"] for r in rows] == [True, False, False, True, True]
    assert [r["output"] for r in rows] == outs and rows[1]["prompt"] == "question 1?"
    ids, mask = stub.seen[0]  # left padding: the prompts end where the continuation starts
    assert ids.shape[0] == 2 and bool(mask[:, -1].all())
    lenient, _ = exact_match(outs, refs, "last_number")
    assert lenient == pytest.approx(4 / 5)


def test_generation_eval_takes_the_first_usable_validation_samples():
    rows = [{"input_ids": [1, 2, 3], "labels": [IGNORE] * 3},  # no response: skipped
            {"input_ids": [4, 5, 6, 7], "labels": [IGNORE, IGNORE, 6, 7]},
            {"input_ids": [8, 9, 10], "labels": [IGNORE, 9, 10]},
            {"input_ids": [11, 12], "labels": [IGNORE, 12]}]
    assert GenerationEval(n_prompts=2).samples_from(rows) == [([4, 5], [6, 7]), ([8], [9, 10])]


def test_generation_eval_rejects_bad_settings():
    from tokensel.errors import ConfigError

    with pytest.raises(ConfigError, match="answer='exact'"):
        GenerationEval(answer="exact")
    with pytest.raises(ConfigError, match="n_prompts=0"):
        GenerationEval(n_prompts=0)


# ---------------------------------------------------------------------------------------------- throughput


def test_throughput_counts_trained_tokens_per_optimizer_step_and_the_summary_prints_them(capsys):
    """Two micro-batches per optimizer step: (forward, trained) = (10, 3) + (20, 4), then (30, 5) + (40, 4):
    trained tokens per step = (7 + 9) / 2 = 8, forwarded 100 tokens in all."""
    clock = iter([0.0, 2.0, 4.0])
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), last_step_info={},
                             log_dict=lambda d, **kw: logged.update(d))
    tp = Throughput()
    tp._clock = lambda: next(clock)
    summary = StepSummary(every_n_steps=2)
    trainer = SimpleNamespace(global_step=0, world_size=1, log_every_n_steps=2, callbacks=[tp, summary],
                              is_global_zero=True, max_steps=2, optimizers=[], callback_metrics={})
    tp.on_train_start(trainer, module)
    summary.on_train_start(trainer, module)
    batch = {"input_ids": torch.zeros(2, 5, dtype=torch.long)}
    for step, (fwd, trained) in [(0, (10, 3)), (1, (20, 4)), (1, (30, 5)), (2, (40, 4))]:
        trainer.global_step = step
        module.last_step_info = {"forward_tokens": fwd, "trained_tokens": trained, "loss": 1.0, "keep_ratio": 0.5}
        tp.on_train_batch_end(trainer, module, None, batch, 0)
        summary.on_train_batch_end(trainer, module, None, batch, 0)
    assert tp.totals == {"forward_tokens": 100.0, "trained_tokens": 16.0, "samples": 8.0}
    assert tp.steps == 2 and tp.elapsed == pytest.approx(4.0)
    assert logged["perf/trained_tokens_per_step"] == pytest.approx(8.0)
    assert logged["perf/forward_tokens_per_s"] == pytest.approx(25.0)  # 100 tokens in 4 s
    assert logged["perf/trained_tokens_per_s"] == pytest.approx(4.0)
    assert logged["perf/samples_per_s"] == pytest.approx(2.0)
    assert 0.01 < logged["perf/peak_mem_gib"] < 1024
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("tokensel: step 2/2 loss 1 keep 0.500")
    assert "tok/s 25 trained tok/s 4 trained/step 8 mem " in line and line.endswith(" GiB")


# ---------------------------------------------------------------------------------------------- report


def test_the_selection_report_goes_to_tensorboard_and_wandb_when_they_are_the_loggers(tmp_path, monkeypatch):
    """Neither package is installed here: stand-ins record what the report sends (2 plots + the page each)."""
    import sys
    import types

    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from tokensel.trainer.report import SelectionReport

    calls = []

    class Writer:
        def add_image(self, tag, img, step, dataformats):
            calls.append(("tb_image", tag, img.shape[-1], step, dataformats))

        def add_text(self, tag, text, step):
            calls.append(("tb_text", tag, "Generations (val, step 3)" in text, step))

    fake = types.ModuleType("wandb")
    fake.Image = lambda path: ("image", Path(path).name)
    fake.Html = lambda page: ("html", "exact match 0.500" in page)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    tb = TensorBoardLogger.__new__(TensorBoardLogger)
    tb._experiment = Writer()
    wb = WandbLogger.__new__(WandbLogger)
    monkeypatch.setattr(wb, "log_metrics", lambda metrics, step: calls.append(("wandb", metrics, step)), raising=False)
    rep = SelectionReport(out_dir=str(tmp_path))
    rep.history = [{"step": 3, "keep_ratio": 0.5, "kept": [1.0, 2.0], "dropped": [0.5]}]
    rep.generations = {"stage": "val", "step": 3, "exact_match": 0.5, "answer": "gsm",
                       "rows": [{"prompt": "q", "output": "#### 1", "answer": "1", "reference_answer": "1",
                                 "correct": True}]}
    trainer = SimpleNamespace(global_step=3, global_rank=0, loggers=[tb, wb], default_root_dir=str(tmp_path))
    rep.write(trainer, SimpleNamespace(tokenizer=None, selector=None))
    assert calls[:3] == [("tb_image", "selection/keep_ratio", 3, 3, "HWC"),
                         ("tb_image", "selection/score_hist", 3, 3, "HWC"), ("tb_text", "selection/report", True, 3)]
    assert calls[3] == ("wandb", {"selection/keep_ratio": ("image", "keep_ratio.png"),
                                  "selection/score_hist": ("image", "score_hist.png"),
                                  "selection/report": ("html", True)}, 3)
    assert len(calls) == 4
