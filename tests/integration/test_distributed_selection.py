"""A rank that sample triage leaves empty still joins every collective (gloo, 2 CPU processes, tiny Llama).

With a global triage (`QTuningSelection(scope="global")`) a rank can keep 0 samples. It must still run the
trained forward (ZeRO-3 parameter gathers), the normaliser's all_reduce (`global_selected`) and the gradient
reduction, or its peers hang. `DropRankSelection` below is a test-only selector whose triage drops every
sample on rank 1 (and, in a single process, the rows rank 1 would have held). So a 2-process run must finish
and train exactly like one process that only has rank 0's samples: same per-step losses (fp32, 1e-4), under
DDP and under DeepSpeed ZeRO-2.

The CLI imports the selector by `class_path: test_distributed_selection.DropRankSelection` (this folder is put
on PYTHONPATH). Every run is bounded by a timeout that kills its whole process group (a hung rank included).
"""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tokensel.modules.base import TokenSelector, TokenStats, Triage

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
STEPS = 3
B = 2  # per-process micro-batch; the 1-process reference holds the global batch of 2 * B


class DropRankSelection(TokenSelector):
    """Test only: triage drops every sample on rank `drop_rank`; in one process it keeps the first `keep_rows`
    rows of each micro-batch (rank 0's share of the global batch). Every surviving valid token trains."""

    needs = frozenset()

    def __init__(self, drop_rank: int = 1, keep_rows: int = B) -> None:
        super().__init__(scope="global")
        self.drop_rank, self.keep_rows = drop_rank, keep_rows

    def triage(self, stats: TokenStats) -> Triage:
        import torch.distributed as dist

        n = stats.valid.shape[0]
        keep = torch.ones(n, dtype=torch.bool, device=stats.valid.device)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            if stats.rank == self.drop_rank:
                keep[:] = False
                print(f"test selector: rank {stats.rank} emptied at step {stats.step}", flush=True)
        else:
            keep[self.keep_rows:] = False
        return Triage(keep_samples=keep)

    def select(self, stats: TokenStats) -> torch.Tensor:
        return stats.valid.float()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    cache = Path(os.environ.get("TOKENSEL_CACHE", Path.home() / ".cache" / "tokensel"))
    path = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", HF_HUB_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", PYTHONPATH=path,
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(cache / "torch_extensions")),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))


def fit(cwd: Path, run: str, devices: int, *extra, timeout: float = 360) -> tuple[list[float], str]:
    """A short fit with `DropRankSelection`; returns (train/loss per step, stdout). Fails on a hang."""
    selector = ('{"class_path": "test_distributed_selection.DropRankSelection", '
                f'"init_args": {{"drop_rank": 1, "keep_rows": {B}}}}}')
    cmd = [sys.executable, "-m", "tokensel", "fit", "--config", ROOT / "recipes" / "sft.yaml",
           "--config", ROOT / "tests" / "integration" / "tiny" / "_lm.yaml", "--run_name", run,
           "--trainer.accelerator", "cpu", "--trainer.devices", devices, "--trainer.max_steps", STEPS,
           "--trainer.val_check_interval", "null", "--trainer.limit_val_batches", "0",
           "--trainer.log_every_n_steps", "1",
           "--trainer.logger", '{"class_path": "lightning.pytorch.loggers.CSVLogger", '
                               f'"init_args": {{"save_dir": "logs", "name": "{run}"}}}}',
           "--model.init_args.lora", "null", "--model.init_args.normaliser", "global_selected",
           "--model.init_args.selector", selector,
           "--data.init_args.batch_size", B * 2 // devices, "--data.init_args.max_samples", 4 * STEPS, *extra]
    p = subprocess.Popen(list(map(str, cmd)), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=_env(), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # every rank: a hung peer must not outlive the test
        out, err = p.communicate()
        pytest.fail(f"{run}: no result within {timeout} s (a rank hangs in a collective)\n{out[-2000:]}\n{err[-3000:]}")
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, f"{cmd}\n--- stdout\n{out[-3000:]}\n--- stderr\n{err[-6000:]}"
    files = sorted((cwd / "logs" / run).glob("version_*/metrics.csv"))
    assert files, f"no metrics.csv under {cwd / 'logs' / run}"
    with open(files[-1]) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [float(r["train/loss"]) for r in sorted(rows, key=lambda r: int(r["step"]))], out


@pytest.fixture(scope="module")
def rank0_only(tmp_path_factory) -> list[float]:
    """One process holding the global batch, training only on the rows rank 0 holds in the 2-process runs."""
    return fit(tmp_path_factory.mktemp("single"), "single", 1)[0]


def _check(expected: list[float], got: tuple[list[float], str]) -> None:
    losses, out = got
    assert f"rank 1 emptied at step {STEPS - 1}" in out and "rank 0 emptied" not in out, out[-2000:]
    assert len(losses) == len(expected) == STEPS, (expected, losses)
    diff = max(abs(a - b) for a, b in zip(expected, losses))
    print(f"rank-0-only losses {expected}\n2-process losses   {losses}\nmax |diff| {diff:.2e}")
    assert diff <= 1e-4, (expected, losses)


def test_ddp_rank_left_empty_finishes_with_rank0_loss(tmp_path, rank0_only):
    _check(rank0_only, fit(tmp_path, "ddp", 2, "--trainer.strategy", "ddp"))


def test_zero2_rank_left_empty_finishes_with_rank0_loss(tmp_path, rank0_only):
    _check(rank0_only, fit(tmp_path, "z2", 2, "--config", ROOT / "configs" / "deepspeed" / "zero2.yaml"))
