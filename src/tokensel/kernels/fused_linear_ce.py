"""Fused linear + cross-entropy in Triton, with per-token loss / entropy / LSE and a weight-sparse backward.

Three layers, like Liger: Triton kernels + `FusedLinearCrossEntropyFunction` (autograd), the module
`FusedLinearCrossEntropy`, and the functional `fused_linear_cross_entropy`. The pure-torch chunked op in
`reference.py` is the definition these are tested against and the CPU path.

Forward (`_fwd_kernel`): a grid over (row block, vocabulary split). Each program streams its split of the
vocabulary one `[BLOCK_M, BLOCK_V]` logit tile at a time (a `tl.dot` loop over H, fp32 accumulation), and
folds each tile into an online max / sum-exp / sum(exp * z) plus the target logit. The `[N, V]` logits never
exist in memory; only four fp32 numbers per (row, split) leave the chip, merged on the host side in O(N).

Backward: the upstream gradient `g [N]` carries the selector's weights, so rows with `g == 0` (or an ignored
target) are dropped first with one `nonzero` -- the only work an all-zero gradient costs. The kept rows are
processed in chunks: `_dlogits_kernel` recomputes each chunk's logit tiles on chip and writes
`dlogits = (softmax(z) - onehot(t)) * g` (the softcap chain rule folded in) into a bounded workspace
`[chunk, V]`, and cuBLAS turns it into `dX = dlogits @ W` and `dW += dlogits^T @ X` (fp32 accumulator).
Why a workspace rather than accumulating dX/dW inside Triton: H (the GEMM reduction dimension of both
products) is thousands wide, so an on-chip dX/dW accumulator does not fit and would turn into a global
read-modify-write per vocabulary tile; this way the logits are recomputed once (2kHV FLOPs) and the two
products (4kHV) run at cuBLAS speed, i.e. (2N + 6k)·H·V FLOPs in total for k kept rows of N.

fp16 note: `dlogits` is stored in the input dtype, and a selector's weights divided by a token count can be
~1e-5, which times a softmax probability underflows fp16. So `g` is divided by `max|g|` before the kernel
(kept rows then have |g| <= 1) and that scalar is multiplied back in fp32 after the GEMMs.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

# Triton reads TRITON_INTERPRET when a kernel is defined, so this module's kernels are interpreted iff it was
# set before this import (tests/kernels/conftest.py sets it on machines without CUDA).
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
WORKSPACE_BYTES = 256 * 2**20  # default backward dlogits workspace: bounds the extra memory of one chunk


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
    """One (row block, vocab split): running max m, sum exp(z - m), sum exp(z - m) * z and target logit.

    Writes `[num_splits, N]` fp32 partials; `_merge_splits` turns them into lse, entropy and loss.
    """
    pid_m = tl.program_id(0)
    pid_s = tl.program_id(1)
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
        e = tl.where(col_mask[None, :], tl.exp(z - m_new[:, None]), 0.0)
        s_i = s_i * alpha + tl.sum(e, axis=1)
        a_i = a_i * alpha + tl.sum(e * z, axis=1)
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
                    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """dL/d raw-logits of one `[BLOCK_M, BLOCK_V]` tile of the compacted rows: (softmax - onehot) * g * softcap'.

    X, T, LSE, G are already gathered to the chunk's kept rows (`C` of them). The 1-D grid runs row blocks
    fastest, so the programs in flight share one W tile (read once from HBM) and the chunk's X stays in L2.
    """
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(C, BLOCK_M)
    rows = (pid % n_row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = (pid // n_row_blocks) * BLOCK_V + tl.arange(0, BLOCK_V)
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


def _config(dtype: torch.dtype, overrides: dict) -> dict:
    """Tile sizes and launch options; any of them can be overridden by keyword (tests use small tiles).

    GPU defaults are a 128x128 logit tile with a 64-wide (32 for fp32) H step: untuned guesses, see the benchmark.
    The interpreter runs one numpy op per tile op, so there fewer, larger tiles are faster.
    """
    if INTERPRET:
        cfg = dict(block_m=32, block_v=128, block_k=32, num_warps=1, num_stages=1)
    else:
        cfg = dict(block_m=128, block_v=128, block_k=32 if dtype == torch.float32 else 64, num_warps=8,
                   num_stages=3)
    cfg.update(num_splits=None, chunk_size=None)
    unknown = set(overrides) - set(cfg)
    if unknown:
        raise TypeError(f"fused_linear_cross_entropy: unknown option(s) {sorted(unknown)}; known: {sorted(cfg)}")
    cfg.update({k: v for k, v in overrides.items() if v is not None})
    for k in ("block_m", "block_v", "block_k"):
        if cfg[k] < 16 or cfg[k] & (cfg[k] - 1):
            raise ValueError(f"fused_linear_cross_entropy: {k}={cfg[k]} must be a power of 2 >= 16 (tl.dot, tl.arange)")
    return cfg


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, PRECISION) constexprs: exact fp32 dots unless torch itself allows TF32 for matmuls."""
    upcast = INTERPRET and dtype == torch.bfloat16
    precision = "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"
    return upcast, precision


def _num_splits(n_row_blocks: int, n_vocab_blocks: int, device: torch.device, requested: int | None) -> int:
    """How many vocabulary splits the forward uses: enough programs to fill the GPU twice over."""
    if requested is not None:
        return max(1, min(requested, n_vocab_blocks))
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vocab_blocks, triton.cdiv(2 * sms, n_row_blocks)))


