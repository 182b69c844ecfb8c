"""Numerical guard: a NaN loss at step k stops the run (or skips the step) with the step and the keep ratio
named, and the last good checkpoint stays intact, loadable and finite; empty selections are counted."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tokensel.cli import cli_main
from tokensel.trainer.guard import NonFiniteError
from tokensel.trainer.lm import SelectiveLM

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
NAN_AT = 3


def _poison(monkeypatch, at=NAN_AT, every=False):
    """SelectiveLM.selective_step returns a NaN loss (with its graph) at global_step == `at` (or from it on)."""
    orig = SelectiveLM.selective_step

    def step(self, batch):
        out = orig(self, batch)
        gs = int(self.global_step)
        if gs == at or (every and gs >= at):
            out["loss"] = out["loss"] * float("nan")
        return out
    monkeypatch.setattr(SelectiveLM, "selective_step", step)


def _cli(*extra):
    return cli_main(["--config", str(ROOT / "recipes" / "random.yaml"), "--config", str(TINY),
                     "--trainer.logger", "false", "--trainer.max_steps", "6", "--trainer.val_check_interval", "null",
                     "--trainer.limit_val_batches", "0", "--trainer.save_every_n_steps", "2",
                     "--model.init_args.lora", "null", *map(str, extra)], run=False)


class _Steps(Callback):
    def __init__(self):
        self.params = {}

    def on_train_batch_end(self, trainer, module, *a):
        self.params[trainer.global_step] = torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def _finite_ckpt(path):
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    sd = ckpt["state_dict"]
    assert sd and all(torch.isfinite(v).all() for v in sd.values() if v.is_floating_point())
    return ckpt


def test_stop_names_step_and_keep_ratio_and_keeps_last_good_checkpoint(in_tmp, monkeypatch):
    with monkeypatch.context() as m:  # poisoned for the first run only (the fixture's chdir stays)
        _poison(m)
        cli = _cli()
        with pytest.raises(NonFiniteError) as e:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    msg = str(e.value)
    assert f"non-finite loss at step {NAN_AT}" in msg and "keep ratio 0." in msg, msg
    assert "last.ckpt" in msg and "on_nonfinite" in msg
    last = Path(cli.trainer.default_root_dir) / "last.ckpt"  # checkpoints/random/<config hash>
    ckpt = _finite_ckpt(last)
    assert ckpt["global_step"] == 2  # the step-2 save; the poisoned step 3 never reached a checkpoint
    assert not list(last.parent.glob("*.tmp*"))
    # loadable: resuming from it runs on (the NaN is gone once the step is past)
    cli2 = _cli()
    cli2.trainer.fit(cli2.model, datamodule=cli2.datamodule, ckpt_path=str(last))
    assert cli2.trainer.global_step == 6
    assert _finite_ckpt(last)["global_step"] == 6


def test_skip_leaves_weights_untouched_and_goes_on(in_tmp, monkeypatch, caplog):
    _poison(monkeypatch)
    cli = _cli("--trainer.on_nonfinite", "skip")
    rec = _Steps()
    cli.trainer.callbacks.append(rec)
    with caplog.at_level("WARNING"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.global_step == 6
    torch.testing.assert_close(rec.params[NAN_AT + 1], rec.params[NAN_AT], rtol=0, atol=0)  # skipped step
    assert (rec.params[NAN_AT + 2] != rec.params[NAN_AT + 1]).any()  # later steps train again
    assert all(torch.isfinite(p).all() for p in rec.params.values())
    assert any(f"non-finite loss at step {NAN_AT}" in r.getMessage() and "skipped" in r.getMessage()
               for r in caplog.records)
    _finite_ckpt(Path(cli.trainer.default_root_dir) / "last.ckpt")


def test_skip_gives_up_after_too_many_in_a_row(in_tmp, monkeypatch):
    _poison(monkeypatch, at=1, every=True)
    cli = _cli("--trainer.on_nonfinite", "skip", "--trainer.max_steps", "20")
    cli.trainer.callbacks[[type(c).__name__ for c in cli.trainer.callbacks].index("NonFiniteGuard")] \
        .max_consecutive_skips = 2
    with pytest.raises(NonFiniteError, match="3 non-finite steps in a row"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


def test_checkpoint_with_nan_weights_is_refused(in_tmp):
    cli = _cli("--trainer.max_steps", "2")
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    last = Path(cli.trainer.default_root_dir) / "last.ckpt"
    before = last.read_bytes()
    with torch.no_grad():
        next(cli.model.parameters()).fill_(float("nan"))
    with pytest.raises(NonFiniteError, match="not finite"):
        cli.trainer.save_checkpoint(last)
    assert last.read_bytes() == before


def test_empty_selection_is_counted_and_warned(in_tmp, caplog):
    cli = _cli("--model.init_args.selector.init_args.k", "0.0", "--trainer.max_steps", "3",
               "--trainer.enable_checkpointing", "false")
    with caplog.at_level("WARNING"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert cli.trainer.callback_metrics["train/empty_selection"] == 3
    warned = [r for r in caplog.records if "kept no token" in r.getMessage()]
    assert len(warned) == 1  # rate-limited
    assert all(math.isfinite(float(p.detach().abs().sum())) for p in cli.model.parameters())


def test_cli_exits_non_zero_with_one_line(in_tmp):
    code = (
        "import sys, torch\n"
        "from tokensel.trainer.lm import SelectiveLM\n"
        "orig = SelectiveLM.selective_step\n"
        "def step(self, batch):\n"
        "    out = orig(self, batch)\n"
        f"    if int(self.global_step) == {NAN_AT}: out['loss'] = out['loss'] * float('nan')\n"
        "    return out\n"
        "SelectiveLM.selective_step = step\n"
        "from tokensel.cli import main\n"
        "main(sys.argv[1:])\n")
    r = subprocess.run([sys.executable, "-c", code, "fit", "--config", str(ROOT / "recipes" / "random.yaml"),
                        "--config", str(TINY), "--trainer.logger", "false", "--trainer.max_steps", "6",
                        "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
                        "--trainer.save_every_n_steps", "2"], capture_output=True, text=True, cwd=in_tmp,
                       timeout=600)
    assert r.returncode == 2, r.stderr[-2000:]
    line = [ln for ln in r.stderr.splitlines() if ln.startswith("error: ")]
    assert len(line) == 1 and f"step {NAN_AT}" in line[0] and "keep ratio" in line[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    (last,) = (in_tmp / "checkpoints" / "random").glob("*/last.ckpt")  # checkpoints/random/<config hash>
    _finite_ckpt(last)
