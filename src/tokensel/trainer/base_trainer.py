"""The Trainer class the CLI uses: Lightning's Trainer plus run folders, atomic checkpoints and `export`."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from tokensel.errors import ConfigError, TokenselError
from tokensel.trainer.export import export_dtype

log = logging.getLogger(__name__)
CHECKPOINT_ROOT = "checkpoints"


TMP_TAG = ".tmp-"  # `<name>.tmp-<pid>`: a write in progress (or one a killed process left behind)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write `path.tmp-<pid>`, fsync, rename over `path`, fsync the folder: a crash or a kill at any moment
    leaves the previous `last.ckpt` or the new one, never a half-written file. A failed write (no space left,
    a read-only disk) removes its temporary file, keeps the previous checkpoint and stops the run with one
    line; temporary files of killed processes are removed when the next run starts (`RunCheckpoint.setup`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options=None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}{TMP_TAG}{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            kept = f"the previous {path.name} is kept" if path.exists() else "no checkpoint was written"
            raise TokenselError(f"writing checkpoint {path} failed ({e.strerror or e}); {kept}; free space on "
                                f"{path.parent} (or fix its permissions) and resume with --ckpt_path last") from None
        try:  # the rename itself must survive a power cut: fsync the folder entry
            fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary checkpoint files of processes that no longer run (killed mid-write)."""
    removed = []
    for p in Path(folder).glob(f"*{TMP_TAG}*"):
        pid = p.name.rpartition(TMP_TAG)[2]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            p.unlink(missing_ok=True) if p.is_file() else None
            removed.append(p)
    for p in Path(folder).glob("*.ckpt.tmp"):  # the fixed name older versions used
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunCheckpoint(ModelCheckpoint):
    """ModelCheckpoint that also refreshes `last.ckpt` when training ends, so `--ckpt_path last` and
    `trainer export --ckpt_path last` always mean the final weights, not the last validation's."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if trainer.is_global_zero and self.dirpath and Path(self.dirpath).is_dir():
            if removed := remove_stale_temps(self.dirpath):
                print(f"tokensel: removed {len(removed)} unfinished checkpoint write(s) of an earlier, killed run "
                      f"in {self.dirpath}")

    def on_train_end(self, trainer, pl_module) -> None:
        super().on_train_end(trainer, pl_module)
        if self.save_last and self._last_global_step_saved < trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        if trainer.is_global_zero and self.last_model_path:
            print(f"tokensel: step {trainer.global_step}; checkpoint: {Path(self.last_model_path).resolve()}")


class RNGState(Callback):
    """Checkpoint the python / numpy / torch RNG states, so a resumed run draws the same dropout masks
    (and anything else random) as an uninterrupted one. Lightning does not save them itself."""

    def state_dict(self) -> dict:
        import random

        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        # plain types and tensors only: Lightning loads checkpoints with torch.load(weights_only=True)
        numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
        return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def load_state_dict(self, state: dict) -> None:
        self._pending = state

    def on_train_start(self, trainer, pl_module) -> None:
        # restored here, not in load_state_dict: setup between restore and the first step draws random numbers
        state = getattr(self, "_pending", None)
        if state:
            import random

            import numpy as np

            random.setstate(state["python"])
            kind, keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            torch.set_rng_state(state["torch"])
            if state.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["cuda"])
            self._pending = None


class TokenselTrainer(Trainer):
    """`lightning.pytorch.Trainer` with tokensel defaults.

    * Checkpoints go to `default_root_dir` (the CLI sets the run folder: `checkpoints/<recipe>/<config hash>`
      or `checkpoints/<run_name>`, see `configure_run_dirs`): `last.ckpt` every
      `save_every_n_steps` (and at each validation / epoch end and when training ends) plus `best-step=N.ckpt`
      by `val/loss`, all written atomically.
    * `export(...)` is the `trainer export` verb.
    * A NaN / inf loss or gradient stops the run before the optimizer step (`on_nonfinite: stop`, exit status
      2 from the CLI, the last good checkpoint kept) or skips the step (`on_nonfinite: skip`); see
      `tokensel.trainer.guard.NonFiniteGuard`. Steps whose selector kept no token are counted
      (`train/empty_selection`) with a rate-limited warning.
    * Cluster-friendly output: the progress bar is on only when stdout is a terminal (unless
      `enable_progress_bar` is set); without it, rank 0 prints one line every `summary_every_n_steps`
      steps. The default logger is a `CSVLogger` under the run folder (name a `TensorBoardLogger` in
      `trainer.logger` to use TensorBoard).

    Args:
        save_every_n_steps: also refresh `last.ckpt` every this many optimizer steps (crash recovery).
        use_distributed_sampler: let Lightning wrap the sampler (off: our sampler shards batches itself).
        on_nonfinite: "stop" (default) or "skip" on a non-finite loss / gradient.
        summary_every_n_steps: one-line progress summary interval on rank 0; default 50 (or max_steps // 10
            when shorter) when there is no progress bar, else off; 0 = off.
    """

    def __init__(self, *args, save_every_n_steps: int | None = None, use_distributed_sampler: bool = False,
                 on_nonfinite: Literal["stop", "skip"] = "stop", summary_every_n_steps: int | None = None,
                 **kwargs) -> None:
        _check_trainer_nulls(kwargs)
        # Our ResumableSampler shards each global batch across ranks itself (see data/sampler.py); Lightning's
        # DistributedSampler wrapping would reorder it, so it is off by default.
        kwargs["use_distributed_sampler"] = use_distributed_sampler
        from tokensel.trainer.strategies import cpu_strategy_for

        if "strategy" in kwargs:  # DeepSpeed on the CPU needs our CPU-capable subclass
            kwargs["strategy"] = cpu_strategy_for(kwargs["strategy"], kwargs.get("accelerator", "auto"))
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if kwargs.get("enable_checkpointing", True) is not False and not any(
                isinstance(c, ModelCheckpoint) for c in callbacks):
            root = kwargs.get("default_root_dir") or os.getcwd()
            # Two callbacks: Lightning defers a monitored callback's `last` until validation, so `last`
            # (crash recovery, every `save_every_n_steps`) must not depend on `val/loss`.
            callbacks.append(RunCheckpoint(dirpath=root, save_last=True, save_top_k=0,
                                           every_n_train_steps=save_every_n_steps))
            callbacks.append(ModelCheckpoint(dirpath=root, filename="best-{step}", monitor="val/loss", mode="min",
                                             save_top_k=1))
        if not any(isinstance(c, RNGState) for c in callbacks):
            callbacks.append(RNGState())
        from tokensel.trainer.preempt import Preemption

        if not any(isinstance(c, Preemption) for c in callbacks):  # SIGTERM / SIGUSR1: checkpoint, exit 75
            callbacks.append(Preemption())
        from tokensel.trainer.guard import NonFiniteGuard, StepSummary

        if not any(isinstance(c, NonFiniteGuard) for c in callbacks):
            callbacks.append(NonFiniteGuard(on_nonfinite))
        from tokensel.trainer.throughput import Throughput  # tokens/s, trained tokens, peak memory (perf/*)

        if not any(isinstance(c, Throughput) for c in callbacks):
            callbacks.append(Throughput())
        if kwargs.get("enable_progress_bar") is None:  # a bar only on a terminal; cluster logs get summaries
            kwargs["enable_progress_bar"] = sys.stdout.isatty()
        if summary_every_n_steps is None:
            # every 50 steps, or ~10 lines over a shorter run (a 12-step demo should not stay silent)
            max_steps = kwargs.get("max_steps") or -1
            summary_every_n_steps = 0 if kwargs["enable_progress_bar"] else (
                min(50, max(1, max_steps // 10)) if max_steps > 0 else 50)
        if summary_every_n_steps and not any(isinstance(c, StepSummary) for c in callbacks):
            callbacks.append(StepSummary(summary_every_n_steps))
        if kwargs.get("logger") in (None, True):  # Lightning's default is TensorBoard when installed
            from lightning.pytorch.loggers import CSVLogger

            kwargs["logger"] = CSVLogger(save_dir=kwargs.get("default_root_dir") or os.getcwd())
        plugins = list(kwargs.pop("plugins", None) or [])
        strategy = kwargs.get("strategy", "auto")
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if (("deepspeed" not in strategy) if isinstance(strategy, str) else not isinstance(
                strategy, DeepSpeedStrategy)) and not any(
                isinstance(p, TorchCheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        from lightning.fabric.utilities.exceptions import MisconfigurationException

        try:
            super().__init__(*args, callbacks=callbacks, plugins=plugins or None, **kwargs)
        except (MisconfigurationException, ValueError, TypeError) as e:  # a bad trainer.* value: one line
            raise ConfigError(f"trainer: {' '.join(str(e).split())[:400]}") from None

    def fit(self, model, train_dataloaders=None, val_dataloaders=None, datamodule=None, ckpt_path=None,
            **kwargs):
        """`Trainer.fit`, resolving `last` / `best` in the run folder (`default_root_dir`; an error when it
        holds none, not a silent fresh start), saying in one line which folder and checkpoint the run uses, and
        refusing (with what to do) a resume the checkpoint format cannot honour, such as a DeepSpeed ZeRO
        checkpoint under another world size. With `run_config` set (the CLI sets it) the resolved config is
        written to `<run folder>/tokensel_config.yaml` on rank 0."""
        from lightning.pytorch.utilities.rank_zero import rank_zero_only

        from tokensel.trainer.strategies import check_resume

        if ckpt_path is not None:
            if ckpt_path in ("last", "best"):
                ckpt_path = resolve_ckpt_path(ckpt_path, self.default_root_dir)
            from tokensel.trainer.ckpt_check import check_checkpoint

            check_checkpoint(ckpt_path, model)
            check_resume(ckpt_path, self.strategy, self.world_size)
        if self.is_global_zero and getattr(rank_zero_only, "rank", 0) == 0:  # once, also before DDP launches
            resumed = f"; resuming {ckpt_path}" if ckpt_path is not None else ""
            print(f"tokensel: run folder {self.default_root_dir}{resumed}")
        if getattr(self, "run_config", None) and not any(isinstance(c, _RunConfigFile) for c in self.callbacks):
            self.callbacks.append(_RunConfigFile(self.run_config))
        return super().fit(model, train_dataloaders, val_dataloaders, datamodule, ckpt_path, **kwargs)

    def _checked(self, model, ckpt_path):
        """`last` / `best` resolved in the run folder, then the file checked against `model` (ckpt_check)."""
        if ckpt_path is None:
            return None
        if ckpt_path in ("last", "best"):
            ckpt_path = resolve_ckpt_path(ckpt_path, self.default_root_dir)
        from tokensel.trainer.ckpt_check import check_checkpoint

        check_checkpoint(ckpt_path, model)
        return ckpt_path

    def validate(self, model=None, dataloaders=None, ckpt_path=None, verbose=True, datamodule=None, **kwargs):
        """`Trainer.validate` with `--ckpt_path` resolved and checked first (one line for a bad checkpoint)."""
        return super().validate(model, dataloaders, self._checked(model, ckpt_path), verbose, datamodule, **kwargs)

    def test(self, model=None, dataloaders=None, ckpt_path=None, verbose=True, datamodule=None, **kwargs):
        """`Trainer.test` with `--ckpt_path` resolved and checked first (one line for a bad checkpoint)."""
        return super().test(model, dataloaders, self._checked(model, ckpt_path), verbose, datamodule, **kwargs)

    def predict(self, model=None, dataloaders=None, datamodule=None, return_predictions=None, ckpt_path=None,
                **kwargs):
        """`Trainer.predict` with `--ckpt_path` resolved and checked first (one line for a bad checkpoint)."""
        return super().predict(model, dataloaders, datamodule, return_predictions, self._checked(model, ckpt_path),
                               **kwargs)

    def export(self, model: LightningModule, datamodule: LightningDataModule | None = None,
               ckpt_path: str | None = None, out: str = "exported", adapter_only: bool = False,
               dtype: str | None = None, allow_untrained: bool = False) -> str:
        """Write a Hugging Face folder from a checkpoint, with the run's resolved training config beside the
        weights (`tokensel_config.yaml`).

        Args:
            ckpt_path: a Lightning checkpoint file, `last` / `best` (resolved in the run folder), or a
                DeepSpeed checkpoint directory (consolidated first). Required unless `allow_untrained`.
            out: destination folder (written to `out.tmp` and renamed, so a failed export leaves nothing).
            adapter_only: with LoRA, write a PEFT adapter folder instead of merged weights.
            dtype: float32 | bfloat16 | float16: the dtype of the written weights (default: as trained).
            allow_untrained: export the model's initial weights when no `ckpt_path` is given.
        """
        export_dtype(dtype)  # a bad value fails before the checkpoint is read
        if not hasattr(model, "export_hf"):
            raise ConfigError(f"{type(model).__name__} has no export_hf(); this model type cannot be exported")
        if ckpt_path is None and not allow_untrained:
            raise ConfigError("trainer export: no --ckpt_path; pass --ckpt_path last, best or a checkpoint file, "
                              "or --allow_untrained true to export the initial weights")
        config_text = getattr(self, "run_config", None)
        if ckpt_path is not None:
            path = resolve_ckpt_path(ckpt_path, self.default_root_dir)
            load_checkpoint_into(model, path)
            trained = Path(path).parent / RUN_CONFIG
            if trained.is_file():  # the config that trained these weights, not the one export parsed
                config_text = trained.read_text()
            elif config_text:
                config_text = (f"# tokensel: no {RUN_CONFIG} beside {path}; this is the config "
                               "`trainer export` parsed\n" + config_text)
            if self.is_global_zero:
                print(f"tokensel: exporting {path}")
        model.eval()
        return write_export(model, out, adapter_only=adapter_only, datamodule=datamodule, dtype=dtype,
                            config_text=config_text)


class _RunConfigFile(Callback):
    """Write the resolved fit config to `<run folder>/tokensel_config.yaml` on rank 0 when fitting starts, so
    exports and `--ckpt_path FILE` resumes find the config that trained the folder's checkpoints."""

    def __init__(self, text: str) -> None:
        self.text = text

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage == "fit" and trainer.is_global_zero:
            root = Path(trainer.default_root_dir)
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / (RUN_CONFIG + ".tmp")
            tmp.write_text(self.text)
            os.replace(tmp, root / RUN_CONFIG)


