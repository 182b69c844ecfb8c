"""The LLSA DiT recipe end to end on a tiny config: 2-step fit (val/loss logged, a PNG grid written),
HF export whose AutoModel outputs equal the trained module's, the sampling command, and the
Fashion-MNIST IDX reader."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel

from tokensel.cli import cli_main
from tokensel.errors import ConfigError, DataError
from tokensel.trainer.dit import (
    DEFAULT_FASHION_MNIST_DIR,
    FashionMNISTDiffusionData,
    FlowMatchingDiT,
    LLSADiTModel,
    PixelDiT,
    main,
    read_idx,
)

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "recipes" / "llsa_dit.yaml"
TINY = ROOT / "tests" / "integration" / "tiny" / "llsa_dit.yaml"


def test_fit_export_roundtrip_and_sample(in_tmp):
    cli = cli_main(["fit", "--config", str(RECIPE), "--config", str(TINY), "--trainer.max_steps", "2"])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    run = Path(cli.trainer.default_root_dir)  # checkpoints/llsa_dit/<config hash>
    assert (run / "last.ckpt").exists()
    grids = list(run.glob("**/samples/step_*.png"))
    assert grids and Image.open(grids[0]).size == (2 * 34 + 2, 2 * 34 + 2)  # 2x2 grid of 32px + 2px borders

    cli_main(["export", "--config", str(RECIPE), "--config", str(TINY), "--ckpt_path", "last", "--out", "exported"])
    hf = AutoModel.from_pretrained(in_tmp / "exported")
    assert isinstance(hf, LLSADiTModel) and hf.config.attention == "llsa"
    trained = FlowMatchingDiT.load_from_checkpoint(run / "last.ckpt").eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 32, 32, generator=g), torch.rand(3, generator=g), torch.tensor([0, 4, 9])
    with torch.no_grad():
        assert torch.equal(hf(x, t, y), trained(x, t, y))
        # the live model holds the same values in other buffers (oneDNN's blocking may follow alignment): one
        # 2-thread full-suite run found them not bit-equal (magnitude not captured), so compare to 1e-5 here
        torch.testing.assert_close(hf(x, t, y), cli.model.eval()(x, t, y), atol=1e-5, rtol=0)

    main(["sample", "--model", str(in_tmp / "exported"), "--out", "grid.png", "--num", "4", "--steps", "2"])
    assert Image.open(in_tmp / "grid.png").size == (70, 70)


def test_dense_setting_has_the_same_parameters():
    llsa = PixelDiT(width=32, depth=1, num_heads=2, attention="llsa")
    dense = PixelDiT(width=32, depth=1, num_heads=2, attention="dense")
    dense.load_state_dict(llsa.state_dict())
    x = torch.randn(2, 1, 32, 32)
    assert dense(x, torch.rand(2)).shape == x.shape
    with pytest.raises(ConfigError, match="attention"):
        PixelDiT(attention="sparse")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_and_datamodule(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(5))
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), images)
    dm = FashionMNISTDiffusionData(data_dir=str(tmp_path), batch_size=2)
    dm.setup()
    item = dm.val_set[1]
    assert item["image"].shape == (1, 32, 32) and item["label"] == 1
    assert item["image"][0, 0].eq(-1).all(), "28 -> 32 pads with the black background"
    torch.testing.assert_close(item["image"][0, 2:30, 2:30], torch.tensor(images[1] / 127.5 - 1, dtype=torch.float32))

    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04"))
    with pytest.raises(DataError, match="IDX"):
        read_idx(tmp_path / "bad.gz")
    with pytest.raises(DataError, match="apt-get install -y dataset-fashion-mnist"):
        FashionMNISTDiffusionData(data_dir=str(tmp_path / "missing")).setup()


@pytest.mark.skipif(not Path(DEFAULT_FASHION_MNIST_DIR, "t10k-images-idx3-ubyte.gz").exists(),
                    reason="apt-get install -y dataset-fashion-mnist")
def test_real_fashion_mnist_loads():
    dm = FashionMNISTDiffusionData(train_limit=100, val_limit=50)
    dm.setup()
    assert len(dm.train_set) == 100 and len(dm.val_set) == 50
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (1, 32, 32) and batch["image"].min() >= -1 and batch["image"].max() <= 1
