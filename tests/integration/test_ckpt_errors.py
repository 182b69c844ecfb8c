"""`--ckpt_path` that is missing, not a checkpoint (random bytes, a copy cut short) or another model's / recipe's:
one line naming the file and what differs, for fit, validate, test and predict; never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tokensel.cli import cli_main
from tokensel.errors import TokenselError

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "integration" / "tiny" / "_lm.yaml"
LM = ["--config", str(ROOT / "recipes" / "random.yaml"), "--config", str(TINY), "--trainer.logger", "false"]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpts")
    cwd = os.getcwd()
    os.chdir(d)
    try:
        cli_main(["fit", *LM, "--run_name", "lm", "--trainer.max_steps", "1"])
        cli_main(["fit", "--config", str(ROOT / "recipes" / "dyt.yaml"), "--config",
                  str(ROOT / "tests" / "integration" / "tiny" / "dyt.yaml"), "--trainer.logger", "false",
                  "--run_name", "vit", "--trainer.max_steps", "1"])
    finally:
        os.chdir(cwd)
    good = d / "checkpoints" / "lm" / "last.ckpt"
    (d / "junk.ckpt").write_bytes(os.urandom(4096))
    (d / "cut.ckpt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    return d


@pytest.mark.parametrize("verb", ["fit", "validate", "test", "predict"])
@pytest.mark.parametrize("name,msg", [("nope.ckpt", "no such file or directory"),
                                      ("junk.ckpt", "not a checkpoint (not a complete torch zip archive"),
                                      ("cut.ckpt", "not a checkpoint (not a complete torch zip archive"),
                                      ("checkpoints/vit/last.ckpt", "written by a ViTClassifier run, but this "
                                                                    "config's model is SelectiveLM")])
def test_a_bad_ckpt_path_is_one_line_for_every_verb(ckpts, in_tmp, verb, name, msg):
    with pytest.raises(TokenselError) as e:
        cli_main([verb, *LM, "--run_name", f"x{verb}", "--trainer.max_steps", "2", "--ckpt_path",
                  str(ckpts / name)])
    assert f"--ckpt_path {ckpts / name}: {msg}" in str(e.value) and "\n" not in str(e.value)
    assert not (in_tmp / "checkpoints" / f"x{verb}" / "last.ckpt").exists()


def test_a_checkpoint_of_another_model_size_is_refused_naming_the_shapes(ckpts, in_tmp):
    import shutil

    (in_tmp / "checkpoints" / "lm").mkdir(parents=True)
    shutil.copy(ckpts / "checkpoints" / "lm" / "last.ckpt", in_tmp / "checkpoints" / "lm" / "last.ckpt")
    with pytest.raises(TokenselError, match=r"written for another model or recipe.*of another shape \(e\.g\. "
                                            r"model\..*checkpoint \[\d+(, \d+)*\], model \[\d+(, \d+)*\]\)"):
        cli_main(["fit", *LM, "--run_name", "lm", "--trainer.max_steps", "2", "--ckpt_path", "last",
                  "--config", str(_wider(in_tmp))])


def _wider(folder: Path) -> Path:
    """An overlay whose tiny model has a wider MLP (the same recipe, another model size)."""
    import yaml

    cfg = yaml.safe_load(TINY.read_text())["model"]["init_args"]["model_config"]
    out = folder / "wider.yaml"
    out.write_text(yaml.safe_dump({"model": {"init_args": {"model_config": {**cfg, "intermediate_size": 48}}}}))
    return out


def test_the_console_prints_the_line_and_exits_2(ckpts, tmp_path):
    r = subprocess.run([sys.executable, "-m", "tokensel", "test", *LM, "--ckpt_path", str(ckpts / "junk.ckpt")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [
        f"error: --ckpt_path {ckpts / 'junk.ckpt'}: not a checkpoint (not a complete torch zip archive: truncated, "
        "random bytes or another format); pass a .ckpt written by trainer fit"]
