"""`WarmupDecay`: warm-up then cosine / linear decay sized from the run, the floor exactly at the last optimizer
step, the ViT pretraining schedule unchanged bit for bit, one-line errors, resume, and real CLI fits whose
schedule stretches with `trainer.max_steps`."""

import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from tokensel.cli import cli_main, main
from tokensel.errors import ConfigError
from tokensel.trainer import vit as vit_mod
from tokensel.trainer.schedules import WarmupDecay, lr_factor, warmup_length

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


def _lrs(steps: int, base: float = 1.0, **kw) -> list[float]:
    """The lr each of `steps` optimizer steps trains at (read before the step, as the optimizer uses it)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = WarmupDecay(opt, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_linear_decay_hand_values_and_floor_at_the_last_step():
    # T = 6, no warm-up, floor 0.1: p = s / 5 -> 1 - 0.9 p
    got = _lrs(6, decay="linear", min_lr_ratio=0.1, total_steps=6)
    assert got == pytest.approx([1.0, 0.82, 0.64, 0.46, 0.28, 0.1], abs=1e-12)
    assert got[-1] == 0.1  # exactly the floor


def test_cosine_with_warmup_hand_values():
    # T = 10, W = 2: ramp 1/2, 2/2; then p = (s - 2) / 7; floor 0.2 -> 0.2 + 0.8 * (1 + cos(pi p)) / 2
    got = _lrs(10, base=2.0, warmup_steps=2, decay="cosine", min_lr_ratio=0.2, total_steps=10)
    assert got[:3] == pytest.approx([1.0, 2.0, 2.0])
    assert got[5] == pytest.approx(2.0 * (0.2 + 0.4 * (1 + math.cos(math.pi * 3 / 7))))
    assert got[-1] == 2.0 * 0.2  # the last step trains at exactly lr x min_lr_ratio


def test_warmup_ratio_scales_with_the_run():
    assert warmup_length(100, warmup_ratio=0.29) == 29  # 0.29 * 100 = 28.999...: not 28
    assert warmup_length(1000, warmup_ratio=0.03) == 30 and warmup_length(6, warmup_ratio=0.03) == 0
    got = _lrs(100, warmup_ratio=0.1, decay="linear", total_steps=100)  # W = 10
    assert got[0] == pytest.approx(0.1) and got[9] == pytest.approx(1.0) and got[10] == 1.0
    assert got[-1] == 0.0
    assert _lrs(4, decay="constant", warmup_steps=2, total_steps=4) == [0.5, 1.0, 1.0, 1.0]


def _former_vit_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """ViTClassifier._schedule_lr before issue 16 (the formula the cached backbone was pretrained with)."""
    factor = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if schedule == "cosine":
        factor *= 0.5 * (1 + math.cos(math.pi * min(1.0, step / total)))
    return factor


@pytest.mark.parametrize("total", [8, 1000])  # the synthetic test pretraining (shorter than warm-up) and the real one
def test_vit_pretraining_schedule_is_unchanged_bit_for_bit(total):
    opt = vit_mod.PRETRAIN_OPT
    got = _lrs(total + 2, base=opt["lr"], warmup_steps=opt["warmup_steps"], decay=opt["decay"],
               warmup_overlap=opt["warmup_overlap"], total_steps=total)
    want = [opt["lr"] * _former_vit_factor(s, total, 50, "cosine") for s in range(total + 2)]
    assert got == want  # ==, not approx: the same floats, so a re-pretrained backbone is the same backbone
    # the fine-tuning recipes' former shape (warm-up 10, cosine over the run) is expressible too
    assert _lrs(500, warmup_steps=10, warmup_overlap=True, total_steps=500) == [
        _former_vit_factor(s, 500, 10, "cosine") for s in range(500)]


@pytest.mark.parametrize("kw, key", [
    (dict(warmup_steps=-1), "warmup_steps=-1"),
    (dict(warmup_ratio=1.0), "warmup_ratio=1.0"),
    (dict(warmup_ratio=-0.1), "warmup_ratio=-0.1"),
    (dict(decay="cosin"), "decay='cosin'"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5"),
    (dict(warmup_steps=3, warmup_ratio=0.1), "not both"),
    (dict(warmup_steps=6, total_steps=6), "warmup_steps=6 is not shorter than the run (6 optimizer steps)"),
])
def test_bad_values_are_one_line_config_errors(kw, key):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ConfigError) as e:
        WarmupDecay(opt, **kw)
    assert key in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(("lr_scheduler.init_args", "WarmupDecay"))


def test_an_endless_run_cannot_size_a_schedule():
    sched = WarmupDecay(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0))
    with pytest.raises(ConfigError, match="set trainer.max_steps or trainer.max_epochs"):
        sched.set_total_steps(float("inf"))


def test_resume_keeps_the_step_and_takes_the_run_length_configured_now():
    def fresh(total):
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        return opt, WarmupDecay(opt, decay="linear", total_steps=total)

    opt, a = fresh(11)
    for _ in range(4):
        opt.step()
        a.step()
    state = a.state_dict()
    opt_b, b = fresh(11)
    b.load_state_dict(state)
    opt_b.step()
    b.step()
    assert b.get_last_lr() == [lr_factor(5, 11, decay="linear")] == [0.5]
    opt_c, c = fresh(21)  # resumed with a longer max_steps: the rest of the schedule stretches
    c.load_state_dict(state)
    opt_c.step()
    c.step()
    assert c.total_steps == 21 and c.get_last_lr() == [pytest.approx(0.75)]


class _Recorder(Callback):
    def __init__(self):
        self.lrs = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _fit_lrs(max_steps: int, *extra: str) -> list[float]:
    cli = cli_main(["--config", str(ROOT / "recipes" / "sft.yaml"), "--config", str(TINY),  # run=False: no verb
                    "--trainer.max_steps", str(max_steps), "--trainer.logger", "false",
                    "--trainer.enable_checkpointing", "false", "--trainer.limit_val_batches", "0",
                    "--trainer.val_check_interval", "null", "--run_name", f"lr{max_steps}", *extra], run=False)
    rec = _Recorder()
    cli.trainer.callbacks.append(rec)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return rec.lrs


def test_a_longer_max_steps_stretches_the_schedule_through_the_cli(in_tmp):
    # sft.yaml: lr 3e-4, warm-up 3% (0 steps here), linear decay to 0.1 x lr at the last step
    short, long = _fit_lrs(3), _fit_lrs(7)
    assert short == pytest.approx([3e-4, 1.65e-4, 3e-5]) and short[-1] == 3e-4 * 0.1
    assert long == pytest.approx([3e-4 * (1 - 0.9 * s / 6) for s in range(7)]) and long[-1] == 3e-4 * 0.1
    # warm-up ratio and cosine from the command line: W = int(0.25 * 8) = 2
    cos = _fit_lrs(8, "--lr_scheduler.init_args.decay", "cosine", "--lr_scheduler.init_args.warmup_ratio", "0.25")
    assert cos[:3] == pytest.approx([1.5e-4, 3e-4, 3e-4])
    assert cos[4] == pytest.approx(3e-4 * (0.1 + 0.45 * (1 + math.cos(math.pi * 2 / 5))))
    assert cos[-1] == 3e-4 * 0.1


def test_bad_schedule_on_the_command_line_is_one_line_and_writes_nothing(in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / "sft.yaml"), "--config", str(TINY),
              "--lr_scheduler.init_args.decay", "cosin"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == "error: lr_scheduler.init_args.decay='cosin' is not one of cosine, linear, constant"
    assert not (in_tmp / "checkpoints").exists()


def test_a_warmup_as_long_as_max_steps_is_refused_before_the_run_folder_is_made(in_tmp, capsys):
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(ROOT / "recipes" / "sft.yaml"), "--config", str(TINY), "--trainer.max_steps", "4",
              "--lr_scheduler.init_args.warmup_steps", "4", "--lr_scheduler.init_args.warmup_ratio", "null"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: lr_scheduler.init_args.warmup_steps=4 is not shorter than the run (trainer.max_steps=4); lower it, "
        "or use warmup_ratio so it scales with trainer.max_steps")
    assert not (in_tmp / "checkpoints").exists()  # (the scheduler's own check runs after config.yaml is written)


def test_no_recipe_hard_codes_a_schedule_length():
    for path in sorted((ROOT / "recipes").rglob("*.yaml")) + sorted((ROOT / "tests" / "integration").rglob("*.yaml")):
        text = path.read_text()
        assert "total_iters" not in text and "lr_warmup_steps" not in text, path
        if "lr_scheduler:" in text:
            assert "tokensel.trainer.schedules.WarmupDecay" in text, path
