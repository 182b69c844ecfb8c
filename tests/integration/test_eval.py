"""Evaluation end to end on tiny models: a fit that logs generation exact match and throughput (summary line and
metrics CSV) and puts the decoded samples in the run folder and the selection report; `trainer test` for the LM,
ViT and DiT modules; the lm-evaluation-harness helper without the package."""

import csv
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny"


def run_cli(args, cwd, module="tokensel"):
    # pipes, as under a cluster scheduler: no progress bar, one summary line every N steps
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=900)


def _numbers(line: str, key: str) -> float:
    return float(re.search(rf"(?<![\w/]){re.escape(key)} ([\d.]+)", line).group(1))


def test_a_tiny_fit_logs_generation_and_throughput_then_trainer_test_works(tmp_path):
    extra = tmp_path / "gen.yaml"
    extra.write_text("trainer:\n  callbacks:\n    - class_path: GenerationEval\n"
                     "      init_args: {n_prompts: 2, max_new_tokens: 8}\n")
    common = ["--config", ROOT / "recipes" / "sstoken.yaml", "--config", TINY / "_lm.yaml", "--config", extra,
              "--data.init_args.val_fraction", "0.1", "--data.init_args.max_length", 256]
    r = run_cli(["fit", *common, "--trainer.logger", "null", "--trainer.enable_progress_bar", "null",
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

    t = run_cli(["test", *common, "--trainer.logger", "false", "--ckpt_path", ckpt], tmp_path)
    assert t.returncode == 0 and "Traceback" not in t.stderr, t.stderr[-3000:]
    for key in ("test/loss", "test/ppl", "test/token_acc", "test/exact_match"):
        assert key in t.stdout, t.stdout
    assert list((run / "generations").glob("test_step*.jsonl"))


@pytest.mark.parametrize("recipe", ["dyt", "llsa_dit"])
def test_trainer_test_runs_for_the_vision_modules(tmp_path, recipe):
    r = run_cli(["test", "--config", ROOT / "recipes" / f"{recipe}.yaml", "--config", TINY / f"{recipe}.yaml",
                 "--trainer.logger", "false"], tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "test/loss" in r.stdout


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval is installed")
def test_lm_eval_helper_without_the_package_says_how_to_install_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    r = run_cli([tmp_path, "--tasks", "gsm8k"], tmp_path, module="tokensel.trainer.harness")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: lm-evaluation-harness is not installed: pip install "
                                             "'tokensel[eval]' (or pip install lm-eval), then rerun"]
