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


# ------------------------------------------------------------------ run folders (configure_run_dirs)

def _cfg(k=0.6, max_steps=5, **top):
    from jsonargparse import Namespace

    trainer = Namespace(default_root_dir=None, max_steps=max_steps, logger=False, precision="32-true",
                        devices="auto", enable_progress_bar=None)
    model = Namespace(class_path="tokensel.SelectiveLM",
                      init_args=Namespace(selector=Namespace(class_path="RandomSelection", init_args=Namespace(k=k))))
    data = Namespace(class_path="tokensel.SFTDataModule", init_args=Namespace(batch_size=4, num_workers=0))
    cfg = Namespace(config=["recipes/random.yaml"], run_name=None, ckpt_path=None, seed_everything=0, trainer=trainer,
                    model=model, data=data, optimizer=None, lr_scheduler=None)
    for key, value in top.items():
        cfg[key] = value
    return cfg


def test_fingerprint_counts_what_is_trained_only():
    import hashlib
    import json

    from tokensel.trainer.base_trainer import run_fingerprint

    # by hand: the trainer keeps only precision (length, devices, logger, progress bar and the root do not
    # name a run), the data module drops num_workers, top-level keys other than the six sections never count
    ident = {"seed_everything": 0, "optimizer": None, "lr_scheduler": None,
             "model": {"class_path": "tokensel.SelectiveLM",
                       "init_args": {"selector": {"class_path": "RandomSelection", "init_args": {"k": 0.6}}}},
             "data": {"class_path": "tokensel.SFTDataModule", "init_args": {"batch_size": 4}},
             "trainer": {"precision": "32-true"}}
    want = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:8]
    assert run_fingerprint(_cfg()) == want
    assert run_fingerprint(_cfg(max_steps=5000, ckpt_path="last", run_name="x", out="exported")) == want
    assert run_fingerprint(_cfg(k=0.7)) != want


def test_run_folder_per_config_and_rerun_refused(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    from tokensel.errors import ConfigError
    from tokensel.trainer.base_trainer import configure_run_dirs, run_fingerprint

    monkeypatch.chdir(tmp_path)
    a, b = _cfg(0.3), _cfg(0.7)
    configure_run_dirs(Namespace(fit=a), "fit", [])
    configure_run_dirs(Namespace(fit=b), "fit", [])
    assert a.trainer.default_root_dir == f"checkpoints/random/{run_fingerprint(_cfg(0.3))}"
    assert b.trainer.default_root_dir == f"checkpoints/random/{run_fingerprint(_cfg(0.7))}"
    assert a.trainer.default_root_dir != b.trainer.default_root_dir
    assert a.run_name == a.trainer.default_root_dir.removeprefix("checkpoints/")  # the saved config reruns there
    run = tmp_path / a.trainer.default_root_dir
    run.mkdir(parents=True)
    _touch(run / "last.ckpt", 1_000)
    with pytest.raises(ConfigError, match=r"already holds a run of this config \(last.ckpt\); resume it with "
                                          r"--ckpt_path last"):
        configure_run_dirs(Namespace(fit=_cfg(0.3)), "fit", [])
    resumed = _cfg(0.3, max_steps=10, ckpt_path="last")  # a longer run continues in the same folder
    configure_run_dirs(Namespace(fit=resumed), "fit", [])
    assert resumed.trainer.default_root_dir == a.trainer.default_root_dir
    with pytest.raises(TokenselError, match="no last checkpoint in checkpoints/random/.* other runs of this recipe: "
                                            + a.trainer.default_root_dir):
        configure_run_dirs(Namespace(fit=_cfg(0.7, ckpt_path="last")), "fit", [])
    named = _cfg(0.3, run_name="mine")
    configure_run_dirs(Namespace(fit=named), "fit", [])
    assert named.trainer.default_root_dir == "checkpoints/mine" and named.run_name == "mine"
    # a checkpoint file inside a run folder (it holds the run config) resumes in that folder
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "tokensel_config.yaml").write_text("seed_everything: 0\n")
    _touch(tmp_path / "elsewhere" / "step.ckpt", 1_000)
    in_place = _cfg(0.9, ckpt_path="elsewhere/step.ckpt")
    configure_run_dirs(Namespace(fit=in_place), "fit", [])
    assert in_place.trainer.default_root_dir == "elsewhere"


def test_export_needs_a_checkpoint_and_a_valid_dtype(tmp_path, monkeypatch):
    from jsonargparse import Namespace

    from tokensel.errors import ConfigError
    from tokensel.trainer.base_trainer import configure_run_dirs

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"trainer export: no --ckpt_path; pass --ckpt_path last \(this config's "
                                          r"run: checkpoints/random/\w{8}/\).*--allow_untrained true"):
        configure_run_dirs(Namespace(export=_cfg(allow_untrained=False, dtype=None)), "export", [])
    configure_run_dirs(Namespace(export=_cfg(allow_untrained=True, dtype="bfloat16")), "export", [])
    with pytest.raises(ConfigError, match="float64"):
        configure_run_dirs(Namespace(export=_cfg(allow_untrained=True, dtype="float64")), "export", [])
