"""`--ckpt_path last | best` resolution in a run folder."""

import os

import pytest

from tokensel.errors import TokenselError
from tokensel.trainer.base_trainer import resolve_ckpt_path


def _touch(path, mtime):
    path.write_bytes(b"x")
    os.utime(path, ns=(mtime, mtime))


def test_last_and_best_mean_the_newest_run(tmp_path):
    # a first run wrote last.ckpt and best-step=50; a rerun under the same name wrote last-v1 and best-step=249
    _touch(tmp_path / "last.ckpt", 1_000)
    _touch(tmp_path / "best-step=50.ckpt", 1_000)
    _touch(tmp_path / "last-v1.ckpt", 2_000)
    _touch(tmp_path / "best-step=249.ckpt", 2_000)
    _touch(tmp_path / "last.ckpt.tmp", 3_000)  # a half-written file is never picked
    assert resolve_ckpt_path("last", str(tmp_path)).endswith("last-v1.ckpt")
    assert resolve_ckpt_path("best", str(tmp_path)).endswith("best-step=249.ckpt")  # not the lexical max
    explicit = str(tmp_path / "last.ckpt")
    assert resolve_ckpt_path(explicit, str(tmp_path)) == explicit


def test_deepspeed_checkpoint_folders_count(tmp_path):
    _touch(tmp_path / "last.ckpt.tmp", 3_000)
    (tmp_path / "last.ckpt").mkdir()  # ZeRO checkpoints are folders
    assert resolve_ckpt_path("last", str(tmp_path)).endswith("last.ckpt")


def test_missing_checkpoints_name_the_folder(tmp_path):
    with pytest.raises(TokenselError, match="no last checkpoint in"):
        resolve_ckpt_path("last", str(tmp_path))
    with pytest.raises(TokenselError, match="no such file"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), str(tmp_path))
