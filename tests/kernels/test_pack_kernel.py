"""Triton pack / unpack kernels (interpreter on CPU) against the torch reference: values, padding,
column blocking, and gradients through the autograd Functions."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/kernels/conftest.py does this too; kernels are defined lazily anyway
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from tokensel.kernels.pack import (  # noqa: E402
    gather_rows,
    gather_rows_reference,
    gather_rows_triton,
    pack_tokens,
    scatter_rows,
    scatter_rows_reference,
    scatter_rows_triton,
    unpack_tokens,
)

DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("TOKENSEL_KERNELS", raising=False)


def index_with_padding(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(m, generator=g)[:k]
    idx[torch.rand(k, generator=g) < 0.3] = -1  # padding slots
    return idx.to(DEV)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,c", [(40, 23, 24), (70, 33, 130), (5, 1, 1)])
def test_gather_and_scatter_match_reference(dtype, m, k, c):
    src = torch.randn(m, c, device=DEV).to(dtype)
    idx = index_with_padding(m, k, seed=m + c)
    assert torch.equal(gather_rows_triton(src, idx), gather_rows_reference(src, idx))
    rows = torch.randn(k, c, device=DEV).to(dtype)
    base = torch.randn(m, c, device=DEV).to(dtype)
    assert torch.equal(scatter_rows_triton(base, rows, idx), scatter_rows_reference(base, rows, idx))


def test_pack_unpack_triton_equals_torch():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(6, 17, generator=g) < 0.5
    keep[:, 0] = True
    x = torch.randn(6, 17, 12, generator=g).to(DEV)
    keep = keep.to(DEV)
    p_t, lay_t = pack_tokens(x, keep, row_len=20, backend="triton")
    p_r, lay_r = pack_tokens(x, keep, row_len=20, backend="torch")
    assert torch.equal(p_t, p_r) and torch.equal(lay_t.index, lay_r.index)
    base = torch.randn_like(x)
    assert torch.equal(unpack_tokens(p_t * 3, lay_t, base, backend="triton"),
                       unpack_tokens(p_r * 3, lay_r, base, backend="torch"))


def test_gradients_match_reference():
    idx = index_with_padding(30, 20, seed=3)
    grads = {}
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        src = torch.randn(30, 9, device=DEV, requires_grad=True)
        base = torch.randn(30, 9, device=DEV, requires_grad=True)
        w = torch.randn(30, 9, device=DEV)
        rows = gather_rows(src, idx, backend) * 2.0
        out = scatter_rows(base, rows, idx, backend)
        (out * w).sum().backward()
        grads[backend] = (src.grad, base.grad)
    for a, b in zip(grads["triton"], grads["torch"]):
        assert torch.equal(a, b)
