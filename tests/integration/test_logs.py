"""Logs that suit clusters: no progress bar without a terminal, a one-line summary every N steps, CSV metrics
and the resolved config in the run folder (a rerun into the same folder works), no third-party chatter."""

import csv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


def _fit(cli, cwd, steps, *extra):
    # logger / progress bar back to their defaults (the tiny overrides turn them off)
    return cli(["fit", "--config", ROOT / "recipes" / "random.yaml", "--config", TINY,
                    "--trainer.logger", "null", "--trainer.enable_progress_bar", "null",
                    "--trainer.max_steps", steps, "--trainer.val_check_interval", 10,
                    "--trainer.summary_every_n_steps", 10, *extra], cwd)


def test_fifty_steps_without_a_tty_is_a_short_log(tmp_path, cli):
    r = _fit(cli, tmp_path, 50)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout.splitlines()
    assert len(out) < 100, r.stdout
    summaries = [ln for ln in out if ln.startswith("tokensel: step ") and "it/s" in ln]
    assert [ln.split()[2] for ln in summaries] == [f"{s}/50" for s in (10, 20, 30, 40, 50)], r.stdout
    assert all(" loss " in ln and " keep " in ln and " lr " in ln for ln in summaries)
    assert "━" not in r.stdout and "it/s v_num" not in r.stdout  # no progress bar
    for noise in ("litlogger", "LeafSpec", "tensorboardX", "is_gradient_checkpointing"):
        assert noise not in r.stdout + r.stderr, noise
    (run,) = (tmp_path / "checkpoints" / "random").iterdir()  # checkpoints/random/<config hash>
    assert list(run.glob("lightning_logs/version_*/config.yaml"))  # the resolved config, beside the metrics
    metrics = list((run / "lightning_logs").glob("version_*/metrics.csv"))
    assert metrics, list(run.rglob("*"))
    with open(metrics[0]) as f:
        rows = list(csv.DictReader(f))
    assert any(r.get("train/keep_ratio") for r in rows) and any(r.get("val/loss") for r in rows)
    # reruns into the same run folder (run length and logger do not rename it; a fresh rerun is refused, so
    # these resume): without a logger the config goes to the run folder itself, and a second rerun overwrites
    # it instead of refusing
    for _ in range(2):
        r2 = _fit(cli, tmp_path, 1, "--trainer.val_check_interval", 1, "--trainer.logger", "false",
                  "--ckpt_path", "last")
        assert r2.returncode == 0, r2.stderr[-3000:]
        assert (run / "config.yaml").exists()


def test_a_weighted_mixture_logs_validation_loss_per_source(tmp_path, cli):
    """Two weighted JSONL sources through the CLI: the run trains, and metrics.csv has val/loss/<name> for each
    source beside val/loss (the token-weighted mean of the two)."""
    import json

    for name, n in (("arith", 30), ("words", 20)):
        with open(tmp_path / f"{name}.jsonl", "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"{name} {i}?", "response": f"{name} answer {i}"}) + "\n")
    files = json.dumps([{"path": str(tmp_path / "arith.jsonl"), "weight": 0.7},
                        {"path": str(tmp_path / "words.jsonl"), "weight": 0.3}])
    r = _fit(cli, tmp_path, 4, "--trainer.val_check_interval", 4, "--data.init_args.train_files", files,
             "--data.init_args.val_fraction", "0.2", "--data.init_args.max_samples", "null")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "from 2 sources (arith, words)" in r.stdout
    (metrics,) = (tmp_path / "checkpoints" / "random").glob("*/lightning_logs/version_*/metrics.csv")
    with open(metrics) as f:
        rows = [row for row in csv.DictReader(f) if row.get("val/loss")]
    assert rows and all(rows[-1].get(k) for k in ("val/loss/arith", "val/loss/words")), rows[-1].keys()
    lo, hi = sorted(float(rows[-1][k]) for k in ("val/loss/arith", "val/loss/words"))
    assert lo <= float(rows[-1]["val/loss"]) <= hi
