"""Pack selected tokens of many images into dense fixed-length rows, and unpack them after (SPA).

SPA (Select and Pack Attention) computes a block only on the tokens its gate selects. Images keep
different numbers of tokens, so the selected tokens of several images are written one after another
into rows ("containers") of a fixed length `L`; only the tail of a row is padding. Attention inside
a row is restricted to tokens of the same image by a block-diagonal mask (`PackLayout.attention_mask`),
so the packed computation equals per-image attention over each image's selected tokens. An image is
never split across rows (we need exact per-image attention; SPA's Swin containers may split), so
`L >= max kept tokens per image`; the default `L` is the full token count `T`.

The data movement is two row ops over flattened tokens, which Dynamic Tuning's skipping MLP uses too:

* `gather_rows(src [M, C], index [K]) -> [K, C]`: `out[k] = src[index[k]]`, zeros where `index[k] < 0`.
* `scatter_rows(base [M, C], src [K, C], index [K]) -> [M, C]`: `base` with row `index[k]` replaced
  by `src[k]` (slots with `index[k] < 0` are dropped).

Contract (shared by the Triton kernels and the torch reference): `index` is int64, the valid entries
are unique and lie in `[0, M)`, padding is `-1`. Uniqueness makes each op the other's backward without
atomics. Both are wrapped in `torch.autograd.Function`s and dispatched by
`tokensel.kernels.resolve_backend(backend, device, op="pack")`. Triton is imported, and the kernels are
defined, on first use only: the module imports without triton, and `TRITON_INTERPRET=1` only has to be
set before the first Triton call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

# Filled in by `_triton_kernels()` on first use (kernel bodies resolve `tl` from module globals).
triton = None
tl = None


# ---------------------------------------------------------------- layout ------------------------------


@dataclass
class PackLayout:
    """Where each selected token of a `[B, T]` batch goes in the packed `[R, L]` rows.

    Attributes:
        index: `[R * L]` int64, flat source token `b * T + t` of each packed slot, `-1` for padding.
        segment: `[R, L]` int64, source image of each slot, `-1` for padding.
        counts: `[B]` int64, selected tokens per image.
        rows: `R`; row_len: `L`; batch: `B`; tokens: `T`.
    """

    index: Tensor
    segment: Tensor
    counts: Tensor
    rows: int
    row_len: int
    batch: int
    tokens: int

    def attention_mask(self) -> Tensor:
        """`[R, 1, L, L]` bool, True where query and key come from the same image.

        Padding slots share segment -1, so they attend to each other: no row of the mask is empty
        (an empty row would make softmax NaN), and padding outputs are never read back.
        """
        seg = self.segment
        return (seg[:, :, None] == seg[:, None, :])[:, None]


def pack_layout(keep: Tensor, row_len: int | None = None) -> PackLayout:
    """Greedy first-fit layout: images in batch order, a new row when the next image does not fit.

    Args:
        keep: `[B, T]` bool, the tokens to pack.
        row_len: container length `L`; None means `T`. Raised to the largest per-image count when smaller,
            because an image is never split (per-image attention stays exact).
    Returns:
        A `PackLayout`. One host sync (the per-image counts) decides the row assignment.
    """
    keep = keep.bool()
    batch, tokens = keep.shape
    counts = keep.sum(1)
    host = counts.tolist()
    length = max(int(row_len or tokens), max(host, default=0), 1)
    row_of, off_of, row, used = [], [], 0, 0
    for n in host:
        if used + n > length:
            row, used = row + 1, 0
        row_of.append(row)
        off_of.append(used)
        used += n
    rows = row + 1 if batch else 0
    dev = keep.device
    src = keep.reshape(-1).nonzero().squeeze(1)  # flat b*T+t, image-major order
    img = torch.div(src, tokens, rounding_mode="floor")
    first = torch.cumsum(counts, 0) - counts     # position in `src` of each image's first token
    rank = torch.arange(src.numel(), device=dev) - first[img]
    start = torch.tensor(row_of, device=dev, dtype=torch.long) * length + torch.tensor(off_of, device=dev,
                                                                                     dtype=torch.long)
    dest = start[img] + rank
    index = torch.full((rows * length,), -1, dtype=torch.long, device=dev)
    segment = torch.full((rows * length,), -1, dtype=torch.long, device=dev)
    index[dest] = src
    segment[dest] = img
    return PackLayout(index, segment.view(rows, length), counts, rows, length, batch, tokens)


# ---------------------------------------------------------------- torch reference ---------------------


def gather_rows_reference(src: Tensor, index: Tensor) -> Tensor:
    """`[K, C]`: `src[index[k]]`, zeros where `index[k] < 0` (no host sync)."""
    valid = (index >= 0)[:, None]
    return torch.where(valid, src.index_select(0, index.clamp_min(0)), src.new_zeros(()))


def scatter_rows_reference(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """`[M, C]`: copy of `base` with rows `index[k]` replaced by `src[k]`; padding goes to a spare row."""
    m = base.shape[0]
    out = torch.cat([base, base.new_zeros(1, base.shape[1])])
    out.index_copy_(0, torch.where(index >= 0, index, m), src.to(base.dtype))
    return out[:m]


# ---------------------------------------------------------------- Triton --------------------------------

BLOCK_ROWS = 16


@functools.cache
def _triton_kernels():
    """Import triton and define the two row kernels (once, on first use)."""
    global triton, tl, _index_tile  # Triton resolves a kernel's helpers through module globals
    try:  # (inside try: an exported copy of this file must not make transformers require triton)
        import triton
        import triton.language as tl
    except ImportError as e:
        raise RuntimeError("the Triton pack kernels need triton: pip install 'tokensel[kernels]', or use "
                           "TOKENSEL_KERNELS=torch") from e

    @triton.jit
    def _index_tile(idx_ptr, n_rows, n_cols, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """This program's tile: row and column offsets, their bounds masks, which rows carry a valid
        index (>= 0), and the index with invalid ones replaced by 0 (safe to form an address)."""
        rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        in_rows = rows < n_rows
        in_cols = cols < n_cols
        idx = tl.load(idx_ptr + rows, mask=in_rows, other=-1)
        valid = in_rows & (idx >= 0)
        return rows, cols, in_rows, in_cols, valid, tl.where(valid, idx, 0).to(tl.int64)

    @triton.jit
    def gather_rows_kernel(src_ptr, idx_ptr, out_ptr, n_out, n_cols,
                           BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # One program copies BLOCK_R destination rows x BLOCK_C columns. Every access is masked:
        # the interpreter has no bounds checks, so an unmasked stray index would corrupt memory.
        rows, cols, in_rows, in_cols, valid, safe = _index_tile(idx_ptr, n_out, n_cols, BLOCK_R, BLOCK_C)
        vals = tl.load(src_ptr + safe[:, None] * n_cols + cols[None, :],
                       mask=valid[:, None] & in_cols[None, :], other=0.0)
        dst = rows.to(tl.int64)[:, None] * n_cols + cols[None, :]
        tl.store(out_ptr + dst, vals, mask=in_rows[:, None] & in_cols[None, :])

    @triton.jit
    def scatter_rows_kernel(src_ptr, idx_ptr, out_ptr, n_src, n_cols,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # out[idx[k]] = src[k] for valid k; indices are unique, so no two programs write one row.
        rows, cols, in_rows, in_cols, valid, safe = _index_tile(idx_ptr, n_src, n_cols, BLOCK_R, BLOCK_C)
        m2 = valid[:, None] & in_cols[None, :]
        vals = tl.load(src_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=m2, other=0.0)
        tl.store(out_ptr + safe[:, None] * n_cols + cols[None, :], vals, mask=m2)

    return gather_rows_kernel, scatter_rows_kernel


def _grid(n_rows: int, n_cols: int) -> tuple[tuple[int, int], int]:
    """Launch grid and a power-of-2 column block (non-power-of-2 `tl.arange` raises)."""
    block_c = min(triton.next_power_of_2(max(n_cols, 1)), 128)
    return (triton.cdiv(max(n_rows, 1), BLOCK_ROWS), triton.cdiv(max(n_cols, 1), block_c)), block_c


def gather_rows_triton(src: Tensor, index: Tensor) -> Tensor:
    """Triton version of `gather_rows_reference` (same contract)."""
    gather_kernel, _ = _triton_kernels()
    src, index = src.contiguous(), index.contiguous().long()
    out = src.new_empty(index.shape[0], src.shape[1])
    if out.numel():
        grid, block_c = _grid(index.shape[0], src.shape[1])
        gather_kernel[grid](src, index, out, index.shape[0], src.shape[1], BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c)
    return out


def scatter_rows_triton(base: Tensor, src: Tensor, index: Tensor) -> Tensor:
    """Triton version of `scatter_rows_reference` (same contract)."""
    _, scatter_kernel = _triton_kernels()
    out = base.contiguous().clone()
    src, index = src.to(base.dtype).contiguous(), index.contiguous().long()
    if src.numel():
        grid, block_c = _grid(index.shape[0], base.shape[1])
        scatter_kernel[grid](src, index, out, index.shape[0], base.shape[1], BLOCK_R=BLOCK_ROWS, BLOCK_C=block_c)
    return out


# ---------------------------------------------------------------- autograd + functional --------------


def _impl(backend: str | None, device: torch.device):
    """(gather, scatter) implementations for the resolved back-end."""
    try:
        from tokensel.kernels import resolve_backend
    except ImportError:  # an exported copy (trust_remote_code) without tokensel: the torch path only
        return gather_rows_reference, scatter_rows_reference
    if resolve_backend(backend, device.type, op="pack") == "triton":
        return gather_rows_triton, scatter_rows_triton
    return gather_rows_reference, scatter_rows_reference


class GatherRowsFunction(torch.autograd.Function):
    """`gather_rows` with backward = scatter of the gradient into zeros (indices are unique)."""

    @staticmethod
    def forward(ctx, src, index, backend):
        gather, _ = _impl(backend, src.device)
        ctx.save_for_backward(index)
        ctx.meta = (src.shape, backend)
        return gather(src, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        shape, backend = ctx.meta
        _, scatter = _impl(backend, grad_out.device)
        return scatter(grad_out.new_zeros(shape), grad_out, index), None, None


class ScatterRowsFunction(torch.autograd.Function):
    """`scatter_rows` with backward: base gets the gradient minus the overwritten rows, src the gathered rows."""

    @staticmethod
    def forward(ctx, base, src, index, backend):
        _, scatter = _impl(backend, base.device)
        ctx.save_for_backward(index)
        ctx.meta = (src.shape[0], backend)
        return scatter(base, src, index)

    @staticmethod
    def backward(ctx, grad_out):
        (index,) = ctx.saved_tensors
        k, backend = ctx.meta
        gather, scatter = _impl(backend, grad_out.device)
        grad_out = grad_out.contiguous()
        grad_base = grad_src = None
        if ctx.needs_input_grad[0]:
            grad_base = scatter(grad_out, grad_out.new_zeros(k, grad_out.shape[1]), index)
        if ctx.needs_input_grad[1]:
            grad_src = gather(grad_out, index)
        return grad_base, grad_src, None, None


def gather_rows(src: Tensor, index: Tensor, backend: str | None = None) -> Tensor:
    """`[K, C]` rows `src[index]` of `src [M, C]`, zeros for `index < 0`; differentiable in `src`."""
    return GatherRowsFunction.apply(src, index, backend)


def scatter_rows(base: Tensor, src: Tensor, index: Tensor, backend: str | None = None) -> Tensor:
    """`[M, C]` copy of `base` with rows `index[k]` replaced by `src[k]`; differentiable in both."""
    return ScatterRowsFunction.apply(base, src, index, backend)


def pack_tokens(x: Tensor, keep: Tensor, row_len: int | None = None, backend: str | None = None
                ) -> tuple[Tensor, PackLayout]:
    """Pack the kept tokens of `x [B, T, C]` (mask `keep [B, T]`) into `[R, L, C]` rows (zero padding)."""
    layout = pack_layout(keep, row_len)
    flat = x.reshape(-1, x.shape[-1])
    packed = gather_rows(flat, layout.index, backend)
    return packed.view(layout.rows, layout.row_len, x.shape[-1]), layout


def unpack_tokens(packed: Tensor, layout: PackLayout, base: Tensor, backend: str | None = None) -> Tensor:
    """`[B, T, C]`: `base` with every packed token written back to its source position."""
    flat = scatter_rows(base.reshape(-1, base.shape[-1]), packed.reshape(-1, packed.shape[-1]), layout.index,
                        backend)
    return flat.view_as(base)


# ---------------------------------------------------------------- launch variants (AOT compile test) --


def launch_variants() -> list:
    """The launches `gather_rows_triton` / `scatter_rows_triton` make, for `tokensel.kernels.aot` (the AOT compile
    test): BLOCK_C from the host's `_grid` for row widths giving every value it can take (1 ... 128; width 1 is
    also specialized to a constant, widths that are multiples of 16 get the divisibility attribute), the float
    dtypes cycling over them (the kernels only move data: dtype changes the element width, no code path)."""
    from tokensel.kernels.aot import Variant, ptr

    gather, scatter = _triton_kernels()
    out = []
    for i, n_cols in enumerate((1, 2, 3, 8, 16, 24, 48, 100, 768)):
        dtype = (torch.float32, torch.bfloat16, torch.float16)[i % 3]
        n_rows = 4096 + (i % 2) * 7  # the packed / source row count; odd ones lose the divisibility attribute
        _, block_c = _grid(n_rows, n_cols)
        common = dict(src_ptr=ptr(dtype), idx_ptr="*i64", out_ptr=ptr(dtype), n_cols=n_cols, BLOCK_R=BLOCK_ROWS,
                      BLOCK_C=block_c)
        tags = dict(dtype=str(dtype).removeprefix("torch."), n_cols=n_cols, rows=n_rows)
        out.append(Variant(gather, dict(common, n_out=n_rows), tags=tags))
        out.append(Variant(scatter, dict(common, n_src=n_rows), tags=tags))
    return out


__all__ = [
    "PackLayout", "pack_layout", "pack_tokens", "unpack_tokens", "gather_rows", "scatter_rows",
    "gather_rows_reference", "scatter_rows_reference", "gather_rows_triton", "scatter_rows_triton",
    "GatherRowsFunction", "ScatterRowsFunction",
]
