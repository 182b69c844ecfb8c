"""Learning-rate schedules sized from the run: linear warm-up, then cosine / linear decay to a floor.

One mechanism for every module (LM, ViT, DiT). A recipe names it as its `lr_scheduler:`

    lr_scheduler:
      class_path: tokensel.trainer.schedules.WarmupDecay
      init_args: {warmup_ratio: 0.03, decay: cosine, min_lr_ratio: 0.1}

and never states the run's length: `TokenselCLI.configure_optimizers` hands it
`trainer.estimated_stepping_batches` (max_steps, or epochs x batches / accumulation), and the CLI steps it
once per optimizer step. Raising `trainer.max_steps` stretches the whole schedule.

The factor applied at optimizer step s (0-based) of a run of T steps with W warm-up steps:

    warm-up   s <  W : (s + 1) / W                      (the first step already trains: 1/W, not 0)
    decay     s >= W : floor + (1 - floor) * g(p),   p = (s - W) / (T - 1 - W), clipped to [0, 1]
              g = 0.5 * (1 + cos(pi p)) (cosine) | 1 - p (linear) | 1 (constant)

so the last step (s = T - 1) trains at exactly `base_lr * min_lr_ratio`, and any step past the end stays
there. `warmup_overlap: true` is the shape the ViT module used before (kept so the cached pretrained
backbone reproduces bit for bit): the decay spans the whole run from step 0, p = s / T, and the warm-up
ramp multiplies it.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from tokensel.errors import ConfigError

DECAYS = ("cosine", "linear", "constant")
KEY = "lr_scheduler.init_args"


def warmup_length(total_steps: int, warmup_steps: int = 0, warmup_ratio: float | None = None) -> int:
    """Warm-up steps of a `total_steps` run: `warmup_ratio` of it (rounded down) when given, else `warmup_steps`."""
    if warmup_ratio is not None:
        return int(warmup_ratio * total_steps + 1e-9)  # 0.29 * 100 is 28.999...: still 29
    return warmup_steps


def lr_factor(step: int, total_steps: int, warmup_steps: int = 0, decay: str = "cosine",
              min_lr_ratio: float = 0.0, warmup_overlap: bool = False) -> float:
    """The multiplier of the base lr at optimizer step `step` (0-based) of a `total_steps` run (module doc)."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if warmup_overlap:
        p = min(1.0, step / max(1, total_steps))
    else:
        if step < warmup_steps:
            return warm
        p = min(1.0, max(0.0, (step - warmup_steps) / max(1, total_steps - 1 - warmup_steps)))
    if decay == "cosine":
        g = 0.5 * (1 + math.cos(math.pi * p))
    elif decay == "linear":
        g = 1.0 - p
    else:
        g = 1.0
    if decay != "constant":
        g = min_lr_ratio + (1.0 - min_lr_ratio) * g
    return warm * g


def check_schedule(warmup_steps: int, warmup_ratio: float | None, decay: str, min_lr_ratio: float) -> None:
    """One-line `ConfigError` for a value no run can use."""
    if decay not in DECAYS:
        raise ConfigError(f"{KEY}.decay={decay!r} is not one of {', '.join(DECAYS)}")
    if not isinstance(warmup_steps, int) or isinstance(warmup_steps, bool) or warmup_steps < 0:
        raise ConfigError(f"{KEY}.warmup_steps={warmup_steps!r} must be an integer >= 0 (0 = no warm-up)")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"{KEY}.warmup_ratio={warmup_ratio} must lie in [0, 1) (a share of the run's "
                              "optimizer steps)")
        if warmup_steps:
            raise ConfigError(f"{KEY}: set warmup_steps ({warmup_steps}) or warmup_ratio ({warmup_ratio}), "
                              "not both")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"{KEY}.min_lr_ratio={min_lr_ratio} must lie in [0, 1] (the floor as a share of "
                          "the optimizer's lr)")