def write_export(model: LightningModule, out: str, adapter_only: bool = False, datamodule=None,
                 dtype: str | None = None, config_text: str | None = None) -> str:
    """`model.export_hf` into `out.tmp` (plus `config_text`, the resolved training config, as
    `tokensel_config.yaml`), then rename over `out`: a failed export leaves nothing behind."""
    out_path = Path(out)
    tmp = out_path.with_name(out_path.name + ".tmp")
    fs = get_filesystem(str(tmp))
    if fs.exists(str(tmp)):
        fs.rm(str(tmp), recursive=True)
    model.export_hf(str(tmp), adapter_only=adapter_only, datamodule=datamodule, dtype=dtype)
    if config_text:
        (tmp / RUN_CONFIG).write_text(config_text)
    if out_path.exists():
        import shutil

        shutil.rmtree(out_path)
    os.replace(tmp, out_path)
    print(f"tokensel: exported {type(model).__name__} to {out_path.resolve()}")
    return str(out_path)


class ExportOnFitEnd(Callback):
    """Export a Hugging Face folder of the final weights when `trainer fit` ends (rank 0), so a recipe whose
    product is a model (the Rho-1 reference model) needs no second command.

    Args:
        out: destination folder (written to `out.tmp` and renamed).
        adapter_only: with LoRA, a PEFT adapter folder instead of merged weights.
        dtype: float32 | bfloat16 | float16 for the written weights (default: as trained).
    """

    def __init__(self, out: str, adapter_only: bool = False, dtype: str | None = None) -> None:
        export_dtype(dtype)
        self.out, self.adapter_only, self.dtype = out, adapter_only, dtype

    def on_fit_end(self, trainer, pl_module) -> None:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        if isinstance(trainer.strategy, DeepSpeedStrategy) and trainer.strategy.zero_stage_3:
            raise ConfigError("ExportOnFitEnd: ZeRO-3 shards the weights; drop the callback and run "
                              "`trainer export --ckpt_path last --out DIR` (it consolidates them)")
        if trainer.is_global_zero and not trainer.interrupted:
            was_training = pl_module.training
            pl_module.eval()
            write_export(pl_module, self.out, adapter_only=self.adapter_only, datamodule=trainer.datamodule,
                         dtype=self.dtype, config_text=getattr(trainer, "run_config", None))
            pl_module.train(was_training)
        trainer.strategy.barrier("export_on_fit_end")


