"""What a run costs and gets: tokens forwarded per second, trained (selected) tokens per second and per optimizer
step, and peak memory, logged every `trainer.log_every_n_steps` steps and read by the one-line `StepSummary`.

Counts come from the module's `last_step_info` (`SelectiveLM`: `forward_tokens` = positions the trained forward
ran on, padding included; `trained_tokens` = labelled tokens with a non-zero selector weight, the rows the LM
head's backward computes). They are summed over micro-batches and, in data-parallel runs, over ranks (one small
all-reduce per optimizer step). Modules without those counts (ViT, DiT) still get samples/s and peak memory.
"""

from __future__ import annotations

import resource
import sys
import time

import torch
from lightning.pytorch.callbacks import Callback

COUNTS = ("forward_tokens", "trained_tokens", "samples")


def peak_memory_gib(device: torch.device | None = None) -> float:
    """Peak memory of this process in GiB: `torch.cuda.max_memory_allocated` on a GPU, peak RSS on the CPU."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


def _batch_samples(batch) -> int:
    if isinstance(batch, dict):
        for k in ("input_ids", "pixel_values", "image", "labels"):
            v = batch.get(k)
            if isinstance(v, torch.Tensor) and v.dim() > 0:
                return int(v.shape[0])
    return 0


class Throughput(Callback):
    """Log `perf/forward_tokens_per_s`, `perf/trained_tokens_per_s`, `perf/trained_tokens_per_step`,
    `perf/samples_per_s` and `perf/peak_mem_gib` (rates over the steps since the last log, all ranks together;
    time = wall time of the training steps, validation excluded).

    `totals` holds the run's cumulative counts (all ranks) and `elapsed` the seconds spent in training steps, so
    other callbacks (`StepSummary`) can take rates over their own windows.
    """

    _clock = staticmethod(time.perf_counter)  # seconds; tests replace it

    def __init__(self) -> None:
        self.totals = dict.fromkeys(COUNTS, 0.0)
        self.steps = 0
        self.elapsed = 0.0
        self._pending = dict.fromkeys(COUNTS, 0.0)
        self._last_step: int | None = None
        self._t_step: float | None = None
        self._logged = dict(self.totals, steps=0, elapsed=0.0)
        self._paused: float | None = None
        self._device: torch.device | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = int(trainer.global_step)
        self._t_step = self._clock()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        info = getattr(pl_module, "last_step_info", None) or {}
        self._pending["forward_tokens"] += float(info.get("forward_tokens", 0))
        self._pending["trained_tokens"] += float(info.get("trained_tokens", 0))
        self._pending["samples"] += _batch_samples(batch)
        self._device = pl_module.device
        step = int(trainer.global_step)
        if self._last_step is None:
            self.on_train_start(trainer, pl_module)
        if step == self._last_step:  # inside gradient accumulation: the optimizer step is not done yet
            return
        counts = torch.tensor([self._pending[k] for k in COUNTS], dtype=torch.float64)
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            counts = trainer.strategy.reduce(counts.to(pl_module.device), reduce_op="sum").cpu()
        now = self._clock()
        self.elapsed += now - self._t_step
        self._t_step = now
        self.steps += step - self._last_step
        self._last_step = step
        for k, v in zip(COUNTS, counts.tolist()):
            self.totals[k] += v
        self._pending = dict.fromkeys(COUNTS, 0.0)
        every = max(1, int(getattr(trainer, "log_every_n_steps", 50) or 50))
        if step % every == 0:
            pl_module.log_dict(self.window(self._logged), on_step=True, on_epoch=False)
            self._logged = self.snapshot()

    def on_validation_start(self, trainer, pl_module) -> None:
        """Validation time is not training time: the clock restarts when training resumes."""
        if self._t_step is not None:
            self._paused = self._clock()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._paused is not None and self._t_step is not None:
            self._t_step += self._clock() - self._paused
            self._paused = None

    def window(self, since: dict) -> dict[str, float]:
        """Rates between the snapshot `since` ({counts..., steps, elapsed}) and now, plus peak memory."""
        dt = max(self.elapsed - since.get("elapsed", 0.0), 1e-9)
        steps = max(self.steps - since.get("steps", 0), 1)
        d = {k: self.totals[k] - since.get(k, 0.0) for k in COUNTS}
        out = {"perf/samples_per_s": d["samples"] / dt}
        if d["forward_tokens"]:
            out["perf/forward_tokens_per_s"] = d["forward_tokens"] / dt
            out["perf/trained_tokens_per_s"] = d["trained_tokens"] / dt
            out["perf/trained_tokens_per_step"] = d["trained_tokens"] / steps
        out["perf/peak_mem_gib"] = peak_memory_gib(self._device)
        return out

    def snapshot(self) -> dict:
        """The cumulative counts now, for a later `window(snapshot)`."""
        return dict(self.totals, steps=self.steps, elapsed=self.elapsed)
