"""A tiny pixel-space DiT trained with flow matching, with LLSA or dense attention.

Train, export and sample (the recipe header has the full commands):

    trainer fit --config recipes/llsa_dit.yaml                                   # LLSA
    trainer fit --config recipes/llsa_dit.yaml --model.init_args.attention dense --run_name llsa_dit_dense
    trainer export --config recipes/llsa_dit.yaml --ckpt_path best --out exported/llsa_dit
    python -m tokensel.trainer.dit sample --model exported/llsa_dit --out grid.png [--num 16 --steps 20 --seed 0]

Model: `PixelDiT` and its Hugging Face wrapper `LLSADiTModel`, in `tokensel.modules.modeling_llsa_dit`
(the file an export carries as its model code).

Objective (rectified flow, as LLSA's training code): `x_t = (1 - t) x_0 + t eps`, the network predicts
`v = eps - x_0` under MSE, `t ~ U(0, 1)`.

Deviations from the paper's RopeDiT, for a model small enough to train on 2 CPU cores: an additive
2-D sin-cos position embedding instead of 2-D RoPE applied to q and k before pooling (LLSA itself is
unchanged by this; it pools whatever q and k it gets), continuous `t` instead of 1,000 discrete
training timesteps, no EMA, and no resolution-dependent noise rescaling.

Validation draws `t` and `eps` from a generator seeded by the batch index, so `val/loss` is comparable
across runs (dense vs LLSA) at equal steps. Sampling integrates `dx/dt = v` from `t = 1` (noise) to 0
with Euler steps; a grid of samples is written as a PNG into the run's log dir after every validation.

Data (`FashionMNISTDiffusionData`): Fashion-MNIST from the Debian package `dataset-fashion-mnist`
(IDX files read directly, 28x28 padded to 32x32, scaled to [-1, 1]); `synthetic: true` draws
procedural shapes instead, so tests run without the package.

Export: `export_hf` writes `config.json` (`LLSADiTConfig`) + `model.safetensors` (`LLSADiTModel`),
both registered with the transformers Auto classes on import of this module:
`AutoModel.from_pretrained(DIR)` gives the model, `.sample(...)` draws images.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule, LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from transformers import AutoConfig, AutoModel

from tokensel.errors import ConfigError, DataError
from tokensel.modules.modeling_llsa_dit import (
    CONFIG_NAMES,
    NET_KEYS,
    LLSADiTConfig,
    LLSADiTModel,
    PixelDiT,
)
from tokensel.trainer.export import save_hf
from tokensel.trainer.idx import read_idx
from tokensel.trainer.metrics import compute_eval_metrics, eval_metrics, update_mean

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


# ----------------------------------------------------------------------------------------------------
# Objective
# ----------------------------------------------------------------------------------------------------


def flow_matching_loss(net: nn.Module, x0: Tensor, y: Tensor | None, t: Tensor, eps: Tensor,
                       per_sample: bool = False) -> Tensor:
    """Rectified-flow MSE: the network at `x_t = (1 - t) x0 + t eps` regresses `eps - x0`; with `per_sample`,
    each image's own mean `[B]` (their mean is the batch's loss: every image has the same size)."""
    tt = t.view(-1, *([1] * (x0.dim() - 1)))
    xt = (1 - tt) * x0 + tt * eps
    if per_sample:
        return F.mse_loss(net(xt, t, y).float(), (eps - x0).float(), reduction="none").flatten(1).mean(1)
    return F.mse_loss(net(xt, t, y).float(), (eps - x0).float())


# Hugging Face registration (the classes live in tokensel.modules.modeling_llsa_dit, which exports carry)
AutoConfig.register(LLSADiTConfig.model_type, LLSADiTConfig, exist_ok=True)
AutoModel.register(LLSADiTConfig, LLSADiTModel, exist_ok=True)


def save_image_grid(images: Tensor, path: str | Path, nrow: int | None = None) -> Path:
    """Write `[N, C, H, W]` images in [-1, 1] as one PNG grid (PIL); returns the path."""
    from PIL import Image

    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = torch.full((c, rows * (h + 2) + 2, nrow * (w + 2) + 2), -1.0)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = images[i].cpu()
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[..., 0] if c == 1 else arr).save(path)
    return path


# ----------------------------------------------------------------------------------------------------
# LightningModule
# ----------------------------------------------------------------------------------------------------


class FlowMatchingDiT(LightningModule):
    """Flow-matching training of `PixelDiT` with LLSA or dense attention.

    Args:
        image_size, in_channels, width, depth, num_heads, mlp_ratio, num_classes: network size.
        attention: "llsa" | "dense" (same parameters; checkpoints load across).
        levels, block_size, top_k, enrich, reweight, token_order, kernels: LLSA settings (`PixelDiT`).
        num_sample_images: images in the PNG grid written after each validation (0 = none).
        sample_steps: Euler steps for those samples (and the export's default).
        val_seed: seed of the fixed validation noise / timesteps.
    """

    def __init__(self, image_size: int = 32, in_channels: int = 1, width: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10, attention: str = "llsa",
                 levels: int = 2, block_size: int = 8, top_k: int | list[int] = 4, enrich: bool = True,
                 reweight: bool = True, token_order: str = "zorder", kernels: str | None = None,
                 num_sample_images: int = 16, sample_steps: int = 20, val_seed: int = 1234) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = PixelDiT(image_size, in_channels, width, depth, num_heads, mlp_ratio, num_classes, attention,
                            levels, block_size, top_k, enrich, reweight, token_order, kernels)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)

    def _labels(self, batch: dict) -> Tensor | None:
        return batch.get("label") if self.hparams.num_classes > 0 else None

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x0 = batch["image"]
        t = torch.rand(x0.shape[0], device=x0.device)
        loss = flow_matching_loss(self.net, x0, self._labels(batch), t, torch.randn_like(x0))
        self.log("train/loss", loss, prog_bar=True, batch_size=x0.shape[0])
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        """`trainer test`: the validation loss (same fixed noise / timesteps) on the data module's test loader."""
        return self._eval_step(batch, batch_idx, "test")

    def _eval_step(self, batch: dict, batch_idx: int, stage: str) -> Tensor:
        x0 = batch["image"]
        t, eps = self._fixed_noise(batch, batch_idx)
        loss = flow_matching_loss(self.net, x0, self._labels(batch), t, eps, per_sample=True)
        # the mean over every image of the set and all ranks (padding copies of a rank's share weigh 0)
        weight, metrics = batch.get("eval_weight"), eval_metrics(self, stage, ["loss"], sums=("images",))
        update_mean(metrics["loss"], loss, weight)
        update_mean(metrics["images"], weight.sum() if weight is not None else torch.tensor(float(loss.numel())))
        return loss.mean()

    def _fixed_noise(self, batch: dict, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The same (t, eps) for image i of the set in every run and every validation, whatever the batch size
        or number of ranks: dense vs LLSA differ only by the model. Seeded per image index (per batch position
        when the data module gives no index)."""
        x0 = batch["image"]
        index = batch.get("index")
        if index is None:
            index = torch.arange(x0.shape[0]) + batch_idx * x0.shape[0]
        ts, eps = [], []
        for i in index.tolist():
            gen = torch.Generator(device="cpu").manual_seed(self.hparams.val_seed * 1_000_003 + int(i))
            ts.append(torch.rand(1, generator=gen))
            eps.append(torch.randn(x0.shape[1:], generator=gen))
        return torch.cat(ts).to(x0.device), torch.stack(eps).to(x0.device, x0.dtype)

    def _log_eval(self, stage: str) -> None:
        for k, v in compute_eval_metrics(self, stage).items():  # already reduced over ranks
            self.log(f"{stage}/{k}", v, prog_bar=k == "loss", sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        if self.trainer.sanity_checking or self.hparams.num_sample_images <= 0:
            return
        # on every rank: under DDP `log_dir` is a broadcast, and rank 0 alone asking for it waited forever
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir) / "samples"
        if not self.trainer.is_global_zero:
            return
        images = self.net.sample(self.hparams.num_sample_images, self.hparams.sample_steps, seed=0)
        save_image_grid(images, folder / f"step_{self.global_step:07d}.png")

    def export_hf(self, out_dir: str, adapter_only: bool = False, datamodule=None, dtype: str | None = None) -> None:
        """Write `config.json` + `model.safetensors` + the model code (`auto_map`): the folder loads with
        `AutoModel.from_pretrained(out_dir, trust_remote_code=True)` without tokensel (the PyTorch LLSA path),
        or without `trust_remote_code` after `import tokensel` (Triton on CUDA)."""
        if adapter_only:
            raise ConfigError("--adapter_only: FlowMatchingDiT has no adapters; export without it")
        hp = self.hparams
        cfg = LLSADiTConfig(**{CONFIG_NAMES.get(k, k): hp[k] for k in NET_KEYS}, sample_steps=hp.sample_steps)
        model = LLSADiTModel(cfg)
        model.net.load_state_dict(self.net.state_dict())
        save_hf(model, out_dir, dtype, remote_code="llsa_dit")


# ----------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------

def synthetic_shapes(num: int, size: int = 28, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Procedural 28x28 uint8 images in 10 classes (5 shape kinds x 2 brightness), for tests and offline runs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    images = np.zeros((num, size, size), np.uint8)
    labels = rng.integers(0, 10, num).astype(np.int64)
    for i, lab in enumerate(labels):
        cy, cx = rng.uniform(9, size - 9, 2)
        r = rng.uniform(4, 8)
        kind, bright = lab % 5, 255 if lab < 5 else 140
        dist = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
        mask = [np.maximum(abs(yy - cy), abs(xx - cx)) < r,                 # square
                dist < r,                                                     # disc
                (dist < r) & (dist > r - 2.5),                                # ring
                (np.maximum(abs(yy - cy), abs(xx - cx)) < r) & ((yy.astype(int) // 2) % 2 == 0),  # stripes
                ((abs(yy - cy) < 1.5) | (abs(xx - cx) < 1.5)) & (dist < r + 2)][kind]          # cross
        images[i][mask] = bright
    return images, labels


class _ImageSet(Dataset):
    """`{"image": [1, S, S] float in [-1, 1], "label": int64, "index": i}` items from uint8 arrays padded to S
    (the index seeds the image's fixed validation noise)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, size: int) -> None:
        x = torch.from_numpy(np.array(images, dtype=np.float32)).div(127.5).sub(1.0).unsqueeze(1)
        pad = size - x.shape[-1]
        lo, hi = pad // 2, pad - pad // 2
        self.images = F.pad(x, (lo, hi, lo, hi), value=-1.0)  # pad with the black background
        self.labels = torch.from_numpy(np.asarray(labels, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": self.labels[i], "index": i}


class FashionMNISTDiffusionData(LightningDataModule):
    """Fashion-MNIST (Debian `dataset-fashion-mnist`) as 32x32 images in [-1, 1] for diffusion.

    Args:
        data_dir: folder with `{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`.
        batch_size: per-device batch size.
        image_size: output side (>= 28; the 28x28 images are padded with background).
        train_limit: use only the first n training images (None = all 60,000).
        val_limit: validation images from the test split (None = all 10,000).
        synthetic: procedural shapes instead of Fashion-MNIST (no package needed).
        synthetic_size: number of synthetic training images (validation gets a quarter, at least 8).
        num_workers: DataLoader workers.
        seed: seed of the synthetic data.
    """

    def __init__(self, data_dir: str = DEFAULT_FASHION_MNIST_DIR, batch_size: int = 64, image_size: int = 32,
                 train_limit: int | None = None, val_limit: int | None = 1000, synthetic: bool = False,
                 synthetic_size: int = 512, num_workers: int = 0, seed: int = 0) -> None:
        super().__init__()
        if image_size < 28:
            raise ConfigError(f"data.image_size={image_size}: Fashion-MNIST is 28x28; use 28 or more (32 pads)")
        self.data_dir, self.batch_size, self.image_size = data_dir, batch_size, image_size
        self.train_limit, self.val_limit = train_limit, val_limit
        self.synthetic, self.synthetic_size, self.num_workers, self.seed = synthetic, synthetic_size, num_workers, seed
        self.train_set: _ImageSet | None = None
        self.val_set: _ImageSet | None = None

    def _split(self, prefix: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
        folder = Path(self.data_dir)
        img, lab = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
        if not img.exists() or not lab.exists():
            raise DataError(f"data.data_dir={self.data_dir}: no {img.name} / {lab.name}; run "
                            "`apt-get install -y dataset-fashion-mnist` or set data.init_args.synthetic: true")
        images, labels = read_idx(img), read_idx(lab)
        if images.ndim != 3 or len(images) != len(labels) or images.shape[1] != images.shape[2]:
            raise DataError(f"{img}: expected [n, H, H] single-channel images, one per label of {lab.name}, got "
                            f"images {list(images.shape)} and {len(labels)} labels")
        if images.shape[1] > self.image_size:
            raise DataError(f"{img}: {images.shape[1]}x{images.shape[2]} images do not fit data.image_size="
                            f"{self.image_size} (images are padded, never cropped); raise image_size")
        if images.dtype != np.uint8 or labels.dtype.kind not in "iu" or labels.ndim != 1 or (labels < 0).any():
            raise DataError(f"{img} / {lab.name}: expected uint8 pixels and non-negative integer labels, got "
                            f"{images.dtype} pixels and {labels.dtype} labels {list(labels.shape)}")
        return images[:limit], labels[:limit]

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        if self.synthetic:
            n_val = max(8, self.synthetic_size // 4)
            tr = synthetic_shapes(self.synthetic_size, seed=self.seed)
            va = synthetic_shapes(n_val, seed=self.seed + 1)
        else:
            tr, va = self._split("train", self.train_limit), self._split("t10k", self.val_limit)
        self.train_set = _ImageSet(*tr, self.image_size)
        self.val_set = _ImageSet(*va, self.image_size)

    def train_dataloader(self) -> DataLoader:
        from tokensel.trainer.data.sampler import rank_sampler

        sampler = rank_sampler(self.trainer, self.train_set, True, self.seed, drop_last=True)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=sampler is None, sampler=sampler,
                          drop_last=True, num_workers=self.num_workers, persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Each data-parallel rank scores its own share (`EvalShard`); one process reads the whole set."""
        from tokensel.trainer.data.sampler import eval_share

        return DataLoader(eval_share(self.trainer, self.val_set, weighted=True), batch_size=self.batch_size,
                          shuffle=False, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        """The validation images (Fashion-MNIST's t10k split, or the synthetic validation set)."""
        return self.val_dataloader()


# ----------------------------------------------------------------------------------------------------
# `python -m tokensel.trainer.dit sample --model DIR --out grid.png`
# ----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Sample a PNG grid from an exported folder."""
    parser = argparse.ArgumentParser(prog="python -m tokensel.trainer.dit")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sample", help="draw a grid of samples from an exported LLSA DiT folder")
    s.add_argument("--model", required=True, help="folder written by `trainer export`")
    s.add_argument("--out", default="grid.png", help="PNG file to write")
    s.add_argument("--num", type=int, default=16, help="number of images")
    s.add_argument("--steps", type=int, default=None, help="Euler steps (default: the config's sample_steps)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--label", type=int, default=None, help="one class for all images (default: cycle classes)")
    args = parser.parse_args(argv)
    if not Path(args.model, "config.json").exists():
        raise SystemExit(f"error: --model {args.model}: no config.json; pass a folder written by `trainer export`")
    model = AutoModel.from_pretrained(args.model).eval()
    labels = torch.full((args.num,), args.label) if args.label is not None else None
    images = model.sample(args.num, args.steps, labels, args.seed)
    print(f"wrote {save_image_grid(images, args.out)}")


__all__ = ["FlowMatchingDiT", "FashionMNISTDiffusionData", "LLSADiTConfig", "LLSADiTModel", "PixelDiT",
           "flow_matching_loss", "read_idx", "save_image_grid"]

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    main()
