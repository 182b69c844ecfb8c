"""Run guards that suit long unattended runs: stop (or skip) on a non-finite loss / gradient before it can
reach the weights or a checkpoint, count steps whose selector kept no token, and print a one-line
progress summary when there is no progress bar (cluster logs).

`TokenselTrainer` attaches `NonFiniteGuard` and `StepSummary` by default (`trainer.on_nonfinite`,
`trainer.summary_every_n_steps`).
"""

from __future__ import annotations

import logging
import math
import time

import torch
from lightning.pytorch.callbacks import Callback

from tokensel.errors import TokenselError

log = logging.getLogger(__name__)


class NonFiniteError(TokenselError):
    """Training produced a NaN / inf loss or gradient; the run stopped before the weights changed."""


def _step_info(trainer, pl_module) -> tuple[float | None, float | None]:
    """(loss, keep ratio) of the current step, from `last_step_info` (SelectiveLM) or the logged metrics."""
    info = getattr(pl_module, "last_step_info", None) or {}
    loss, keep = info.get("loss"), info.get("keep_ratio")
    metrics = trainer.callback_metrics
    if loss is None and "train/loss" in metrics:
        loss = metrics["train/loss"]
    for key in ("train/keep_ratio", "train/keep_rate"):  # LM selectors / ViT dispatchers and gates
        if keep is None and key in metrics:
            keep = metrics[key]
    as_float = (lambda v: None if v is None else float(v.detach()) if isinstance(v, torch.Tensor) else float(v))
    return as_float(loss), as_float(keep)


def _fmt(v: float | None, spec: str = ".4g") -> str:
    return "n/a" if v is None else format(v, spec)


def _last_checkpoint(trainer) -> str | None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    paths = [c.last_model_path for c in trainer.callbacks if isinstance(c, ModelCheckpoint) and c.last_model_path]
    return paths[0] if paths else None


class NonFiniteGuard(Callback):
    """Detect a non-finite loss or gradient before the optimizer step, and keep NaN weights out of checkpoints.

    Args:
        on_nonfinite: "stop" (default): raise `NonFiniteError` naming the step and the selector's keep ratio,
            before the optimizer step, so the weights and the last checkpoint stay the last good ones (the CLI
            exits with status 2). "skip": drop the step's gradients (the optimizer leaves every weight and its
            state untouched), warn, and go on.
        max_consecutive_skips: with "skip", stop anyway after this many non-finite steps in a row.
        warn_every: rate limit of the "kept no token" warning: the first time, then every this many such steps.

    The decision uses the gradients after data-parallel averaging (the same on every rank) and the local loss,
    reduced over ranks, so all ranks stop or skip together. Under fp16 mixed precision the grad scaler already
    skips steps with inf gradients, so only the loss is checked; under DeepSpeed (which owns the gradient
    buffers) only the loss is checked. Every checkpoint's weights are also checked before it is written: a
    checkpoint with non-finite weights raises instead of replacing the last good one.
    """

    def __init__(self, on_nonfinite: str = "stop", max_consecutive_skips: int = 10, warn_every: int = 100) -> None:
        if on_nonfinite not in ("stop", "skip"):
            raise TokenselError(f"trainer.on_nonfinite={on_nonfinite!r}: use 'stop' or 'skip'")
        self.on_nonfinite, self.max_consecutive_skips, self.warn_every = on_nonfinite, max_consecutive_skips, warn_every
        self.skipped = self.consecutive = self.empty_selection = 0

    # -------------------------------------------------------------- non-finite loss / gradients

    def _grads_finite(self, trainer, pl_module) -> bool | None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy) or getattr(trainer.precision_plugin, "scaler", None):
            return None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if not grads:
            return None
        norms = torch._foreach_norm(grads)
        return bool(torch.isfinite(torch.stack([n.float() for n in norms])).all())

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        loss, keep = _step_info(trainer, pl_module)
        grads_ok = self._grads_finite(trainer, pl_module)
        bad = (loss is not None and not math.isfinite(loss)) or grads_ok is False
        if trainer.world_size > 1:
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            self.consecutive = 0
            return
        step = trainer.global_step
        what = "loss" if loss is not None and not math.isfinite(loss) else "gradient"
        where = (f"non-finite {what} at step {step} (loss {_fmt(loss)}, selector keep ratio {_fmt(keep, '.3f')})")
        self.skipped += 1
        self.consecutive += 1
        if self.on_nonfinite == "stop" or self.consecutive > self.max_consecutive_skips:
            ckpt = _last_checkpoint(trainer)
            kept = f"the last good checkpoint {ckpt} is kept" if ckpt else "no checkpoint was written"
            why = ("" if self.on_nonfinite == "stop"
                   else f" after {self.consecutive} non-finite steps in a row (on_nonfinite=skip)")
            raise NonFiniteError(
                f"{where}{why}: stopped before the optimizer step; {kept}. Lower the learning rate, enable "
                "gradient clipping (trainer.gradient_clip_val), check the data, or set trainer.on_nonfinite: skip")
        # no gradient -> torch optimizers leave the parameter and its state (moments, weight decay) alone
        for p in pl_module.parameters():
            p.grad = None
        if trainer.is_global_zero:
            log.warning("tokensel: %s: step skipped (on_nonfinite=skip; %d skipped so far)", where, self.skipped)
        pl_module.log("train/nonfinite_skipped", float(self.skipped), reduce_fx="max")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        """Refuse to write weights that are not finite (the previous checkpoint file stays as it is)."""
        bad = [k for k, v in checkpoint.get("state_dict", {}).items()
               if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise NonFiniteError(
                f"step {trainer.global_step}: weights {bad[:3]} are not finite; the checkpoint was not written and "
                f"the last good one ({_last_checkpoint(trainer) or 'none'}) is kept")

    # -------------------------------------------------------------- selectors that keep nothing

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _, keep = _step_info(trainer, pl_module)
        if keep is None or keep > 0:
            return
        self.empty_selection += 1
        pl_module.log("train/empty_selection", float(self.empty_selection), reduce_fx="max")
        n = self.empty_selection
        if trainer.is_global_zero and (n == 1 or n % self.warn_every == 0):
            log.warning("tokensel: the selector kept no token at step %d (%d such batches so far): the loss is 0 "
                        "and the step changes nothing; check the selector's k / threshold", trainer.global_step, n)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped, "empty_selection": self.empty_selection}

    def load_state_dict(self, state: dict) -> None:
        self.skipped = int(state.get("skipped", 0))
        self.empty_selection = int(state.get("empty_selection", 0))