def log_hparams(obj, extra: dict) -> None:
    """Add `extra` to what `obj` (a LightningModule / DataModule) logs as hyperparameters (`hparams_initial`:
    hparams.yaml and every logger), but not to its checkpointed `hparams`: those stay its constructor's
    arguments, which `load_from_checkpoint` and the CLI's `--ckpt_path FILE` pass back to it."""
    obj.save_hyperparameters(extra)
    for k in extra:
        obj.hparams.pop(k, None)


def selector_hparams(selector) -> dict:
    """`{selector_class, selector_args}`: the selector and its settings, for `log_hparams`. The arguments are
    the constructor's, read back from the attributes the selector keeps (same name, or `attn_<name>` /
    `<name>_name`); plain values only."""
    import inspect

    if selector is None:
        return {"selector_class": None, "selector_args": {}}
    cls = type(selector)
    plain = (bool, int, float, str, type(None))
    args = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        for attr in (name, f"attn_{name}", f"{name}_name"):
            if hasattr(selector, attr):
                v = getattr(selector, attr)
                if isinstance(v, (list, tuple)) and all(isinstance(x, plain) for x in v):
                    v = list(v)
                if isinstance(v, plain) or isinstance(v, list):
                    args[name] = v
                break
    return {"selector_class": f"{cls.__module__}.{cls.__qualname__}", "selector_args": args}

