"""ViT recipes end to end: tiny fits through the CLI, `trainer export`, and a fresh process that only
imports tokensel and loads the folders with AutoModelForImageClassification (same logits as the trained
module in eval mode, atol 1e-5 fp32); the backbone cache and its pretraining fallback; the image data."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokensel.cli import cli_main
from tokensel.errors import ConfigError, DataError
from tokensel.trainer import vit as vit_mod
from tokensel.trainer.vision_data import ImageClassificationData, read_idx
from tokensel.trainer.vit import TokenselViTForImageClassification, ViTClassifier, to_plain_vit

ROOT = Path(__file__).resolve().parents[2]
TINY_VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=28,
                patch_size=7, num_channels=1)
CHECK = """
import sys, torch, tokensel
from transformers import AutoModelForImageClassification
saved = torch.load(sys.argv[1])
for name, (folder, x, logits) in saved.items():
    model = AutoModelForImageClassification.from_pretrained(folder)
    with torch.no_grad():
        diff = (model(x).logits - logits).abs().max().item()
    print(name, type(model).__name__, diff)
    assert diff <= 1e-5, (name, diff)
"""


def fit_and_export(recipe: str, tmp: Path) -> Path:
    """2-step tiny fit of recipes/<recipe>.yaml, then `trainer export` of its last checkpoint."""
    cfgs = ["--config", str(ROOT / "recipes" / f"{recipe}.yaml"), "--config",
            str(ROOT / "tests" / "integration" / "tiny" / f"{recipe}.yaml")]
    cli_main(["fit", *cfgs, "--trainer.max_steps", "2"])
    out = tmp / "exported" / recipe
    cli_main(["export", *cfgs, "--ckpt_path", "last", "--out", str(out)])  # last of the run these configs name
    return out


def test_export_round_trip_in_a_fresh_process(in_tmp):
    torch.manual_seed(0)
    x = torch.randn(6, 1, 28, 28)
    saved = {}
    for recipe in ("dyt", "spa", "vit_adapter", "vit_full_ft"):
        folder = fit_and_export(recipe, in_tmp)
        assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
        (last,) = (in_tmp / "checkpoints" / recipe).glob("*/last.ckpt")  # checkpoints/<recipe>/<config hash>
        module = ViTClassifier.load_from_checkpoint(last).eval()
        with torch.no_grad():
            logits = module(x)
            out = module.model(x, mode=module.eval_mode)
        rates = [m[:, 1:].mean().item() for m in out.keep_masks]
        assert all(0.0 < r < 1.0 for r in rates), (recipe, rates)  # selection is non-trivial
        saved[recipe] = (str(folder), x, logits)
    (pictures,) = (in_tmp / "checkpoints" / "dyt").glob("*/pictures")
    assert sorted(p.name for p in pictures.iterdir())[0].endswith(".png")
    assert json.loads((in_tmp / "exported" / "vit_full_ft" / "config.json").read_text())["model_type"] == "vit"
    assert json.loads((in_tmp / "exported" / "dyt" / "config.json").read_text())["model_type"] == "tokensel_vit"
    torch.save(saved, in_tmp / "logits.pt")
    proc = subprocess.run([sys.executable, "-c", CHECK, str(in_tmp / "logits.pt")], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "vit_full_ft ViTForImageClassification" in proc.stdout
    assert "dyt TokenselViTForImageClassification" in proc.stdout


def test_backbone_cache_and_pretraining_fallback(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TOKENSEL_CACHE", str(tmp_path))
    monkeypatch.setattr(vit_mod, "SMALL_VIT", TINY_VIT)
    monkeypatch.setattr(vit_mod, "PRETRAIN_DATA", dict(dataset="synthetic", image_size=28, batch_size=64,
                                                        synthetic_sizes=(128, 32, 32), mask_source="none"))
    # missing + no pretraining: random init with a warning
    ViTClassifier(backbone="cache:tiny", pretrain_if_missing=False, pictures=0)
    assert "random init" in caplog.text
    # missing: pretrained on first use (logged), written as a stock ViT folder, then loaded
    caplog.clear()
    m = ViTClassifier(backbone="cache:tiny", method="dynamic_tuning", pictures=0)
    assert "pretraining it now" in caplog.text
    folder = tmp_path / "vit" / "tiny"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "vit"
    from transformers import ViTForImageClassification

    src = ViTForImageClassification.from_pretrained(str(folder))
    torch.testing.assert_close(m.model.vit.layers[1].mlp.fc1.weight, src.vit.layers[1].mlp.fc1.weight)
    assert not any(p.requires_grad for p in m.model.vit.parameters())  # finetune: adapter freezes the backbone
    assert all(p.requires_grad for p in m.model.dispatchers.parameters())


def test_config_errors():
    with pytest.raises(ConfigError, match="method"):
        ViTClassifier(method="dyt", backbone=None)
    with pytest.raises(ConfigError, match="backbone"):
        ViTClassifier(backbone="/no/such/folder", vit_config=TINY_VIT)
    m = ViTClassifier(backbone=None, vit_config=TINY_VIT, pictures=0)
    with pytest.raises(ConfigError, match="image_size"):
        m._check_batch({"pixel_values": torch.zeros(1, 1, 56, 56)})
    with pytest.raises(ConfigError, match="adapter_only"):
        m.export_hf("unused", adapter_only=True)
    with pytest.raises(ConfigError, match="dataset"):
        ImageClassificationData(dataset="cifar")


def test_to_plain_vit_rejects_adapters():
    m = ViTClassifier(backbone=None, vit_config=TINY_VIT, pictures=0)
    assert isinstance(m.model, TokenselViTForImageClassification)
    with pytest.raises(ConfigError):
        to_plain_vit(m.model)


# ---------------------------------------------------------------- data ---------------------------------


def test_synthetic_batches_have_masks_and_resize():
    dm = ImageClassificationData(dataset="synthetic", image_size=56, batch_size=4, synthetic_sizes=(16, 8, 8))
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["pixel_values"].shape == (4, 1, 56, 56) and b["mask"].shape == (4, 1, 56, 56)
    assert 0 < b["mask"].mean() < 0.7 and b["labels"].dtype == torch.long
    assert len(dm.val_set) == 8 and len(dm.test_set) == 8


def write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_reader(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("t10k", 10)):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    assert read_idx(tmp_path / "t10k-labels-idx1-ubyte.gz").shape == (10,)
    dm = ImageClassificationData(dataset="fashion_mnist", path=str(tmp_path), val_size=5, batch_size=5,
                                 mask_source="none")
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, 10)
    assert "mask" not in next(iter(dm.val_dataloader()))
    with pytest.raises(DataError, match="dataset-fashion-mnist"):
        ImageClassificationData(dataset="fashion_mnist", path=str(tmp_path / "missing")).setup()


def test_folder_and_hf_datasets(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    dm = ImageClassificationData(dataset="folder", path=str(tmp_path / "imgs"), image_size=16, channels=3,
                                 batch_size=2, val_size=2, test_size=2)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["pixel_values"].shape == (2, 3, 16, 16) and len(dm.train_set) == 6

    import datasets

    imgs = [Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)) for _ in range(6)]
    ds = datasets.Dataset.from_dict({"image": imgs, "label": [0, 1, 0, 1, 0, 1],
                                     "boxes": [[[0, 0, 16, 16]]] * 6})
    ds.save_to_disk(str(tmp_path / "hf"))
    dm = ImageClassificationData(dataset="hf", path=str(tmp_path / "hf"), image_size=8, batch_size=3,
                                 mask_source="boxes", boxes_column="boxes", val_size=3)
    dm.setup()
    b = next(iter(dm.train_dataloader()))
    assert b["mask"][:, 0, :4, :4].min() == 1 and b["mask"][:, 0, 4:, :].max() == 0
