"""Preemption: on SIGTERM or SIGUSR1 (SLURM's pre-timeout signal, `#SBATCH --signal=USR1@120`), finish the
current optimizer step, write `last.ckpt`, and exit with status `PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again"),
so a scheduler sees an unfinished job and `--ckpt_path last` resumes exactly.

Lightning's own SIGTERM handling stops after the current *batch* (mid gradient-accumulation, without a
checkpoint) and exits with status 0, which a scheduler reads as success; this callback replaces it for the
training loop. On several ranks the decision is reduced across ranks every batch (one signalled rank stops
them all at the same step), and every rank takes part in the checkpoint write.
"""

from __future__ import annotations

import os
import signal

from lightning.pytorch import Callback

PREEMPTED_EXIT = 75
SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s is not None)


def preempted(trainer) -> bool:
    """Whether `trainer`'s run stopped for a preemption signal (the entry point exits with PREEMPTED_EXIT)."""
    return any(isinstance(c, Preemption) and c.preempted for c in getattr(trainer, "callbacks", []) or [])


class Preemption(Callback):
    """Checkpoint and stop at the next optimizer-step boundary after SIGTERM / SIGUSR1 (see module docstring)."""

    def __init__(self) -> None:
        self.signalled: int | None = None
        self.preempted = False
        self._previous: dict = {}

    def _handler(self, signum, frame) -> None:
        self.signalled = signum

    def on_train_start(self, trainer, pl_module) -> None:
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for s in SIGNALS:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handler)

    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop._should_accumulate():
            return  # mid gradient accumulation: stop only once this optimizer step is taken
        stop = trainer.strategy.reduce_boolean_decision(self.signalled is not None, all=False)
        if not stop:
            return
        path = self._save_last(trainer)
        name = signal.Signals(self.signalled).name if self.signalled else "a signal on another rank"
        if trainer.is_global_zero:
            print(f"tokensel: {name} at step {trainer.global_step}: wrote {path}; resume with --ckpt_path last "
                  f"(exit status {PREEMPTED_EXIT})", flush=True)
        # stop after this batch (its metrics are still logged); the entry point then exits with PREEMPTED_EXIT
        self.preempted = True
        trainer.should_stop = True

    @staticmethod
    def _save_last(trainer) -> str:
        """Write `last` through the run's ModelCheckpoint (its naming, and its record that this step is saved,
        so nothing rewrites the file at train end with a state that reads as a finished epoch)."""
        from lightning.pytorch.callbacks import ModelCheckpoint

        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath:
                cb._save_last_checkpoint(trainer, cb._monitor_candidates(trainer))
                return cb.last_model_path
        path = os.path.join(trainer.default_root_dir, "last.ckpt")
        trainer.save_checkpoint(path)
        return path