def _check_trainer_nulls(kwargs: dict) -> None:
    """`trainer.max_steps: null` and the like pass the parser (it allows null) but crash deep in Lightning:
    name the key and its default instead."""
    import inspect
    import typing

    params = inspect.signature(Trainer.__init__).parameters
    for k, v in kwargs.items():
        p = params.get(k)
        if v is None and p is not None and p.default not in (None, inspect.Parameter.empty) and \
                type(None) not in typing.get_args(p.annotation):
            raise ConfigError(f"trainer.{k}: null is not allowed; give a value (default {p.default!r})")


def resolve_ckpt_path(ckpt_path: str, root: str) -> str:
    """`last` / `best` name such a file in the run folder `root` (never one anywhere else); anything else
    must exist.

    The newest `last*.ckpt` by modification time, as Lightning resolves `last`: a script that fits twice in
    one folder gets `last-v1.ckpt` from Lightning, and `last` then means that fit's weights. (A fresh CLI fit
    into a folder that holds checkpoints is refused, so there the question does not arise.)
    """
    if ckpt_path in ("last", "best"):
        folder = Path(root)
        cands = list(folder.glob(f"{ckpt_path}*.ckpt"))  # files, or folders (DeepSpeed); never `.ckpt.tmp`
        if not cands:
            others = [str(p) for p in run_folders(folder.parent) if p != folder]
            hint = f"; other runs of this recipe: {', '.join(others[:5])} (pass the overrides they ran with, " \
                   "or --run_name)" if others else ""
            raise TokenselError(f"--ckpt_path {ckpt_path}: no {ckpt_path} checkpoint in {folder}/ (this config's "
                                f"run folder){hint}; train first or pass a checkpoint file")
        return str(max(cands, key=lambda c: (c.stat().st_mtime_ns, c.name)))
    if not Path(ckpt_path).exists():
        raise TokenselError(f"--ckpt_path {ckpt_path}: no such file or directory")
    return ckpt_path


