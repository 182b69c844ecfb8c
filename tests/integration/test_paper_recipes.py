"""recipes/paper/*.yaml (one per method at its published setting) and configs/scale/gpu.yaml parse offline with
`--print_config` (which loads no model and no data), the printed config parses again, the published values the
method notes give survive the resolution, the key values carry a citation comment, and no recipe fixes the length
of its lr schedule. They are not fitted here: they name hub models and GPUs (tests/integration/test_recipes.py
fits the demo recipes, and only recipes/*.yaml)."""

import re
from pathlib import Path

import pytest
import yaml

from tokensel.cli import cli_main

ROOT = Path(__file__).resolve().parents[2]
PAPER = sorted((ROOT / "recipes" / "paper").glob("*.yaml"))
GPU = ROOT / "configs" / "scale" / "gpu.yaml"
IMAGE_DATA = ("ImageClassificationData", "FashionMNISTDiffusionData")
LM_RECIPES = ["sstoken", "rho1", "rho1_reference", "rho1_static", "sft", "random", "qtuning", "eslm", "ada_eslm"]

# (dotted key in the resolved config, published value) from /work/shared/methods/*.md
PUBLISHED = {
    "sstoken": {"model.init_args.model": "meta-llama/Llama-3.2-3B", "data.init_args.train_files": ["jlpang888/DS2_50k"],
                "model.init_args.selector.init_args.rho": 0.6, "model.init_args.selector.init_args.gamma": 0.5,
                "model.init_args.lora.r": 64, "model.init_args.lora.alpha": 16, "model.init_args.lora.dropout": 0.1,
                "optimizer.init_args.lr": 1e-4, "lr_scheduler.init_args.warmup_ratio": 0.03,
                "lr_scheduler.init_args.decay": "linear", "trainer.max_epochs": 1, "data.init_args.max_length": 2048},
    "random": {"model.init_args.selector.init_args.k": 0.6, "model.init_args.lora.r": 64,
               "optimizer.init_args.lr": 1e-4},
    "rho1": {"model.init_args.selector.init_args.k": 0.6, "optimizer.init_args.lr": 8e-5,
             "data.init_args.train_files": ["open-web-math/open-web-math"], "data.init_args.max_length": 2048,
             "model.init_args.lora": None},
    "eslm": {"model.init_args.model_config.n_layer": 12, "model.init_args.model_config.n_embd": 768,
             "data.init_args.train_files": ["DKYoon/SlimPajama-6B"],
             "model.init_args.selector.init_args.score": "loss"},
    "ada_eslm": {"model.init_args.selector.class_path": "tokensel.AdaEslmSelection"},
    "qtuning": {"model.init_args.model": "HuggingFaceTB/SmolLM2-1.7B",
                "data.init_args.train_files": ["TIGER-Lab/MathInstruct"],
                "model.init_args.selector.init_args.sample_ratio": 0.25,
                "model.init_args.selector.init_args.token_ratio": 0.5, "model.init_args.selector.init_args.lam": 0.5,
                "model.init_args.lora.r": 8, "optimizer.init_args.lr": 1e-4, "trainer.max_epochs": 3,
                "trainer.accumulate_grad_batches": 4, "data.init_args.batch_size": 8,
                "lr_scheduler.init_args.decay": "cosine"},
    "dyt": {"model.init_args.backbone": "google/vit-base-patch16-224-in21k", "model.init_args.keep_rate": 0.5,
            "model.init_args.adapter_bottleneck": 64, "model.init_args.tau": 5.0, "model.init_args.rate_weight": 2.0,
            "optimizer.init_args.lr": 4e-3, "optimizer.init_args.weight_decay": 0.01, "trainer.max_epochs": 100,
            "lr_scheduler.init_args.warmup_ratio": 0.2, "data.init_args.batch_size": 128},
    "spa": {"model.init_args.method": "spa", "model.init_args.finetune": "full",
            "model.init_args.adapter_bottleneck": 0},
    "llsa_dit": {"model.init_args.width": 384, "model.init_args.depth": 12, "model.init_args.num_heads": 6,
                 "model.init_args.image_size": 128, "model.init_args.levels": 2, "model.init_args.block_size": 16,
                 "model.init_args.top_k": 8, "optimizer.init_args.lr": 1e-4, "optimizer.init_args.weight_decay": 0.01,
                 "data.init_args.batch_size": 16, "trainer.max_epochs": 10, "lr_scheduler.init_args.decay": "constant"},
}
# keys whose value a paper recipe must cite (or mark as ours) in a comment on the same line
CITED = ("model", "backbone", "train_files", "path", "r", "lr", "max_steps", "max_epochs", "k", "rho", "alpha",
         "sample_ratio", "token_ratio", "keep_rate", "top_k", "warmup_ratio", "decay")


