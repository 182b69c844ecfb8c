"""One folder per run through the CLI: a sweep value gets its own folder, `--ckpt_path last` resumes the run
the config names, a rerun of a finished config is refused, hparams.yaml names the selector, and `trainer
export` refuses without a checkpoint, writes the training config beside the weights and takes `--dtype`."""

import contextlib
import io
from pathlib import Path

import pytest
import torch
import yaml

from tokensel.cli import cli_main, main

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ["--config", str(ROOT / "recipes" / "random.yaml"), "--config", str(ROOT / "tests" / "integration" / "tiny" /
                                                                           "_lm.yaml")]
K = "--model.init_args.selector.init_args.k"


def _run(*args):
    """`main(args)` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([*map(str, args)])
        except SystemExit as e:
            code = e.code or 0
    return code, out.getvalue(), err.getvalue()


def _step(ckpt: Path) -> int:
    return torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"]


def test_sweep_folders_resume_and_rerun(in_tmp):
    for k in ("0.3", "0.7"):
        code, out, err = _run("fit", *RECIPE, K, k, "--trainer.max_steps", 2)
        assert code == 0, err[-2000:]
    runs = sorted(p for p in (in_tmp / "checkpoints" / "random").iterdir())
    assert len(runs) == 2 and all(len(p.name) == 8 for p in runs)  # checkpoints/random/<hash>, one per k
    by_k = {yaml.safe_load((p / "tokensel_config.yaml").read_text())["model"]["init_args"]["selector"]["init_args"]
            ["k"]: p for p in runs}
    assert set(by_k) == {0.3, 0.7}
    assert _step(by_k[0.3] / "last.ckpt") == 2 and _step(by_k[0.7] / "last.ckpt") == 2

    # --ckpt_path last resumes the run this config names (k=0.3), though k=0.7's files are newer
    code, out, err = _run("fit", *RECIPE, K, "0.3", "--trainer.max_steps", 3, "--ckpt_path", "last")
    assert code == 0, err[-2000:]
    rel = by_k[0.3].relative_to(in_tmp)
    assert f"tokensel: run folder {rel}; resuming {rel}/last.ckpt" in out
    assert _step(by_k[0.3] / "last.ckpt") == 3 and _step(by_k[0.7] / "last.ckpt") == 2
    assert sorted(p.name for p in by_k[0.3].glob("last*.ckpt")) == ["last.ckpt"]

    # the same command again, fresh: refused with one line, nothing written
    before = sorted(p.name for p in by_k[0.3].iterdir())
    code, out, err = _run("fit", *RECIPE, K, "0.3")
    assert code == 2 and "Traceback" not in err
    assert f"error: {rel}/ already holds a run of this config" in err and "--ckpt_path last" in err
    assert sorted(p.name for p in by_k[0.3].iterdir()) == before

    # a config that never ran: `last` is an error naming the runs that exist, not a silent fresh start
    code, out, err = _run("fit", *RECIPE, K, "0.5", "--ckpt_path", "last")
    assert code == 2 and "no last checkpoint in checkpoints/random/" in err
    assert str(by_k[0.3].relative_to(in_tmp)) in err and str(by_k[0.7].relative_to(in_tmp)) in err

    # --run_name keeps its meaning: checkpoints/<run_name>
    code, out, err = _run("fit", *RECIPE, "--trainer.max_steps", 1, "--run_name", "named")
    assert code == 0 and (in_tmp / "checkpoints" / "named" / "last.ckpt").exists()


def test_hparams_yaml_names_the_selector_and_data(in_tmp):
    cli = cli_main(["fit", *RECIPE, K, "0.3", "--trainer.max_steps", "1", "--trainer.logger", "null"])
    (hp_file,) = Path(cli.trainer.default_root_dir).glob("lightning_logs/version_*/hparams.yaml")
    hp = yaml.safe_load(hp_file.read_text())
    assert hp["selector_class"] == "tokensel.modules.basic.RandomSelection"
    assert hp["selector_args"] == {"k": 0.3, "seed": 0, "scope": "batch"}
    assert hp["data"]["class_path"] == "tokensel.SFTDataModule" and hp["data"]["batch_size"] == 4
    # logged, not checkpointed: the checkpoint's hparams stay constructor arguments (a file resume parses them)
    ckpt = torch.load(Path(cli.trainer.default_root_dir) / "last.ckpt", map_location="cpu", weights_only=False)
    assert "selector_class" not in ckpt["hyper_parameters"]
    code, out, err = _run("fit", *RECIPE, K, "0.3", "--trainer.max_steps", 2, "--ckpt_path",
                          Path(cli.trainer.default_root_dir) / "last.ckpt")
    assert code == 0, err[-2000:]


def test_export_refuses_untrained_and_writes_the_training_config(in_tmp):
    code, out, err = _run("export", *RECIPE, "--out", "hf")
    assert code == 2 and "trainer export: no --ckpt_path" in err and "--allow_untrained true" in err
    assert not (in_tmp / "hf").exists() and not (in_tmp / "hf.tmp").exists()

    assert _run("fit", *RECIPE, "--trainer.max_steps", 2)[0] == 0
    code, out, err = _run("fit", *RECIPE, "--trainer.max_steps", 3, "--ckpt_path", "last")
    assert code == 0, err[-2000:]
    # export needs only the recipe: run length and logger settings do not rename the run
    code, out, err = _run("export", *RECIPE, "--ckpt_path", "last", "--out", "hf")
    assert code == 0, err[-2000:]
    cfg = yaml.safe_load((in_tmp / "hf" / "tokensel_config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 3  # the config that trained the weights (the resumed fit's)
    assert cfg["model"]["init_args"]["selector"]["class_path"].endswith("RandomSelection")
    assert (in_tmp / "hf" / "config.json").exists()

    code, out, err = _run("export", *RECIPE, "--allow_untrained", "true", "--out", "init")
    assert code == 0, err[-2000:]
    text = (in_tmp / "init" / "tokensel_config.yaml").read_text()
    assert yaml.safe_load(text)["allow_untrained"] is True  # the config export parsed


@pytest.mark.parametrize("recipe", ["dyt", "llsa_dit"])
def test_export_dtype_for_image_families(in_tmp, recipe):
    from safetensors import safe_open

    cfgs = ["--config", ROOT / "recipes" / f"{recipe}.yaml", "--config", ROOT / "tests" / "integration" / "tiny" /
            f"{recipe}.yaml"]
    code, out, err = _run("export", *cfgs, "--allow_untrained", "true", "--dtype", "bfloat16", "--out", "bf16")
    assert code == 0, err[-2000:]
    with safe_open(str(in_tmp / "bf16" / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch.bfloat16 in dtypes and torch.float32 not in dtypes
    assert (in_tmp / "bf16" / "tokensel_config.yaml").exists()
