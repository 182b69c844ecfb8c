"""Checkpoint writes under faults: a process SIGKILLed at random moments while writing always leaves a last.ckpt
that loads (and a run resumes from it); its temporary files are removed by the next run; a write that fails
(no space left) stops with one line and keeps the previous checkpoint."""

import errno
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tokensel.errors import TokenselError
from tokensel.trainer.base_trainer import AtomicCheckpointIO, remove_stale_temps

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
KILLS = 20

def _writer(path: str, start: int, done, last_s) -> None:
    """Write checkpoints forever (~32 MB each), counting finished writes in `done` and timing the last one in
    `last_s` (making the tensor, then saving it), so the parent can aim its kill inside the next save whatever
    the disk's speed."""
    torch.set_num_threads(1)  # a forked child must not enter an OpenMP parallel region of the parent's pool
    io, n = AtomicCheckpointIO(), start
    while True:
        n += 1
        t0 = time.perf_counter()
        x = torch.full((8 * 1024 * 1024,), float(n))
        ck = {"n": n, "x": x, "sum": float(x.sum())}
        t1 = time.perf_counter()
        io.save_checkpoint(ck, path)
        last_s[0], last_s[1] = t1 - t0, time.perf_counter() - t1
        done.value += 1


def test_sigkill_at_random_moments_never_leaves_a_broken_last_ckpt(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")  # a forked writer starts at once, so 20 kills take seconds, not minutes
    path, rng, seen = tmp_path / "last.ckpt", random.Random(0), []
    for _ in range(KILLS):
        start = torch.load(path, weights_only=True)["n"] if path.exists() else 0
        done, last_s = ctx.Value("i", 0), ctx.Array("d", 2)
        p = ctx.Process(target=_writer, args=(str(path), start, done, last_s), daemon=True)
        p.start()
        deadline = time.monotonic() + 120
        while done.value < 1:  # one finished write in this process, then kill somewhere inside the next one
            assert p.is_alive() and time.monotonic() < deadline, "the writer finished no checkpoint in 120 s"
            time.sleep(0.002)
        time.sleep(last_s[0] + rng.uniform(0.0, last_s[1]))
        os.kill(p.pid, signal.SIGKILL)
        p.join(60)
        ck = torch.load(path, weights_only=True)  # never a truncated file
        assert ck["sum"] == float(ck["n"]) * ck["x"].numel() and torch.all(ck["x"] == ck["n"])
        assert ck["n"] >= start + 1
        seen.append(ck["n"])
    assert seen == sorted(seen), seen  # each kill kept the last finished write
    stale = list(tmp_path.glob("last.ckpt.tmp-*"))
    assert len(stale) >= KILLS // 4, stale  # kills landed inside writes (else this test proves little); seen: 11-18
    removed = remove_stale_temps(tmp_path)
    assert set(removed) == set(stale) and not list(tmp_path.glob("*.tmp*"))
    print(f"\n{KILLS} kills, {len(stale)} left a temporary file, every last.ckpt loaded ({seen[-1]} writes)")


def test_a_killed_training_run_resumes_from_its_last_checkpoint(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "tokensel", "fit", "--config", str(ROOT / "recipes" / "random.yaml"),
           "--config", str(TINY), "--run_name", "k", "--trainer.max_steps", "12",
           "--trainer.save_every_n_steps", "1", "--trainer.summary_every_n_steps", "1", "--trainer.logger", "false"]
    p = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    for line in p.stdout:
        if line.startswith("tokensel: step 3/"):
            break
    time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait(timeout=60)
    run = tmp_path / "checkpoints" / "k"
    (tmp := run / f"last.ckpt.tmp-{2 ** 22 + 7}").write_bytes(b"half a checkpoint")  # a dead pid's leftover
    r = subprocess.run(cmd + ["--ckpt_path", "last"], cwd=tmp_path, capture_output=True, text=True, timeout=600,
                       env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # (the killed run may have left its own temporary file beside the planted one)
    assert re.search(r"removed [12] unfinished checkpoint write", r.stdout) and not tmp.exists(), r.stdout[-2000:]
    assert not list(run.glob("*.tmp*"))
    assert torch.load(run / "last.ckpt", weights_only=False)["global_step"] == 12


def test_a_failed_write_keeps_the_previous_checkpoint_and_says_so(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"n": 1}, path)

    def no_space(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", no_space)
    with pytest.raises(TokenselError, match=r"last.ckpt failed \(No space left on device\); the previous "
                                            r"last.ckpt is kept; free space on"):
        io.save_checkpoint({"n": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"n": 1} and not list(tmp_path.glob("*.tmp*"))