def _printed(capsys, *configs: Path) -> dict:
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        cli_main(args)
    assert e.value.code in (0, None)
    return capsys.readouterr().out


def _get(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def test_one_paper_recipe_per_method():
    assert {p.stem for p in PAPER} == set(PUBLISHED)


@pytest.mark.parametrize("recipe", PAPER, ids=[p.stem for p in PAPER])
def test_paper_recipe_parses_offline_with_the_published_values(recipe, in_tmp, capsys):
    printed = _printed(capsys, recipe)
    cfg = yaml.safe_load(printed)
    assert cfg["model"]["class_path"].startswith("tokensel.")
    for key, want in PUBLISHED[recipe.stem].items():
        assert _get(cfg, key) == want, key
    # the schedule is sized from the run: WarmupDecay with no length
    assert cfg["lr_scheduler"]["class_path"] == "tokensel.trainer.schedules.WarmupDecay"
    assert cfg["lr_scheduler"]["init_args"]["total_steps"] is None
    assert cfg["trainer"]["precision"] == "bf16-mixed" and cfg["trainer"]["accelerator"] == "gpu"
    if cfg["trainer"]["devices"] != 1 and cfg["data"]["class_path"].endswith(IMAGE_DATA):
        # image / diffusion loaders are plain DataLoaders: without this every GPU would train on the same batches
        assert cfg["trainer"]["use_distributed_sampler"] is True
    (in_tmp / "printed.yaml").write_text(printed)
    _printed(capsys, in_tmp / "printed.yaml")  # the printed config parses again


@pytest.mark.parametrize("recipe", PAPER, ids=[p.stem for p in PAPER])
def test_paper_recipe_cites_its_key_values(recipe):
    text = recipe.read_text()
    assert "total_iters" not in text
    uncited = [ln.strip() for ln in text.splitlines()
               if (m := re.match(r"\s*(\w+):\s*\S", ln)) and m.group(1) in CITED and "#" not in ln]
    assert not uncited, uncited


@pytest.mark.parametrize("recipe", LM_RECIPES)
def test_gpu_overlay_parses_on_every_lm_recipe(recipe, in_tmp, capsys):
    cfg = yaml.safe_load(_printed(capsys, ROOT / "recipes" / f"{recipe}.yaml", GPU))
    trainer, model, data = cfg["trainer"], cfg["model"]["init_args"], cfg["data"]["init_args"]
    assert (trainer["precision"], model["dtype"]) == ("bf16-mixed", "float32")  # the one documented pair
    assert model["kernels"] == "triton"
    assert (trainer["max_steps"], trainer["max_epochs"]) == (-1, 1)  # the length (and the schedule's) from the data
    assert trainer["limit_val_batches"] == 1.0 and trainer["save_every_n_steps"] == 200
    assert data["batch_size"] == 8 and data["max_length"] == 2048
    assert cfg["lr_scheduler"]["init_args"]["total_steps"] is None


def test_gpu_overlay_documents_every_key():
    uncommented = [ln for ln in GPU.read_text().splitlines()
                   if re.match(r"\s+\w+:\s*\S", ln) and "#" not in ln]
    assert not uncommented, uncommented
