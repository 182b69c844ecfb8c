"""Evaluation end to end on tiny models: a fit that logs generation exact match and throughput (summary line and
metrics CSV) and puts the decoded samples in the run folder and the selection report; `trainer test` for the LM,
ViT and DiT modules; `trainer eval` (lm-evaluation-harness) on an export with a local multiple-choice task, against
log-likelihoods computed here, and its one-line messages (package absent, unknown task)."""

import csv
import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny"


def _numbers(line: str, key: str) -> float:
    return float(re.search(rf"(?<![\w/]){re.escape(key)} ([\d.]+)", line).group(1))


def test_a_tiny_fit_logs_generation_and_throughput_then_trainer_test_works(tmp_path, cli):
    extra = tmp_path / "gen.yaml"
    extra.write_text("trainer:\n  callbacks:\n    - class_path: GenerationEval\n"
                     "      init_args: {n_prompts: 2, max_new_tokens: 8}\n")
    common = ["--config", ROOT / "recipes" / "sstoken.yaml", "--config", TINY / "_lm.yaml", "--config", extra,
              "--data.init_args.val_fraction", "0.1", "--data.init_args.max_length", 256]
    r = cli(["fit", *common, "--trainer.logger", "null", "--trainer.enable_progress_bar", "null",
                 "--trainer.max_steps", 4, "--trainer.val_check_interval", 2, "--trainer.log_every_n_steps", 2,
                 "--trainer.summary_every_n_steps", 2, "--model.init_args.report.init_args.every_n_steps", 2], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("tokensel: step ") and "it/s" in ln]
    assert [ln.split()[2] for ln in lines] == ["2/4", "4/4"], r.stdout
    for ln in lines:
        fwd, trained = _numbers(ln, "tok/s"), _numbers(ln, "trained tok/s")
        per_step, mem = _numbers(ln, "trained/step"), _numbers(ln, "mem")
        # batch 4 x at most 128 positions forwarded per step; some but not all of them trained
        assert 0 < trained < fwd and 0 < per_step < 4 * 128, ln
        assert 0.05 < mem < 64 and ln.endswith(" GiB"), ln
    # the run folder, wherever run naming puts it: the one holding the final checkpoint the fit printed
    (ckpt,) = re.findall(r"checkpoint: (\S+last\S*\.ckpt)", r.stdout)
    run = Path(ckpt).parent
    (metrics,) = run.glob("lightning_logs/version_*/metrics.csv")
    with open(metrics) as f:
        rows = list(csv.DictReader(f))
    perf = [row for row in rows if row.get("perf/trained_tokens_per_step")]
    assert len(perf) == 2, rows
    for row in perf:
        assert 0 < float(row["perf/trained_tokens_per_s"]) < float(row["perf/forward_tokens_per_s"])
        assert float(row["perf/peak_mem_gib"]) > 0.05 and float(row["perf/samples_per_s"]) > 0
    em = [float(row["val/exact_match"]) for row in rows if row.get("val/exact_match")]
    assert len(em) == 2 and all(0 <= v <= 1 for v in em), rows  # an untrained tiny model: 0 of 2
    val = [row for row in rows if row.get("val/ppl")]
    assert val and all(abs(float(v["val/ppl"]) - 2.718281828 ** float(v["val/loss"])) < 1e-3 * float(v["val/ppl"])
                       for v in val)
    (gen,) = (run / "generations").glob("val_step0000004.jsonl")
    samples = [json.loads(ln) for ln in gen.read_text().splitlines()]
    assert len(samples) == 2 and all({"prompt", "output", "reference", "answer", "correct"} <= s.keys()
                                     for s in samples)
    from tokensel.trainer.generation import final_answer

    assert all(s["reference_answer"] == final_answer(s["reference"]) for s in samples)
    assert any("####" in s["reference"] and s["reference_answer"] for s in samples)  # the GSM-style answers
    page = (run / "selection_report" / "report.html").read_text()
    assert "Generations (val, step 4): exact match" in page and "prompt 1:" in page

    t = cli(["test", *common, "--trainer.logger", "false", "--ckpt_path", ckpt], tmp_path)
    assert t.returncode == 0 and "Traceback" not in t.stderr, t.stderr[-3000:]
    for key in ("test/loss", "test/ppl", "test/token_acc", "test/exact_match"):
        assert key in t.stdout, t.stdout
    assert list((run / "generations").glob("test_step*.jsonl"))


