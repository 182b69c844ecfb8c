"""Shared fixtures. Tests run offline on CPU; the Triton interpreter is enabled for kernel tests in
tests/kernels/conftest.py."""

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Triton kernels are defined at import time; without a GPU they must be defined under the interpreter,
# so the switch is set here, before any test module can import a kernel.
try:
    import torch as _torch

    if not _torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tokenised data is cached per fingerprint (trainer/data/cache.py); tests use a fresh cache of their own, shared
# by the CLI subprocesses they start, never the user's ~/.cache/tokensel/data
if "TOKENSEL_DATA_CACHE" not in os.environ:
    import tempfile as _tempfile

    os.environ["TOKENSEL_DATA_CACHE"] = _tempfile.mkdtemp(prefix="tokensel-test-data-")
ROOT = Path(__file__).resolve().parents[1]
TINY_LM = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """Run in a temporary folder (checkpoints/ lands there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_cli(args, cwd, timeout=900, env=None):
    """`python -m tokensel ARGS` in a subprocess, stdout / stderr as pipes (as under a cluster scheduler: no
    progress bar); returns the CompletedProcess."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-m", "tokensel", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    """`cli(args, cwd, timeout=900, env=None)`: the `trainer` command in a subprocess (`run_cli`)."""
    return run_cli


@pytest.fixture
def fit_losses():
    """`fit(args, ckpt_path=None, crash_at=None) -> (losses, cli)`: an in-process `fit` of the CLI `args`, recording
    (global step, loss) after every step; with `crash_at`, a simulated crash right after that step (after any
    checkpoint of the step), which is how the exact-resume tests cut a run."""
    from lightning.pytorch.callbacks import Callback

    from tokensel.cli import cli_main

    def fit(args, ckpt_path=None, crash_at=None):
        rec = []

        class Rec(Callback):
            def on_train_batch_end(self, trainer, module, *a):
                rec.append((trainer.global_step, float(module.last_step_info["loss"])))
                if trainer.global_step == crash_at:
                    raise RuntimeError("simulated crash")

        cli = cli_main([str(a) for a in args], run=False)
        cli.trainer.callbacks.append(Rec())
        if crash_at is None:
            cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        else:
            with pytest.raises(RuntimeError, match="simulated crash"):
                cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
        return rec, cli
    return fit