def load_checkpoint_into(model: LightningModule, path: str) -> None:
    """Load a Lightning `.ckpt` file, or a DeepSpeed checkpoint directory, into `model`.

    The module's `on_load_checkpoint` runs first, as on resume: a lean checkpoint (frozen base left out,
    `tokensel.trainer.lean`) gets the base the config built, once its fingerprint matches."""
    ckpt = None
    if Path(path).is_dir():
        # ZeRO shards (any stage, any number of ranks) consolidated to fp32 in this one process
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(path)
        state = {k.removeprefix("_forward_module."): v for k, v in state.items()}
    else:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if hasattr(model, "configure_model"):
        model.configure_model()
    if ckpt is not None:
        try:
            model.on_load_checkpoint(ckpt)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        state = ckpt["state_dict"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    trainable_missing = [k for k in missing if not _frozen_key(model, k)]
    if trainable_missing or unexpected:
        raise TokenselError(f"checkpoint {path} does not match the model in the config: missing "
                            f"{trainable_missing[:5]}, unexpected {unexpected[:5]}; export with the recipe it was "
                            "trained with")


def _frozen_key(model: LightningModule, key: str) -> bool:
    """Keys a module deliberately leaves out of checkpoints (frozen reference models)."""
    skip = getattr(model, "checkpoint_skip_prefixes", ())
    return any(key.startswith(p) for p in skip)


# The run folder is named by what a run trains. These keys do not rename it: where and how it runs, logs and
# shows progress, and how long it runs (so `--trainer.max_steps 2000 --ckpt_path last` continues a run, and
# `trainer export` needs only the recipe and the overrides that changed the model). `seed_everything: true`
# draws a new seed, so such runs each get a folder of their own.
RUN_CONFIG = "tokensel_config.yaml"  # the resolved fit config, in the run folder and in every export
NOT_RUN_KEYS = {
    "trainer": {"default_root_dir", "logger", "enable_progress_bar", "enable_model_summary", "summary_every_n_steps",
                "log_every_n_steps", "enable_checkpointing", "save_every_n_steps", "max_steps", "min_steps",
                "max_epochs", "min_epochs", "max_time", "val_check_interval", "check_val_every_n_epoch",
                "limit_val_batches", "limit_test_batches", "limit_predict_batches", "num_sanity_val_steps",
                "accelerator", "devices", "num_nodes", "profiler", "detect_anomaly", "barebones", "fast_dev_run",
                "inference_mode", "model_registry", "enable_autolog_hparams"},
    "data": {"num_workers", "num_proc", "cache", "cache_dir"},
}
RUN_SECTIONS = ("seed_everything", "model", "data", "optimizer", "lr_scheduler", "trainer")


def run_fingerprint(cfg) -> str:
    """8 hex digits of a hash of the resolved config's model, data, optimizer, scheduler, seed and trainer
    sections, less `NOT_RUN_KEYS`; other top-level keys (ckpt_path, run_name, config, the export options)
    never count. Equal for `fit` and `export` / `validate` / `test` of one recipe with the same overrides."""
    import hashlib
    import json

    d = cfg.clone().as_dict() if hasattr(cfg, "as_dict") else dict(cfg)
    ident = {k: d.get(k) for k in RUN_SECTIONS}
    trainer = ident["trainer"]
    if isinstance(trainer, dict):
        ident["trainer"] = {k: v for k, v in trainer.items() if k not in NOT_RUN_KEYS["trainer"]}
    data = ident["data"]
    if isinstance(data, dict) and isinstance(data.get("init_args"), dict):
        ident["data"] = {**data, "init_args": {k: v for k, v in data["init_args"].items()
                                               if k not in NOT_RUN_KEYS["data"]}}
    blob = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def run_folders(parent: Path) -> list[Path]:
    """Run folders directly under `parent` (those holding a run config or a checkpoint), newest first."""
    if not parent.is_dir():
        return []
    found = [p for p in parent.iterdir() if p.is_dir() and ((p / RUN_CONFIG).exists() or _checkpoints_in(p))]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def _checkpoints_in(folder: Path) -> list[Path]:
    """`last*.ckpt` / `best*.ckpt` files or DeepSpeed folders in `folder` (never `.tmp` leftovers)."""
    if not folder.is_dir():
        return []
    return sorted(p for pat in ("last*.ckpt", "best*.ckpt") for p in folder.glob(pat))


def configure_run_dirs(config, subcommand: str | None, argv: list[str]) -> None:
    """Choose the run folder (`trainer.default_root_dir`, unless given) before anything is built:

    * `--run_name X`: `checkpoints/X` (X may hold a slash);
    * `--ckpt_path FILE` inside a run folder (one holding `tokensel_config.yaml`): that folder, so the run
      continues in place;
    * else `checkpoints/<first config file's stem>/<run_fingerprint>`: a new config (a sweep value) gets a new
      folder, the same command the same folder.

    `run_name` is set to the folder under `checkpoints/`, so the saved config reruns into it. Refused with one
    line, before any model loads: a fresh `fit` into a folder that already holds checkpoints (resume it, or name
    another run: a rerun never writes `last-v1.ckpt` beside an older run's `last.ckpt`), a `last` / `best` that
    is not there, and `export` without a checkpoint (unless `--allow_untrained true`) or with a bad `--dtype`.
    """
    cfg = config[subcommand] if subcommand else config  # run=False: no subcommand level
    trainer_cfg = cfg["trainer"]
    if trainer_cfg is None:
        raise ConfigError("key 'trainer' is null; give a mapping of trainer settings or leave it out")
    run_name = cfg.get("run_name")
    ckpt = cfg.get("ckpt_path")
    if not trainer_cfg.get("default_root_dir"):
        if run_name:
            root = Path(CHECKPOINT_ROOT) / run_name
        elif ckpt not in (None, "last", "best") and (Path(str(ckpt)).parent / RUN_CONFIG).exists():
            root = Path(str(ckpt)).parent
        else:
            cfgs = cfg.get("config") or []
            recipe = Path(str(cfgs[0])).stem if cfgs else "run"
            root = Path(CHECKPOINT_ROOT) / recipe / run_fingerprint(cfg)
        trainer_cfg["default_root_dir"] = str(root)
        if not run_name:
            rel = root.relative_to(CHECKPOINT_ROOT) if root.is_relative_to(CHECKPOINT_ROOT) else None
            cfg["run_name"] = str(rel) if rel is not None else None
    root = Path(trainer_cfg["default_root_dir"])
    if subcommand == "fit" and ckpt is None and (held := _checkpoints_in(root)):
        raise ConfigError(f"{root}/ already holds a run of this config ({held[0].name}); resume it with "
                          "--ckpt_path last, or start another with --run_name NAME (or remove the folder)")
    if subcommand == "export":
        export_dtype(cfg.get("dtype"))
        if ckpt is None and not cfg.get("allow_untrained"):
            raise ConfigError(f"trainer export: no --ckpt_path; pass --ckpt_path last (this config's run: "
                              f"{root}/), best or a checkpoint file, or --allow_untrained true to export the "
                              "initial weights")
    if subcommand is not None and ckpt in ("last", "best"):
        resolve_ckpt_path(ckpt, str(root))  # fail now, not after the model loaded
