"""Property-based checks of the image data: files of any size, mode and channel count, truncated files and
random bytes, HF rows of odd values, and IDX files of the wrong shape or type either load as `uint8 [C, S, S]`
or stop with one `DataError` naming the file / row; never another exception."""

import collections
import gzip
import io
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tokensel.errors import DataError
from tokensel.trainer.vision_data import hf_split, load_folder

CASES = collections.Counter()
N = int(os.environ.get("TOKENSEL_FUZZ_EXAMPLES", "25"))
FUZZ = settings(max_examples=N, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "LA", "I", "I;16", "F", "YCbCr"]
FORMATS = {"png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "tiff": ".tif", "gif": ".gif", "webp": ".webp"}


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    print("\nimage fuzz outcomes: " + ", ".join(f"{k}={v}" for k, v in sorted(CASES.items())))


def _check(kind, load, where: str, channels: int, size: int):
    try:
        item = load(0)
    except DataError as e:
        msg = str(e)
        assert where in msg and "\n" not in msg and len(msg) < 600, msg
        CASES[f"{kind}:error"] += 1
        return
    x = item["image"]
    assert x.dtype == torch.uint8 and tuple(x.shape) == (channels, size, size), (x.dtype, x.shape)
    CASES[f"{kind}:loaded"] += 1


def _image(mode, w, h, seed):
    rng = np.random.default_rng(seed)
    rgb = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode in ("I", "I;16", "F"):
        return Image.fromarray(rng.integers(0, 60000, (h, w)).astype(np.int32 if mode == "I" else np.float32)) \
            if mode != "I;16" else Image.fromarray(rng.integers(0, 60000, (h, w)).astype(np.uint16))
    return rgb.convert(mode)


@FUZZ
@given(st.sampled_from(MODES), st.integers(1, 90), st.integers(1, 90), st.sampled_from(sorted(FORMATS)),
       st.sampled_from([None, 0, 10, 40, 200]), st.sampled_from([1, 3]), st.integers(0, 9))
def test_folder_images_of_any_size_mode_format_or_truncation(mode, w, h, fmt, cut, channels, seed):
    root = Path(tempfile.mkdtemp(prefix="fuzzimg"))
    (root / "a").mkdir()
    buf = io.BytesIO()
    try:
        _image(mode, w, h, seed).save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        return  # this format cannot hold this mode: nothing to read
    data = buf.getvalue() if cut is None else buf.getvalue()[:cut]
    f = root / "a" / f"x{FORMATS[fmt]}"
    f.write_bytes(data)
    ds, classes = load_folder(str(root), channels, 16)
    _check("folder", ds.__getitem__, str(f), channels, 16)


@FUZZ
@given(st.binary(max_size=300), st.sampled_from(sorted(FORMATS.values())))
def test_random_bytes_with_an_image_name(data, ext):
    root = Path(tempfile.mkdtemp(prefix="fuzzimg"))
    (root / "a").mkdir()
    f = root / "a" / f"x{ext}"
    f.write_bytes(data)
    ds, _ = load_folder(str(root), 3, 8)
    _check("bytes", ds.__getitem__, str(f), 3, 8)


@FUZZ
@given(st.one_of(st.none(), st.integers(), st.text(max_size=10), st.lists(st.integers(0, 255), max_size=5),
                 st.builds(lambda s, c: np.zeros(s + ([c] if c else []), np.uint8),
                           st.lists(st.integers(0, 6), min_size=0, max_size=3), st.sampled_from([0, 1, 2, 3, 4, 5])),
                 st.builds(lambda h, w: np.random.default_rng(0).random((h, w)).astype(np.float32),
                           st.integers(1, 20), st.integers(1, 20))),
       st.one_of(st.integers(-3, 12), st.text(max_size=3), st.none(), st.floats(allow_nan=True)))
def test_hf_rows_whose_image_or_label_is_no_image(image, label):
    class Rows:  # the few datasets.Dataset attributes hf_split reads; a real Dataset would coerce the odd values
        column_names = ["image", "label"]

        def __getitem__(self, i):
            return {"image": image, "label": label}

        def __len__(self):
            return 1
    ds = hf_split(Rows(), "image", "label", None, None, 1, 12)
    _check("hf_row", ds.__getitem__, "row 0 of the HF dataset", 1, 12)


def _idx(path: Path, arr: np.ndarray, code: int = 0x08):
    header = bytes([0, 0, code, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.tobytes())


@pytest.mark.parametrize("images,labels,code,msg", [
    (np.zeros((4, 28, 30), np.uint8), np.zeros(4, np.uint8), 0x08, "expected [n, H, H] single-channel"),
    (np.zeros((4, 28, 28, 3), np.uint8), np.zeros(4, np.uint8), 0x08, "expected [n, H, H] single-channel"),
    (np.zeros((4, 40, 40), np.uint8), np.zeros(4, np.uint8), 0x08, "do not fit data.image_size=32"),
    (np.zeros((4, 28, 28), np.uint8), np.zeros(5, np.uint8), 0x08, "one per label"),
    (np.zeros((4, 28, 28), ">f4"), np.zeros(4, np.uint8), 0x0D, "expected uint8 pixels"),
])
def test_dit_idx_files_of_the_wrong_shape_or_type_are_refused(tmp_path, images, labels, code, msg):
    from tokensel.trainer.dit import FashionMNISTDiffusionData

    for prefix in ("train", "t10k"):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", images, code)
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", labels)
    dm = FashionMNISTDiffusionData(data_dir=str(tmp_path), image_size=32)
    with pytest.raises(DataError, match=msg.replace("[", r"\[")):
        dm.setup()


@pytest.mark.parametrize("kind", ["vit", "dit"])
def test_image_data_gives_each_data_parallel_rank_its_own_share(kind):
    """The image / diffusion loaders shard across ranks (the trainer leaves Lightning's sampler wrapping off)."""
    from types import SimpleNamespace

    from tokensel.trainer.dit import FashionMNISTDiffusionData
    from tokensel.trainer.vision_data import ImageClassificationData

    seen = []
    for rank in (0, 1):
        dm = (ImageClassificationData(dataset="synthetic", batch_size=4) if kind == "vit"
              else FashionMNISTDiffusionData(synthetic=True, synthetic_size=32, batch_size=4))
        dm.setup("fit")
        dm.trainer = SimpleNamespace(world_size=2, global_rank=rank)
        loader = dm.train_dataloader()
        ids = list(iter(loader.sampler))
        assert len(ids) == len(dm.train_set) // 2
        seen.append(set(ids))
    assert not (seen[0] & seen[1]) and len(seen[0] | seen[1]) == 2 * len(seen[0])