def _merge_splits(m: Tensor, s: Tensor, a: Tensor, tgt: Tensor, targets: Tensor, ignore_index: int):
    """Merge `[splits, N]` partials: lse = logsumexp, entropy = lse - E_p[z], loss = lse - z_target."""
    m_max = m.max(0).values
    scale = torch.exp(m - m_max)
    s_tot = (s * scale).sum(0)
    lse = m_max + torch.log(s_tot)
    entropy = lse - (a * scale).sum(0) / s_tot
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
    splits = triton.cdiv(v, v_per_split)  # no empty split: each one has >= 1 real column
    part = torch.empty(4, splits, n, dtype=torch.float32, device=hidden.device)
    upcast, precision = _dot_flags(hidden.dtype)
    _fwd_kernel[(n_row_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets, part[0], part[1], part[2], part[3],
        n, v, h, v_per_split, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        float(softcap or 1.0), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
        PRECISION=precision, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"])
    return _merge_splits(part[0], part[1], part[2], part[3], targets, ignore_index)


def _addmm_fp32_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` with an fp32 accumulator `acc` and fp16/bf16/fp32 operands, without a `[V, H]` temporary."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda:
        try:  # torch >= 2.8 on CUDA: cuBLAS writes fp32 output from 16-bit operands in place
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (TypeError, RuntimeError):
            pass
    acc.addmm_(a.float(), b.float())  # CPU / older torch: fp32 copies of the [chunk, *] operands only


def _chunk_rows(cfg: dict, v: int, itemsize: int, kept: int) -> int:
    """Rows per backward chunk: the dlogits workspace `[chunk, V]` stays within `WORKSPACE_BYTES`."""
    if cfg["chunk_size"] is not None:
        return max(1, int(cfg["chunk_size"]))
    rows = max(cfg["block_m"], WORKSPACE_BYTES // (v * itemsize) // cfg["block_m"] * cfg["block_m"])
    return min(rows, kept)


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
    # the one host sync of the backward: the launch grid depends on how many rows are kept
    kept = ((g != 0) & (targets != ignore_index)).nonzero().squeeze(1)
    k = kept.numel()
    dx = torch.zeros_like(hidden) if need_dx else None
    if k == 0:  # nothing kept: zero gradients, no launch
        return (dx, torch.zeros_like(weight) if need_dw else None,
                torch.zeros_like(bias) if bias is not None else None, 0, 0)
    dw32 = torch.zeros(v, h, dtype=torch.float32, device=weight.device) if need_dw else None
    db32 = torch.zeros(v, dtype=torch.float32, device=weight.device) if bias is not None else None
    g_kept = g[kept]
    g_max = g_kept.abs().max()  # 0-d tensor, no sync; see the fp16 note in the module docstring
    g_kept = g_kept / g_max
    lse_kept, t_kept = lse[kept], targets[kept]
    ws_dtype = hidden.dtype  # the GEMM operand dtype; fp32 inputs keep fp32 dlogits
    chunk = _chunk_rows(cfg, v, hidden.element_size(), k)
    dz = torch.empty(chunk, v, dtype=ws_dtype, device=hidden.device)
    upcast, precision = _dot_flags(hidden.dtype)
    bm, bv = cfg["block_m"], cfg["block_v"]
    programs = 0
    for s in range(0, k, chunk):
        rows = kept[s:s + chunk]
        c = rows.numel()
        xc = hidden.index_select(0, rows)  # [c, H] contiguous: the kernel's X and dW's right operand
        grid = (triton.cdiv(c, bm) * triton.cdiv(v, bv),)
        programs += grid[0]
        _dlogits_kernel[grid](
            xc, weight, bias if bias is not None else xc, t_kept[s:s + c], lse_kept[s:s + c], g_kept[s:s + c],
            dz, c, v, h, xc.stride(0), xc.stride(1), weight.stride(0), weight.stride(1), dz.stride(0),
            float(softcap or 1.0), HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, UPCAST=upcast,
            PRECISION=precision, BLOCK_M=bm, BLOCK_V=bv, BLOCK_K=cfg["block_k"], num_warps=cfg["num_warps"],
            num_stages=cfg["num_stages"])
        dzc = dz[:c]
        if need_dx:  # every kept row lives in exactly one chunk: a plain copy, no accumulation
            dx.index_copy_(0, rows, (torch.mm(dzc, weight).float() * g_max).to(hidden.dtype))
        if need_dw:
            _addmm_fp32_(dw32, dzc.t(), xc)
        if db32 is not None:
            db32 += dzc.sum(0, dtype=torch.float32)
    if dw32 is not None:
        dw32.mul_(g_max)
    if db32 is not None:
        db32.mul_(g_max)
    return dx, _cast(dw32, weight), _cast(db32, bias), k, programs


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
        options: tile/launch overrides `block_m`, `block_v`, `block_k`, `num_warps`, `num_stages`,
            `num_splits` (vocabulary splits of the forward), `chunk_size` (kept rows per backward chunk).
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
    cfg = _config(hidden.dtype, options)
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


__all__ = ["fused_linear_cross_entropy", "FusedLinearCrossEntropy", "FusedLinearCrossEntropyFunction",
           "fused_forward", "fused_backward"]
