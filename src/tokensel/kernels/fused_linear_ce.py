"""Fused linear + cross-entropy in Triton, with per-token loss / entropy / LSE and a weight-sparse backward.

Three layers, like Liger: Triton kernels + `FusedLinearCrossEntropyFunction` (autograd), the module
`FusedLinearCrossEntropy`, and the functional `fused_linear_cross_entropy`. The pure-torch chunked op in
`reference.py` is the definition these are tested against and the CPU path.

Forward (`_fwd_kernel`): each program owns one (vocabulary split, row block) and streams its split of the
vocabulary one `[BLOCK_M, BLOCK_V]` logit tile at a time (a `tl.dot` loop over H, fp32 accumulation), folding
each tile into an online max m / sum exp(z - m) / sum exp(z - m)(z - m) plus the target logit. The `[N, V]`
logits never exist in memory; four fp32 numbers per (row, split) leave the chip and are merged in torch, in
fp32, in O(splits * N). The 1-D grid runs the split index fastest and the default uses >= 16 splits
(`_default_splits`), so the programs in flight are all splits of a few row blocks: ~132 / splits row blocks of
X (4-8 MiB at H=4096) plus `splits` W tiles that those row blocks share, which all stay in L2. (Row blocks
fastest, as before, put ~128 distinct row blocks -- 128 MiB of X -- in flight and re-read X from HBM for every
vocabulary tile: ~134 GB at N=16k, H=4096, V=128k.) The grid order changes no arithmetic.

Backward: the upstream gradient `g [N]` carries the selector's weights, so rows with `g == 0` (or an ignored
target) are dropped first with one `nonzero` -- the only work an all-zero gradient costs. The k kept rows
(in row chunks of R <= `_chunk_rows`; one chunk unless k is huge) are processed in **vocabulary slices** of Vc
columns, Vc = WORKSPACE_BYTES / (R * itemsize) rounded to BLOCK_V (`_vocab_chunk`). Per slice:
`_dlogits_kernel` recomputes the slice's logit tiles on chip and writes
`dz = (softmax(z) - onehot(t)) * g` (softcap chain rule folded in) into the `[R, Vc]` workspace; then cuBLAS
computes `dW[slice] = dz^T X` as ONE GEMM with reduction length K = R (fp32 accumulation inside the GEMM,
written once in the weight dtype: no `[V, H]` fp32 accumulator) and `dX += dz W[slice]` into an fp32 `[R, H]`
accumulator (`_accumulate_fp32_`). H is thousands wide, so dX/dW cannot be accumulated on chip in Triton;
this way the logits are recomputed once (2kHV FLOPs) and both products (4kHV) run at cuBLAS speed, i.e.
(2N + 6k)·H·V FLOPs in total. The dlogits grid is 1-D with a GROUP_M swizzle: GROUP_M row blocks are visited
fastest, so the programs in flight share a few W tiles and GROUP_M X row blocks (L2-resident even at R = 16k).

Memory and traffic of the backward beyond its outputs (s = itemsize, WS = WORKSPACE_BYTES = 256 MiB; numbers at
N=16384, H=4096, V=128256, bf16, for k = N / k = 0.6N = 9830):

* before (row chunks of C = WS / (sV) -> 1024 rows, `dW += dz^T X` into fp32 `[V, H]`):
  dW traffic = ceil(k / C) * 8VH (fp32 read + write per chunk) + 6VH (final cast)
  = 16 * 4.2 + 3.2 = 70.4 GB / 10 * 4.2 + 3.2 = 45.2 GB;
  extra memory = 4VH (fp32 dW, 1.96 GiB) + WS + 2CH = 2.21 GiB (and the cast copy on top while both live).
* now (one row chunk R = k; Vc = WS / (sk) -> 8192 / 13568 columns, ceil(V / Vc) = 16 / 10 slices):
  dW traffic = 2VH (each element written once) = 1.05 GB for both k;
  dX accumulator traffic = ceil(V / Vc) * 8kH + 10kH (zero, final read, cast) = 8.6 + 0.7 = 9.3 GB /
  3.2 + 0.4 = 3.6 GB
  (grows like k^2 H V s / WS: each slice is a K = Vc GEMM whose fp32 C is read and written once; about 8%
  epilogue over its 2kHVc FLOPs at k = N; doubling WS halves it);
  extra memory = WS + 4kH (fp32 dX) + 4kH (gathered X and the cast rows of dX, only when k < N)
  = 0.25 + 0.25 = 0.50 GiB / 0.25 + 0.15 + 0.15 = 0.55 GiB (+2kH or 4kH for one slice's product when the
  fused fp32-output addmm is
  missing, see below). Liger's fp32 grad_weight alone is 4VH = 1.96 GiB; CCE accumulates dC/dE in the
  kernel and has ~0 extra beyond them, which this cuBLAS design does not reach (it trades ~0.5 GiB for
  cuBLAS-speed products and no atomics).
* rows beyond R_max = WS / (MIN_VOCAB_CHUNK * s) (32768 for bf16) go to further row chunks; dW then
  accumulates across them in the weight dtype (cuBLAS computes beta * C + alpha * AB in fp32 and rounds once
  per row chunk).

dX accumulation needs `torch.addmm(fp32 acc, a16, b16, out_dtype=float32, out=acc)`. Whether this torch/device
has it is probed once per (device type, dtype) (`_fp32_mm_mode`); if not, a warning is logged once and the
accumulation falls back to `torch.mm(..., out_dtype=float32)` + add, or else to a 16-bit-output `torch.mm` + fp32
add (the precision the dX path had before: one rounding per slice partial) -- never to fp32 copies of the operands
(a pure-fp32 GEMM, ~10x slower on tensor-core GPUs).

Scaling: `dz` is stored in the input dtype, and a selector's weights divided by a token count can be ~1e-5,
which times a softmax probability underflows fp16. So `g` is divided by `max|g|` (kept rows then have
|g| <= 1), for fp16 additionally multiplied by DZ_SCALE_FP16 = 2**8 (at V = 128k most p ~ 1/V ~ 8e-6 are fp16
subnormals otherwise; |dz| <= 256 stays far from fp16's 65504), and the inverse factor goes into the GEMMs'
alpha / the fp32 dX accumulator (dX is rounded to the input dtype once, at the end).

Tiles (`TILE_CANDIDATES`, `TILE_TABLE`): a small table keyed on (dtype, H) with four H100/H200 candidates.
**Unmeasured**: every entry is today's 128x128x64 (fp32: x32), 8 warps, 3 stages default until the GPU profile
(`benchmarks/fused_ce.py --ours-options tiles=<name>` at N=16384 H=4096 V=128256 bf16, and the
fused-CE profile step of the GPU check script) times the candidates. Any entry can be overridden per call
(`tiles=<name>` or single keys). The interpreter always uses one small config (no autotuning: it is far too
slow there).

All launches run under `torch.cuda.device(hidden.device)`, so tensors on a non-current GPU work.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

log = logging.getLogger(__name__)

# Triton reads TRITON_INTERPRET when a kernel is defined, so this module's kernels are interpreted iff it was
# set before this import (tests/kernels/conftest.py sets it on machines without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
WORKSPACE_BYTES = 256 * 2**20  # backward dlogits workspace [rows, vocab slice]: bounds its extra memory
MIN_VOCAB_CHUNK = 4096  # a row chunk is capped so that its vocabulary slice stays at least this wide
MIN_SPLITS = 16  # forward: at least this many vocabulary splits on CUDA (L2 locality, see the docstring)
DZ_SCALE_FP16 = 2.0**8  # fp16 dlogits pre-scale out of the subnormal range (the docstring's "Scaling")


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _softcap(raw, cap):
    """`cap * tanh(raw / cap)`; tanh from exp (no libdevice in the interpreter), saturating correctly at +-inf."""
    e = tl.exp(-2.0 * tl.abs(raw / cap))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(raw < 0, -t, t)


@triton.jit
def _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_xn, stride_xh, stride_wv, stride_wh, cap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 logits `[BLOCK_M, BLOCK_V]` of X[rows] @ W[cols]^T (+ bias, softcap). Masked rows/cols read zeros."""
    # int64 offsets: V * H passes 2**31 for large vocabularies
    x_ptr = X + rows.to(tl.int64)[:, None] * stride_xn
    w_ptr = W + cols.to(tl.int64)[None, :] * stride_wv
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < H
        x = tl.load(x_ptr + ks[None, :] * stride_xh, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptr + ks[:, None] * stride_wh, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies raw bf16 bit patterns in tl.dot; fp32 operands are exact
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        acc = _softcap(acc, cap)
    return acc


@triton.jit
def _fwd_kernel(X, W, B, T, M_OUT, S_OUT, A_OUT, TGT_OUT, N, V, H, v_per_split,
                stride_xn, stride_xh, stride_wv, stride_wh, cap,
                HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """One (vocab split, row block): running max m, sum exp(z - m), sum exp(z - m) * (z - m), target logit.

    1-D grid, split index fastest (see the module docstring). Writes `[num_splits, N]` fp32 partials;
    `_merge_splits` turns them into lse, entropy and loss.
    """
    pid = tl.program_id(0)
    num_splits = tl.cdiv(V, v_per_split)
    pid_s = pid % num_splits
    pid_m = pid // num_splits
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    tgt_id = tl.load(T + rows, mask=row_mask, other=-1)  # -1 never matches a column
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    s_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    a_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    tgt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    v_start = pid_s * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)  # the host makes every split non-empty, so m_i ends finite
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z = _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_xn, stride_xh, stride_wv, stride_wh,
                        cap, HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
        # padded columns read zero weights, so z is finite there; -inf only enters the max / exp
        m_new = tl.maximum(m_i, tl.max(tl.where(col_mask[None, :], z, float("-inf")), axis=1))
        alpha = tl.exp(m_i - m_new)  # rescales the old sums to the new max (0 on the first tile)
        shift = tl.where(s_i > 0, m_i - m_new, 0.0)  # s_i = 0 only before the first tile, where m_i = -inf
        e = tl.where(col_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        # sum e (z - m): shifted logits keep the entropy's cancellation error at fp32 resolution of (z - m)
        a_i = (a_i + s_i * shift) * alpha + tl.sum(e * (z - m_new[:, None]), axis=1)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        tgt += tl.sum(tl.where(cols[None, :] == tgt_id[:, None], z, 0.0), axis=1)
        m_i = m_new
    out = pid_s * N + rows
    tl.store(M_OUT + out, m_i, mask=row_mask)
    tl.store(S_OUT + out, s_i, mask=row_mask)
    tl.store(A_OUT + out, a_i, mask=row_mask)
    tl.store(TGT_OUT + out, tgt, mask=row_mask)


@triton.jit
def _dlogits_kernel(X, W, B, T, LSE, G, DZ, C, V, H, stride_xn, stride_xh, stride_wv, stride_wh, stride_dz, cap,
                    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, UPCAST: tl.constexpr,
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr):
    """dL/d raw-logits of one `[BLOCK_M, BLOCK_V]` tile of a `[C, V]` slice: (softmax - onehot) * g * softcap'.

    X, T, LSE, G are the chunk's kept rows (`C` of them); W, B and T are relative to the vocabulary slice
    (the host shifts T). 1-D grid with a GROUP_M swizzle: within a group of GROUP_M row blocks the row block
    runs fastest, so the programs in flight share a few W tiles and only GROUP_M X row blocks, all in L2.
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(C, BLOCK_M)
    n_col_blocks = tl.cdiv(V, BLOCK_V)
    per_group = GROUP_M * n_col_blocks
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(n_row_blocks - first_m, GROUP_M)
    in_group = pid % per_group
    rows = (first_m + in_group % group_rows) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (in_group // group_rows) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < C
    col_mask = cols < V
    z = _logit_tile(X, W, B, rows, cols, row_mask, col_mask, H, stride_xn, stride_xh, stride_wv, stride_wh,
                    cap, HAS_BIAS, HAS_SOFTCAP, UPCAST, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K)
    lse = tl.load(LSE + rows, mask=row_mask, other=0.0)
    g = tl.load(G + rows, mask=row_mask, other=0.0)
    tgt_id = tl.load(T + rows, mask=row_mask, other=-1)
    dz = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == tgt_id[:, None], 1.0, 0.0)
    if HAS_SOFTCAP:  # d(c tanh(r / c)) / dr = 1 - tanh^2 = 1 - (z / c)^2
        dz = dz * (1.0 - (z / cap) * (z / cap))
    dz = dz * g[:, None]
    ptr = DZ + rows.to(tl.int64)[:, None] * stride_dz + cols[None, :]
    tl.store(ptr, dz.to(DZ.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


# ------------------------------------------------------------------------------------------- host side

# Candidate H100/H200 tiles (review finding 5; 128x256 has the most arithmetic per byte of L2 traffic).
# UNMEASURED: no GPU has timed them yet. AOT for sm_90 with Triton 3.9 (bf16, regs / spill stack): default fwd
# 180 / 0 and dlogits 127 / 0; 128x128 s4 fwd 255 / 0; 64x128 w4 s4 fwd 180 / 0; 128x256 fwd 255 / 152 B and,
# with bias + softcap, fwd 1.9 KB / dlogits 0.9 KB of spills: do not pick 128x256 for softcap heads unmeasured.
TILE_CANDIDATES = {
    "128x128x64_w8_s3": dict(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=3),
    "128x256x64_w8_s3": dict(block_m=128, block_v=256, block_k=64, num_warps=8, num_stages=3),
    "128x128x64_w8_s4": dict(block_m=128, block_v=128, block_k=64, num_warps=8, num_stages=4),
    "64x128x64_w4_s4": dict(block_m=64, block_v=128, block_k=64, num_warps=4, num_stages=4),
    "128x128x32_w8_s3": dict(block_m=128, block_v=128, block_k=32, num_warps=8, num_stages=3),  # fp32
}
# dtype -> ((smallest H, candidate), ...) ascending; the last entry with H >= its bound wins. Every entry is
# today's default until `benchmarks/fused_ce.py --ours-options tiles=<name>` (N=16384 H=4096 V=128256 bf16 on
# an H100/H200) or the GPU check's fused-CE profile measures a better one; then edit this table.
TILE_TABLE = {
    torch.bfloat16: ((0, "128x128x64_w8_s3"),),
    torch.float16: ((0, "128x128x64_w8_s3"),),
    torch.float32: ((0, "128x128x32_w8_s3"),),
}
INTERPRETER_TILES = dict(block_m=32, block_v=128, block_k=32, num_warps=1, num_stages=1)


def _table_tiles(dtype: torch.dtype, h: int | None) -> str:
    name = TILE_TABLE[dtype][0][1]
    for bound, cand in TILE_TABLE[dtype]:
        if (h or 0) >= bound:
            name = cand
    return name


def _config(dtype: torch.dtype, overrides: dict, h: int | None = None) -> dict:
    """Tile sizes and launch options; any of them can be overridden by keyword (tests use small tiles).

    GPU: `TILE_TABLE[dtype]` at hidden size `h` (unmeasured; see the module docstring), or the candidate
    named by `tiles=`. The interpreter runs one numpy op per tile op, so there one small fixed config is used.
    """
    cfg = dict(INTERPRETER_TILES) if INTERPRET else dict(TILE_CANDIDATES[_table_tiles(dtype, h)])
    cfg.update(num_splits=None, chunk_size=None, vocab_chunk=None, group_m=8)
    known = sorted([*cfg, "tiles"])
    unknown = set(overrides) - set(known)
    if unknown:
        raise TypeError(f"fused_linear_cross_entropy: unknown option(s) {sorted(unknown)}; known: {known}")
    tiles = overrides.get("tiles")
    if tiles is not None:
        if tiles not in TILE_CANDIDATES:
            raise ValueError(f"fused_linear_cross_entropy: tiles={tiles!r}; known: {sorted(TILE_CANDIDATES)}")
        cfg.update(TILE_CANDIDATES[tiles])
    cfg.update({k: v for k, v in overrides.items() if v is not None and k != "tiles"})
    for k in ("block_m", "block_v", "block_k"):
        if cfg[k] < 16 or cfg[k] & (cfg[k] - 1):
            raise ValueError(f"fused_linear_cross_entropy: {k}={cfg[k]} must be a power of 2 >= 16 (tl.dot, tl.arange)")
    if dtype == torch.float32 and cfg["block_k"] > 32 and not INTERPRET:
        # 4-byte tiles 64 deep need 192-288 KiB of shared memory (over sm_80's 163 KiB, and over sm_90's 227 KiB
        # for 128x256 or 4 stages) and spill 10-40 KB in exact fp32: they fail or crawl on the GPU
        raise ValueError(f"fused_linear_cross_entropy: fp32 inputs need block_k <= 32, got {cfg['block_k']}; use "
                         "tiles='128x128x32_w8_s3' (the fp32 default) or 16-bit inputs")
    for k in ("group_m", "num_splits", "chunk_size", "vocab_chunk"):
        if cfg[k] is not None and int(cfg[k]) < 1:
            raise ValueError(f"fused_linear_cross_entropy: {k}={cfg[k]} must be >= 1")
    return cfg


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs: exact fp32 dots unless torch itself allows TF32 for matmuls."""
    upcast = INTERPRET and dtype == torch.bfloat16
    precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return upcast, precision


def _device_guard(t: Tensor):
    """Triton launches on the current CUDA device: make it the tensor's (no-op off CUDA)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _default_splits(n_row_blocks: int, n_vocab_blocks: int, sms: int) -> int:
    """>= MIN_SPLITS splits (L2 locality: split index fastest), and enough programs to fill the GPU twice."""
    return max(1, min(n_vocab_blocks, max(MIN_SPLITS, triton.cdiv(2 * sms, n_row_blocks))))


def _num_splits(n_row_blocks: int, n_vocab_blocks: int, device: torch.device, requested: int | None) -> int:
    """How many vocabulary splits the forward uses (1 off CUDA unless requested)."""
    if requested is not None:
        return max(1, min(requested, n_vocab_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _default_splits(n_row_blocks, n_vocab_blocks, sms)


def _merge_splits(m: Tensor, s: Tensor, a: Tensor, tgt: Tensor, targets: Tensor, ignore_index: int):
    """Merge `[splits, N]` partials (a = sum e (z - m)): lse, entropy = lse - E_p[z], loss = lse - z_target."""
    m_max = m.max(0).values
    d = m - m_max  # <= 0 and finite: every split has a real column
    scale = torch.exp(d)
    s_tot = (s * scale).sum(0)
    lse = m_max + torch.log(s_tot)
    # E_p[z] - m_max = sum_s scale_s (a_s + s_s d_s) / s_tot, so entropy = log s_tot - that (no |z| terms)
    entropy = torch.log(s_tot) - (scale * (a + s * d)).sum(0) / s_tot
    loss = torch.where(targets != ignore_index, lse - tgt.sum(0), torch.zeros_like(lse))
    return loss, entropy, lse


def fused_forward(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None, ignore_index: int,
                  softcap: float | None, cfg: dict) -> tuple[Tensor, Tensor, Tensor]:
    """(loss [N], entropy [N], lse [N]) in fp32 without materialising the logits; no autograd."""
    n, h = hidden.shape
    v = weight.shape[0]
    bm, bv = cfg["block_m"], cfg["block_v"]
    n_row_blocks, n_vocab_blocks = triton.cdiv(n, bm), triton.cdiv(v, bv)
    splits = _num_splits(n_row_blocks, n_vocab_blocks, hidden.device, cfg["num_splits"])
    v_per_split = triton.cdiv(n_vocab_blocks, splits) * bv
    splits = triton.cdiv(v, v_per_split)  # no empty split: each one has >= 1 real column (the kernel agrees)
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    upcast, precision = _dot_flags(hidden.dtype)
    with _device_guard(hidden):
        _fwd_kernel[(splits * n_row_blocks,)](
            hidden, weight, bias if bias is not None else hidden, targets, part[0], part[1], part[2], part[3],
            n, v, h, v_per_split, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
            float(softcap or 1.0), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
            PRECISION=precision, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
    return _merge_splits(part[0], part[1], part[2], part[3], targets, ignore_index)


_MM_MODE: dict[tuple[str, torch.dtype], str] = {}  # (device type, operand dtype) -> how dX accumulates in fp32


def _probe_fp32_mm(device: torch.device, dtype: torch.dtype) -> tuple[str, str]:
    """(mode, why): which fp32-output product of 16-bit operands works here, tried on a tiny case."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(8, 16, generator=gen).to(device, dtype)
    b = torch.randn(16, 8, generator=gen).to(device, dtype)
    want = 1.0 + a.float() @ b.float()
    errors = []
    for mode in ("addmm", "mm"):
        acc = torch.ones(8, 8, dtype=torch.float32, device=device)
        try:
            _accumulate_fp32_(acc, a, b, mode)
            if acc.dtype == torch.float32 and torch.allclose(acc, want, rtol=1e-3, atol=1e-3):
                return mode, "; ".join(errors)
            errors.append(f"{mode}: wrong result")
        except (TypeError, RuntimeError) as e:  # NotImplementedError is a RuntimeError
            errors.append(f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
    return "lowp", "; ".join(errors)


def _fp32_mm_mode(device: torch.device, dtype: torch.dtype) -> str:
    """Probed once per (device type, dtype); logs one warning when the fused fp32-output addmm is missing."""
    key = (device.type, dtype)
    if key not in _MM_MODE:
        mode, why = _probe_fp32_mm(device, dtype)
        _MM_MODE[key] = mode
        if mode != "addmm":
            fallback = ("torch.mm(out_dtype=float32) + add (one extra fp32 [rows, H] pass per vocabulary slice)"
                        if mode == "mm" else
                        f"{dtype}-output torch.mm + fp32 add (one {dtype} rounding per vocabulary slice partial)")
            log.warning("fused_linear_cross_entropy: torch.addmm(fp32 acc, %s, %s, out_dtype=float32, out=acc) is "
                        "unavailable on %s with torch %s (%s); the backward accumulates dX with %s instead",
                        dtype, dtype, device.type, torch.__version__, why, fallback)
    return _MM_MODE[key]


def _accumulate_fp32_(acc: Tensor, a: Tensor, b: Tensor, mode: str) -> None:
    """`acc += a @ b` into the fp32 `acc`, for fp32 or 16-bit operands, by `mode` (see `_fp32_mm_mode`)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif mode == "addmm":  # cuBLAS with fp32 C in place: no temporary, one pass over acc
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    elif mode == "mm":
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    else:  # the 16-bit product at tensor-core speed, rounded once, then summed in fp32
        acc.add_(torch.mm(a, b))


def _chunk_rows(cfg: dict, v: int, itemsize: int, kept: int) -> int:
    """Kept rows per backward row chunk: all of them unless a slice of MIN_VOCAB_CHUNK columns would overflow
    the workspace (R_max = WORKSPACE_BYTES / (MIN_VOCAB_CHUNK * itemsize), 32768 rows for 16-bit inputs)."""
    if cfg["chunk_size"] is not None:
        return min(max(1, int(cfg["chunk_size"])), kept)
    bm = cfg["block_m"]
    cap = max(bm, WORKSPACE_BYTES // (min(v, MIN_VOCAB_CHUNK) * itemsize) // bm * bm)
    return min(cap, kept)


def _vocab_chunk(cfg: dict, v: int, rows: int, itemsize: int) -> int:
    """Columns per backward vocabulary slice: the `[rows, Vc]` workspace fits WORKSPACE_BYTES; a multiple of
    BLOCK_V (so the slices tile the vocabulary exactly as one pass would)."""
    bv = cfg["block_v"]
    if cfg["vocab_chunk"] is not None:
        vc = triton.cdiv(int(cfg["vocab_chunk"]), bv) * bv
    else:
        vc = max(bv, WORKSPACE_BYTES // (rows * itemsize) // bv * bv)
    return min(vc, triton.cdiv(v, bv) * bv)


def fused_backward(grad_loss: Tensor, hidden: Tensor, weight: Tensor, targets: Tensor, lse: Tensor,
                   bias: Tensor | None, ignore_index: int, softcap: float | None, cfg: dict,
                   need_dx: bool = True, need_dw: bool = True) -> tuple[Tensor | None, Tensor | None,
                                                                       Tensor | None, int, int]:
    """(dX [N, H], dW [V, H], db [V], kept rows, Triton programs launched) for upstream `grad_loss` [N].

    Only rows with a non-zero gradient and a real target are visited; dX of every other row is exactly 0.
    """
    n, h = hidden.shape
    v = weight.shape[0]
    g = grad_loss.float()
    keep = (g != 0) & (targets != ignore_index)
    g_max_t = torch.where(keep, g.abs(), 0.0).max() if n else g.new_zeros(())  # queued before the sync below
    # the one host sync of the backward: the launch grid depends on how many rows are kept
    kept = keep.nonzero().squeeze(1)
    k = kept.numel()
    if k == 0:  # nothing kept: zero gradients, no launch
        return (torch.zeros_like(hidden) if need_dx else None, torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if bias is not None else None, 0, 0)
    g_max = float(g_max_t)  # already computed by now; see "Scaling" in the module docstring
    dz_scale = DZ_SCALE_FP16 if hidden.dtype == torch.float16 else 1.0
    alpha = g_max / dz_scale  # undoes the scaling of g in the GEMMs' alpha / on the fp32 dX accumulator
    g_kept = g[kept] * (dz_scale / g_max)
    lse_kept, t_kept = lse[kept], targets[kept]
    itemsize = hidden.element_size()
    rows_per_chunk = _chunk_rows(cfg, v, itemsize, k)
    vc = _vocab_chunk(cfg, v, rows_per_chunk, itemsize)
    dev = hidden.device
    ws = torch.empty(rows_per_chunk * min(vc, v), dtype=hidden.dtype, device=dev)  # the dlogits workspace
    dx = None
    if need_dx:
        dx = torch.empty_like(hidden) if k == n and rows_per_chunk == n else torch.zeros_like(hidden)
        dx32 = torch.empty(rows_per_chunk, h, dtype=torch.float32, device=dev)
        mode = _fp32_mm_mode(dev, hidden.dtype) if hidden.dtype != torch.float32 else "addmm"
    dw = torch.empty(v, h, dtype=weight.dtype, device=weight.device) if need_dw else None
    db32 = torch.zeros(v, dtype=torch.float32, device=dev) if bias is not None else None
    upcast, precision = _dot_flags(hidden.dtype)
    bm, bv = cfg["block_m"], cfg["block_v"]
    programs = 0
    with _device_guard(hidden):
        for r0 in range(0, k, rows_per_chunk):
            rows = kept[r0:r0 + rows_per_chunk]
            c = rows.numel()
            # [c, H] contiguous kept rows: the kernel's X and dW's right operand (no copy when all rows are kept)
            xc = hidden if c == n else hidden.index_select(0, rows)
            t_c, lse_c, g_c = t_kept[r0:r0 + c], lse_kept[r0:r0 + c], g_kept[r0:r0 + c]
            if need_dx:
                acc = dx32[:c].zero_()
            for v0 in range(0, v, vc):
                v1 = min(v0 + vc, v)
                w_s = weight[v0:v1]
                dz = ws[:c * (v1 - v0)].view(c, v1 - v0)
                grid = (triton.cdiv(c, bm) * triton.cdiv(v1 - v0, bv),)
                programs += grid[0]
                _dlogits_kernel[grid](
                    xc, w_s, bias[v0:v1] if bias is not None else xc, t_c - v0, lse_c, g_c, dz, c, v1 - v0, h,
                    xc.stride(0), xc.stride(1), w_s.stride(0), w_s.stride(1), dz.stride(0), float(softcap or 1.0),
                    HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast, PRECISION=precision,
                    BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"], GROUP_M=int(cfg["group_m"]),
                    num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
                if need_dx:
                    _accumulate_fp32_(acc, dz, w_s, mode)
                if need_dw:  # one K = c GEMM per slice, fp32 accumulation inside, written in the weight dtype
                    dw[v0:v1].addmm_(dz.t(), xc, beta=0.0 if r0 == 0 else 1.0, alpha=alpha)
                if db32 is not None:
                    db32[v0:v1] += dz.sum(0, dtype=torch.float32)
            if need_dx:
                acc.mul_(alpha)
                if c == n:
                    dx.copy_(acc)
                else:  # every kept row lives in exactly one row chunk: a plain copy, no accumulation
                    dx.index_copy_(0, rows, acc.to(hidden.dtype))
    if db32 is not None:
        db32.mul_(alpha)
    return dx, dw, _cast(db32, bias), k, programs


def _cast(grad32: Tensor | None, like: Tensor | None) -> Tensor | None:
    return None if grad32 is None or like is None else grad32.to(like.dtype)


class FusedLinearCrossEntropyFunction(torch.autograd.Function):
    """autograd node: saves hidden, weight, targets, bias and lse (O(N) extra), never the logits."""

    last_backward_rows = 0  # rows the latest backward recomputed (kept tokens); tests and benchmarks read it
    last_backward_programs = 0  # Triton programs it launched: proportional to kept rows, 0 when none are kept

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, softcap, cfg):
        loss, entropy, lse = fused_forward(hidden, weight, targets, bias, ignore_index, softcap, cfg)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.opts = (ignore_index, softcap, cfg)
        ctx.mark_non_differentiable(entropy, lse)
        return loss, entropy, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, _grad_entropy, _grad_lse):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        ignore_index, softcap, cfg = ctx.opts
        dx, dw, db, rows, programs = fused_backward(
            grad_loss, hidden, weight, targets, lse, bias, ignore_index, softcap, cfg,
            need_dx=ctx.needs_input_grad[0], need_dw=ctx.needs_input_grad[1])
        FusedLinearCrossEntropyFunction.last_backward_rows = rows
        FusedLinearCrossEntropyFunction.last_backward_programs = programs
        db = db if ctx.needs_input_grad[3] else None
        return dx, dw, None, db, None, None, None


def _check(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None) -> None:
    """Clear errors for the mistakes a caller can make (same shape rules as the reference)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"fused_linear_cross_entropy: hidden {tuple(hidden.shape)} and weight "
                         f"{tuple(weight.shape)} must be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"fused_linear_cross_entropy: bias {tuple(bias.shape)} must be [V={weight.shape[0]}]")
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"fused_linear_cross_entropy: hidden ({hidden.dtype}) and weight ({weight.dtype}) must share "
                        "one of float32/float16/bfloat16; cast one of them")
    if hidden.device.type != "cuda" and not INTERPRET:
        raise RuntimeError("fused_linear_cross_entropy: Triton needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "importing tokensel.kernels.fused_linear_ce); use TOKENSEL_KERNELS=torch on CPU")


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                               ignore_index: int = -100, softcap: float | None = None,
                               **options) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token linear + cross-entropy, fused (the Triton twin of `reference.linear_cross_entropy`).

    Args:
        hidden: `[N, H]` final hidden states (fp32, fp16 or bf16; same dtype as `weight`, or both are cast to
            the autocast dtype when autocast is on).
        weight: `[V, H]` LM-head weight (tied embeddings work: pass the embedding matrix).
        targets: `[N]` int token ids; `ignore_index` rows get loss 0 and no gradient.
        bias: optional `[V]`.
        softcap: optional logit soft-cap `c * tanh(z / c)`.
        options: tile/launch overrides: `tiles` (a `TILE_CANDIDATES` name), `block_m`, `block_v`, `block_k`,
            `num_warps`, `num_stages`; `num_splits` (vocabulary splits of the forward), `group_m` (row blocks per
            swizzle group of the dlogits grid), `chunk_size` (kept rows per backward row chunk) and
            `vocab_chunk` (columns per backward vocabulary slice; rounded up to a multiple of `block_v`).
    Returns:
        `(loss [N], entropy [N], lse [N])`, fp32. Only `loss` carries a gradient; its backward recomputes only
        rows whose upstream gradient is non-zero.
    """
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        # under autocast the head runs in the autocast dtype, as `hidden @ weight.T` would; autograd sees the casts
        amp = torch.get_autocast_dtype(dev)
        hidden, weight = hidden.to(amp), weight.to(amp)
        bias = bias.to(amp) if bias is not None else None
    _check(hidden, weight, targets, bias)
    cfg = _config(hidden.dtype, options, hidden.shape[1])
    return FusedLinearCrossEntropyFunction.apply(hidden, weight, targets, bias, ignore_index, softcap, cfg)


class FusedLinearCrossEntropy(nn.Module):
    """Module form: `FusedLinearCrossEntropy(ignore_index, softcap)(hidden, weight, targets, bias)`.

    Holds no parameters: the LM head (or tied embedding) weight is passed in, so one module serves both.
    """

    def __init__(self, ignore_index: int = -100, softcap: float | None = None, **options):
        super().__init__()
        self.ignore_index = ignore_index
        self.softcap = softcap
        self.options = options

    def forward(self, hidden: Tensor, weight: Tensor, targets: Tensor,
                bias: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, ignore_index=self.ignore_index,
                                          softcap=self.softcap, **self.options)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}, softcap={self.softcap}"


# ------------------------------------------------------------------------ launch variants (AOT compile test)

# constexprs the GPU host code passes with one value only (tokensel.kernels.aot checks every other bool takes both)
AOT_SINGLE_VALUED = {"_fwd_kernel": {"UPCAST": "interpreter only: _dot_flags sets it iff INTERPRET and bf16"},
                     "_dlogits_kernel": {"UPCAST": "interpreter only: _dot_flags sets it iff INTERPRET and bf16"}}


def launch_variants() -> list:
    """The launches `fused_forward` / `fused_backward` can make on a GPU, for `tokensel.kernels.aot` (the AOT
    compile test): built with the host's own helpers (`_config`, `_dot_flags`, `_default_splits`, `_chunk_rows`,
    `_vocab_chunk`) at N=16384, H=4096, V=128256, 60% rows kept, 132 SMs (other shapes change only runtime ints).

    Axes: tiles = every `TILE_CANDIDATES` entry (the `TILE_TABLE` defaults and every `tiles=` choice), dtype =
    bf16 / fp16 / fp32 with `allow_tf32` off ("ieee") and on ("tf32"), bias, softcap. Rows: the full product of
    bias x softcap at the `TILE_TABLE` tile (what runs without options) for bf16 and exact fp32, then a pairwise
    covering design (`aot.pairwise`) over all four axes: every tile meets every dtype, bias and softcap value.

    Not enumerated: fp32 with a BLOCK_K 64 candidate. The host never picks one (`TILE_TABLE[float32]` is the x32
    tile) and `_config` refuses one on a GPU: their fp32 builds need 192-288 KiB of shared memory (over
    sm_90's 227 KiB for 128x256 and 128x128 s4, over sm_80's 163 KiB for all three) and, in exact fp32, spill
    10-40 KB per thread (Triton 3.9). Free-form `block_*` / `num_*` / `group_m` overrides are
    the caller's choice and are not enumerated either (group_m: its default 8).
    """
    from tokensel.kernels.aot import Variant, allow_tf32, pairwise, ptr

    if INTERPRET:
        raise RuntimeError("launch_variants: fused_linear_ce was imported with TRITON_INTERPRET=1")
    n, h, v, kept, sms = 16384, 4096, 128256, 9830, 132
    dtypes = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32-ieee": (torch.float32, False),
              "fp32-tf32": (torch.float32, True)}
    axes = dict(tiles=list(TILE_CANDIDATES), dtype=list(dtypes), bias=[False, True], softcap=[False, True])
    seeds = [dict(tiles=_table_tiles(dtypes[d][0], h), dtype=d, bias=b, softcap=c)
             for d in ("bf16", "fp32-ieee") for b in (False, True) for c in (False, True)]
    fits = lambda r: dtypes[r["dtype"]][0] != torch.float32 or TILE_CANDIDATES[r["tiles"]]["block_k"] <= 32  # noqa: E731
    out = []
    for row in pairwise(axes, seeds, valid=fits):
        dtype, tf32 = dtypes[row["dtype"]]
        with allow_tf32(tf32):
            upcast, precision = _dot_flags(dtype)
        cfg = _config(dtype, {"tiles": row["tiles"]}, h)
        bm, bv, t = cfg["block_m"], cfg["block_v"], ptr(dtype)
        n_rb, n_vb = triton.cdiv(n, bm), triton.cdiv(v, bv)
        v_per_split = triton.cdiv(n_vb, _default_splits(n_rb, n_vb, sms)) * bv
        consts = dict(HAS_BIAS=row["bias"], HAS_SOFTCAP=row["softcap"], UPCAST=upcast, PRECISION=precision,
                      BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"])
        shared = dict(X=t, W=t, B=t, T="*i64", H=h, stride_xn=h, stride_xh=1, stride_wv=h, stride_wh=1,
                      cap=30.0 if row["softcap"] else 1.0)
        opts = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                    tags=dict(row, table=row["tiles"] == _table_tiles(dtype, h)))
        out.append(Variant(_fwd_kernel, dict(shared, M_OUT="*fp32", S_OUT="*fp32", A_OUT="*fp32", TGT_OUT="*fp32",
                                             N=n, V=v, v_per_split=v_per_split, **consts), **opts))
        rows = _chunk_rows(cfg, v, dtype.itemsize, kept)
        vc = _vocab_chunk(cfg, v, rows, dtype.itemsize)
        for width in sorted({min(vc, v), v % vc or min(vc, v)}, reverse=True):  # full slices and the last one
            out.append(Variant(_dlogits_kernel, dict(shared, LSE="*fp32", G="*fp32", DZ=t, C=rows, V=width,
                                                     stride_dz=width, GROUP_M=int(cfg["group_m"]), **consts),
                               **opts))
    return out


__all__ = ["fused_linear_cross_entropy", "FusedLinearCrossEntropy", "FusedLinearCrossEntropyFunction",
           "fused_forward", "fused_backward", "TILE_CANDIDATES", "TILE_TABLE"]