class WarmupDecay(LRScheduler):
    """Linear warm-up then cosine / linear / no decay to `min_lr_ratio` x lr, over the run's optimizer steps.

    Args:
        optimizer: the optimizer (the CLI passes it; recipes leave it out).
        warmup_steps: warm-up length in optimizer steps (0 = none).
        warmup_ratio: warm-up as a share of the run in [0, 1) (e.g. 0.03, as ssToken's code); replaces
            `warmup_steps`, and scales with `max_steps`.
        decay: "cosine" | "linear" | "constant" after the warm-up (a plain string, so a typo gets the
            one-line error that lists these).
        min_lr_ratio: the floor: the last optimizer step trains at exactly `lr * min_lr_ratio`.
        warmup_overlap: the ViT module's former shape (decay over the whole run, ramp multiplied in).
        total_steps: the run's optimizer steps. Leave unset: the CLI sets it from
            `trainer.estimated_stepping_batches` (`set_total_steps`). Code that builds the scheduler in a
            module's own `configure_optimizers` passes `int(self.trainer.estimated_stepping_batches)`.

    On resume the run's length as configured now wins over the one saved in the checkpoint, so a resumed run
    with the same settings continues exactly and a longer `max_steps` stretches the remaining schedule.
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, warmup_ratio: float | None = None,
                 decay: str = "cosine", min_lr_ratio: float = 0.0,
                 warmup_overlap: bool = False, total_steps: int | None = None, last_epoch: int = -1) -> None:
        check_schedule(warmup_steps, warmup_ratio, decay, min_lr_ratio)
        self.warmup_steps, self.warmup_ratio, self.decay = warmup_steps, warmup_ratio, decay
        self.min_lr_ratio, self.warmup_overlap = min_lr_ratio, warmup_overlap
        self.total_steps: int | None = None
        if total_steps is not None:
            self._check_total(total_steps)
            self.total_steps = int(total_steps)
        super().__init__(optimizer, last_epoch)

    # ------------------------------------------------------------------ length

    def _check_total(self, total_steps) -> None:
        if total_steps is None or not math.isfinite(total_steps) or total_steps < 1:
            raise ConfigError(f"{type(self).__name__} needs a finite run to size its schedule (got "
                              f"{total_steps} optimizer steps): set trainer.max_steps or trainer.max_epochs")
        w = warmup_length(int(total_steps), self.warmup_steps, self.warmup_ratio)
        if self.warmup_ratio is None and not self.warmup_overlap and w >= total_steps:
            raise ConfigError(f"{KEY}.warmup_steps={w} is not shorter than the run ({int(total_steps)} optimizer "
                              "steps); lower it, or use warmup_ratio so it scales with trainer.max_steps")

    def set_total_steps(self, total_steps: int | float) -> None:
        """Size the schedule for a run of `total_steps` optimizer steps and re-apply the current step's lr."""
        self._check_total(total_steps)
        self.total_steps = int(total_steps)
        for group, lr in zip(self.optimizer.param_groups, self.get_lr()):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    @property
    def warmup(self) -> int:
        """Warm-up steps of this run (known once the length is)."""
        return warmup_length(self.total_steps or 1, self.warmup_steps, self.warmup_ratio)

    def factor(self, step: int) -> float:
        """The lr multiplier at optimizer step `step`; before the length is known, the warm-up ramp alone."""
        if self.total_steps is None:  # only between construction and `set_total_steps`: no step runs there
            return min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps > 0 else 1.0
        return lr_factor(step, self.total_steps, self.warmup, self.decay, self.min_lr_ratio, self.warmup_overlap)

    def get_lr(self) -> list[float]:
        f = self.factor(max(0, self.last_epoch))
        return [base * f for base in self.base_lrs]

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the step count; keep this run's length (set from the trainer) when it is known."""
        total = self.total_steps
        super().load_state_dict(state_dict)
        if total is not None:
            self.total_steps = total


__all__ = ["WarmupDecay", "lr_factor", "warmup_length", "check_schedule"]