class StepSummary(Callback):
    """One line every `every_n_steps` optimizer steps on rank 0 (step, loss, keep ratio, lr, it/s and, with the
    `Throughput` callback on, forwarded tokens/s, trained (selected) tokens/s and per step, peak memory), for
    logs without a progress bar. 0 = off."""

    def __init__(self, every_n_steps: int = 50) -> None:
        self.every_n_steps = every_n_steps
        self._t0 = self._s0 = None
        self._since: dict | None = None

    @staticmethod
    def _throughput(trainer):
        from tokensel.trainer.throughput import Throughput

        return next((c for c in trainer.callbacks if isinstance(c, Throughput)), None)

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0, self._s0 = time.perf_counter(), trainer.global_step
        tp = self._throughput(trainer)
        self._since = tp.snapshot() if tp is not None else None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if (not self.every_n_steps or not trainer.is_global_zero or step == self._s0
                or step % self.every_n_steps or getattr(self, "_printed", None) == step):
            return
        self._printed = step
        loss, keep = _step_info(trainer, pl_module)
        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else None
        now = time.perf_counter()
        rate = (step - self._s0) / max(now - self._t0, 1e-9)
        self._t0, self._s0 = now, step
        total = f"/{trainer.max_steps}" if trainer.max_steps and trainer.max_steps > 0 else ""
        print(f"tokensel: step {step}{total} loss {_fmt(loss)} keep {_fmt(keep, '.3f')} lr {_fmt(lr, '.3g')} "
              f"{rate:.2f} it/s{self._perf(trainer)}", flush=True)

    def _perf(self, trainer) -> str:
        """` tok/s N trained tok/s N trained/step N mem X GiB` since the last line (all ranks), or ''."""
        tp = self._throughput(trainer)
        if tp is None:
            return ""
        w = tp.window(self._since or {})
        self._since = tp.snapshot()
        parts = []
        if "perf/forward_tokens_per_s" in w:
            parts.append(f"tok/s {w['perf/forward_tokens_per_s']:.0f} trained tok/s "
                         f"{w['perf/trained_tokens_per_s']:.0f} trained/step {w['perf/trained_tokens_per_step']:.0f}")
        else:
            parts.append(f"samples/s {w['perf/samples_per_s']:.1f}")
        parts.append(f"mem {w['perf/peak_mem_gib']:.2f} GiB")
        return " " + " ".join(parts)