@pytest.mark.parametrize("recipe", ["dyt", "llsa_dit"])
def test_trainer_test_runs_for_the_vision_modules(tmp_path, cli, recipe):
    r = cli(["test", "--config", ROOT / "recipes" / f"{recipe}.yaml", "--config", TINY / f"{recipe}.yaml",
                 "--trainer.logger", "false"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "test/loss" in r.stdout


def test_lm_eval_helper_without_the_package_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    from tokensel.trainer import harness

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as e:
        harness.main([str(tmp_path), "--tasks", "gsm8k"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: lm-evaluation-harness is not installed: pip install 'tokensel[eval]' (or pip install lm-eval), "
        "then rerun"]


MC_TASK = """task: tiny_arith_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
DOCS = [("2 + 3 =", ["5", "6", "23"], 0), ("7 - 4 =", ["11", "3", "4"], 1), ("3 x 3 =", ["6", "33", "9"], 2),
        ("10 / 2 =", ["5", "8", "20"], 0), ("6 + 6 =", ["66", "12", "0"], 1), ("9 - 1 =", ["10", "91", "8"], 2),
        ("4 x 2 =", ["8", "6", "42"], 0)]


def _loglikelihood(model, tok, context: str, continuation: str) -> float:
    """The harness's rule for a causal LM: encode context + continuation whole, score the tokens past the context."""
    import torch

    ctx, whole = tok.encode(context), tok.encode(context + continuation)
    cont = whole[len(ctx):]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids[:, :-1]).logits.double(), -1)[0]
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="needs the eval extra (lm-eval)")
def test_trainer_eval_runs_lm_eval_on_an_export_and_matches_log_likelihoods_computed_here(tmp_path, cli):
    """An exported tiny LM through `trainer eval` with an offline multiple-choice task: the harness's score for
    every choice equals the log-likelihood computed here from the exported weights, and its accuracy equals the
    hand count of argmax choices against the targets (a model that ignores or scrambles the export would not)."""
    data, tasks = tmp_path / "mc.jsonl", tmp_path / "tasks"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in DOCS))
    tasks.mkdir()
    (tasks / "tiny_arith_mc.yaml").write_text(MC_TASK.format(data=data))
    exp = tmp_path / "exported"
    r = cli(["export", "--config", ROOT / "recipes" / "sstoken.yaml", "--config", TINY / "_lm.yaml",
                 "--allow_untrained", "true", "--out", exp], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli(["eval", exp, "--tasks", "tiny_arith_mc", "--include_path", tasks, "--batch_size", 2,
                 "--device", "cpu", "--log_samples"], tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "tokensel: lm_eval --model hf" in r.stdout and f"lm-eval results in {exp / 'lm_eval.json'}" in r.stdout
    acc = json.loads((exp / "lm_eval.json").read_text())["tiny_arith_mc"]["acc,none"]
    rows = sorted((json.loads(ln) for ln in (exp / "lm_eval_samples.jsonl").read_text().splitlines()),
                  key=lambda row: row["doc_id"])
    assert [row["doc_id"] for row in rows] == list(range(len(DOCS)))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(exp).eval(), AutoTokenizer.from_pretrained(exp)
    correct = 0
    for (q, choices, answer), row in zip(DOCS, rows):
        mine = [_loglikelihood(model, tok, f"Question: {q}\nAnswer:", " " + c) for c in choices]
        theirs = [resp[0] if isinstance(resp, (list, tuple)) else resp for resp in row["responses"]]
        theirs = [float(v[0] if isinstance(v, (list, tuple)) else v) for v in theirs]
        assert theirs == pytest.approx(mine, abs=1e-4), (q, theirs, mine)
        correct += max(range(len(choices)), key=mine.__getitem__) == answer
    assert acc == pytest.approx(correct / len(DOCS))


def test_trainer_eval_names_an_unknown_task_or_a_missing_export_in_one_line(tmp_path, cli):
    r = cli(["eval", tmp_path / "nowhere", "--tasks", "gsm8k"], tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and ("not an exported model folder" in err[0] or "not installed" in err[0]), err
    if importlib.util.find_spec("lm_eval") is None:
        return
    (tmp_path / "config.json").write_text("{}")
    r = cli(["eval", tmp_path, "--tasks", "no_such_task_xyz"], tmp_path)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --tasks no_such_task_xyz: unknown lm-eval task(s) no_such_task_xyz; `lm_eval ls tasks` lists them, "
        "or pass --include_path DIR with your own task YAML"], r.stderr[-2000:]
