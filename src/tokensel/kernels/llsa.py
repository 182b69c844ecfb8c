"""LLSA hierarchical sparse attention: Triton forward/backward driven only by sparse indices.

    o = llsa_attention(q, k, v, levels=2, block_size=16, top_k=8)        # q, k, v: [B, H, N, D]

The algorithm (pooling, hierarchical top-K, KV enrichment with reweighting, padding, causal mode) is
defined in `tokensel.kernels.llsa_reference`, which is also the CPU path. `backend=None|"auto"` picks
Triton on CUDA and the reference elsewhere; `TOKENSEL_KERNELS=torch|triton` overrides.

Kernels (one program per `block_size` queries or keys, fp32 accumulation):

* forward: per fine query block, an online softmax over (1) its `K_1` selected fine key blocks,
  (2) for every level `l < L` the `B` children of each block its level-`l+1` ancestor kept, with the
  `log(B^l)` bias, (3) every pooled key of the coarsest level. Stores `o` and the row log-sum-exp.
* backward: `delta = rowsum(o * dO)`; dQ per query block over the same key set; dK/dV of fine keys
  per key block over the query blocks that chose it, read from the *index transpose* (key-major CSR
  lists built by sort + count, no atomics); pooled dK/dV of level `l < L` per parent block over the
  level-`l+1` query blocks that kept it; pooled dK/dV of the top level per tile over all queries.
  Each output tile is owned by one program, so no atomics anywhere. The reweighting bias enters `p`
  itself, so pooled-key gradients carry the block weight at every level (the official L1 kernel
  drops it; `tests/kernels/test_llsa_kernel.py` checks every level against the reference).

GPU notes: the loops over selected blocks are branch-free (an empty `-1` slot loads block 0 under a false
mask and scores `-inf`), so the gathered K/V loads can be software-pipelined at every level; fp32 `tl.dot`
is exact (`"ieee"`) unless `torch.backends.cuda.matmul.allow_tf32` is set, as in the fused CE; the grid
folds (tile, batch x head) into axis 0, so no `B * H` hits CUDA's 65,535 cap on axes 1-2; launches run
under `torch.cuda.device(q.device)`.

Triton is optional: this module imports without it. The kernels are decorated with `triton.jit` on
first use, so `TRITON_INTERPRET=1` (the CPU interpreter) can be set any time before the first launch.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from tokensel._optional import TRITON_AVAILABLE
from tokensel.kernels import resolve_backend
from tokensel.kernels.llsa_reference import (
    LLSAPlan,
    index_transpose,
    level_log_weights,
    llsa_core_reference,
    llsa_prepare,
    llsa_reference,
    make_plan,
)

TOP_SPLITS = 32  # query-block chunks of the coarsest-level pooled dK/dV kernel (more programs, tiny partials)


def llsa_attention(q: Tensor, k: Tensor, v: Tensor, levels: int = 2, block_size: int = 16, top_k=8,
                   causal: bool = False, enrich: bool = True, reweight: bool = True, scale: float | None = None,
                   backend: str | None = None) -> Tensor:
    """LLSA attention of `q, k, v [B, H, N, D]` -> `[B, H, N, D]`; see `llsa_reference` for the arguments.

    `backend`: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch"; env `TOKENSEL_KERNELS` wins.
    """
    if resolve_backend(backend, q.device.type, op="llsa") != "triton":
        return llsa_reference(q, k, v, levels, block_size, top_k, causal, enrich, reweight, scale)
    if not TRITON_AVAILABLE:
        raise RuntimeError("TOKENSEL_KERNELS=triton but triton is not installed; pip install 'tokensel[kernels]' "
                           "or set TOKENSEL_KERNELS=torch")
    plan = make_plan(q.shape[2], levels, block_size, top_k, causal, enrich, reweight)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qp, kp, vp, pks, pvs, sels = llsa_prepare(q, k, v, plan)
    o = llsa_core_triton(qp, kp, vp, pks, pvs, sels, plan, scale)
    return o[:, :, : q.shape[2]]


def llsa_core(q, k, v, pks, pvs, sels, plan: LLSAPlan, scale: float, backend: str | None = None) -> Tensor:
    """The attention core on padded inputs (after `llsa_prepare`), by backend; used by tests and benchmarks."""
    if resolve_backend(backend, q.device.type, op="llsa") == "triton":
        return llsa_core_triton(q, k, v, pks, pvs, sels, plan, scale)
    return llsa_core_reference(q, k, v, pks, pvs, sels, plan, scale)


def llsa_core_triton(q, k, v, pks, pvs, sels, plan: LLSAPlan, scale: float) -> Tensor:
    """Triton core: padded `q, k, v [B, H, N_pad, D]`, pooled lists, selection lists -> `o [B, H, N_pad, D]`."""
    if not q.dtype == k.dtype == v.dtype:  # tl.dot needs both operands in one dtype; fail here, not in the compiler
        raise TypeError(f"llsa_attention: q, k, v must share one dtype, got q={q.dtype}, k={k.dtype}, v={v.dtype}; "
                        "cast them first (e.g. k.to(q.dtype))")
    pooled = list(pks) + list(pvs) if plan.enrich else []
    return _LLSAFunction.apply(q, k, v, plan, scale, tuple(sels), *pooled)


# ----------------------------------------------------------------------------------------------------
# autograd.Function and host wrappers
# ----------------------------------------------------------------------------------------------------

MAX_GRID_X = 2 ** 31 - 1   # CUDA's limit on grid axis 0
MAX_GRID_YZ = 65535        # ... and on axes 1 and 2
DPKV_ROWS_PER_SPLIT = 16   # fine query blocks per program and listed entry in the pooled dK/dV kernel


def _grid(n_tiles: int, n_bh: int, n_split: int = 1) -> tuple[int, int]:
    """Launch grid `(n_tiles * n_bh, n_split)`: the tile index and batch x heads are folded into axis 0
    (tiles fastest, so one head's programs run together and share its keys in L2), which CUDA allows up
    to 2^31 - 1, so no `B * H` or sequence length hits the 65,535 cap of axes 1 and 2. Kernels decode
    `tile = pid % n_tiles`, `bh = pid // n_tiles`; axis 1 carries the (few) partial-sum splits."""
    if n_tiles * n_bh > MAX_GRID_X or n_split > MAX_GRID_YZ:
        raise ValueError(f"llsa: {n_tiles} tiles x {n_bh} (batch x heads) x {n_split} splits exceed CUDA's grid "
                         f"limits ({MAX_GRID_X}, {MAX_GRID_YZ}); split the batch into smaller calls")
    return (n_tiles * n_bh, n_split)


def _on_device(t: Tensor):
    """Triton launches on the *current* CUDA device: make it the tensors' device for the launches."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _rows(x: Tensor) -> Tensor:
    """`[B, H, n, D]` -> contiguous `[B*H, n, D]`."""
    return x.reshape(-1, x.shape[-2], x.shape[-1]).contiguous()


def _precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision: exact fp32 ("ieee") unless torch allows TF32 matmuls, as
    `fused_linear_ce._dot_flags` does; for fp16 / bf16 operands the value is ignored."""
    return "tf32" if dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32 else "ieee"


def _meta(plan: LLSAPlan, d: int, dtype: torch.dtype) -> dict:
    """Compile-time constants shared by every kernel."""
    import triton

    block_d = triton.next_power_of_2(d)
    ks = tuple(plan.top_k) + (1,) * (3 - plan.levels)
    use_dot = plan.block >= 16 and block_d >= 16
    return dict(D=d, BLOCK_D=block_d, BS=plan.block, LEVELS=plan.levels, K1=ks[0], K2=ks[1], K3=ks[2],
                POW1=plan.block, POW2=plan.block ** 2, POW_TOP=plan.block ** plan.levels,
                CAUSAL=plan.causal, ENRICH=plan.enrich, USE_DOT=use_dot, PRECISION=_precision(dtype))


def _tiles(plan: LLSAPlan, meta: dict) -> tuple[int, dict]:
    """(BT, launch options): the coarsest-level key tile and the warps. Exact fp32 dots ("ieee") run on
    FMA units with their operands in registers; there BT = 16 and 8 warps keep every kernel free of
    register spills in the sm_80 / sm_90 builds (BT = 64 with 4 warps spilled up to 9 KB in `dtop`)."""
    import triton

    fma = meta["USE_DOT"] and meta["PRECISION"] == "ieee"
    lo = 16 if meta["USE_DOT"] else plan.block
    if fma:
        return lo, dict(num_warps=8)
    return max(lo, min(64, triton.next_power_of_2(plan.level_len(plan.levels)))), {}


def _dpkv_splits(pow_: int) -> tuple[int, int]:
    """(fine query blocks per split, splits) of the level-l pooled dK/dV kernel, whose listed entries each
    stand for `pow_ = B^l` fine query blocks: split that loop over grid axis 1 (fp32 partials) once it is
    longer than `DPKV_ROWS_PER_SPLIT` (level 2 at B = 16: 256 blocks per entry -> 16 splits)."""
    chunk = max(1, min(pow_, DPKV_ROWS_PER_SPLIT))
    return chunk, -(-pow_ // chunk)


def _level_args(q: Tensor, pks, pvs, sels, plan: LLSAPlan):
    """Per-level tensors in the kernels' fixed argument order (dummies where a level is absent)."""
    dev = q.device
    dummy_f = torch.zeros(1, device=dev, dtype=q.dtype)
    dummy_w = torch.zeros(1, device=dev, dtype=torch.float32)
    dummy_i = torch.zeros(1, device=dev, dtype=torch.int32)
    sel = [s.reshape(-1, s.shape[-2], s.shape[-1]).to(torch.int32).contiguous() for s in sels]
    sel = sel + [dummy_i] * (3 - len(sel))
    pk = [_rows(p) for p in pks] if plan.enrich else []
    pv = [_rows(p) for p in pvs] if plan.enrich else []
    lw = [level_log_weights(plan, lvl, dev).contiguous() for lvl in range(1, plan.levels + 1)]
    lvl_pk = lambda i: pk[i] if plan.enrich and i < plan.levels - 1 else dummy_f  # noqa: E731
    lvl_pv = lambda i: pv[i] if plan.enrich and i < plan.levels - 1 else dummy_f  # noqa: E731
    lvl_lw = lambda i: lw[i] if i < plan.levels - 1 else dummy_w  # noqa: E731
    top = (pk[-1], pv[-1]) if plan.enrich else (dummy_f, dummy_f)
    return dict(sel=sel, enr=[(lvl_pk(0), lvl_pv(0), lvl_lw(0)), (lvl_pk(1), lvl_pv(1), lvl_lw(1))],
                top=(top[0], top[1], lw[-1]), pk=pk, pv=pv, lw=lw)


class _LLSAFunction(torch.autograd.Function):
    """Sparse attention core with Triton forward and backward; gradients for q, k, v and pooled k, v."""

    @staticmethod
    def forward(ctx, q, k, v, plan: LLSAPlan, scale: float, sels: tuple, *pooled):
        levels = plan.levels
        pks, pvs = (list(pooled[:levels]), list(pooled[levels:])) if pooled else ([], [])
        o, lse = _forward(q, k, v, pks, pvs, list(sels), plan, scale)
        ctx.plan, ctx.scale = plan, scale
        ctx.save_for_backward(q, k, v, o, lse, *sels, *pooled)
        return o

    @staticmethod
    def backward(ctx, do):
        plan = ctx.plan
        q, k, v, o, lse, *rest = ctx.saved_tensors
        sels, pooled = rest[: plan.levels], rest[plan.levels:]
        pks, pvs = (list(pooled[: plan.levels]), list(pooled[plan.levels:])) if pooled else ([], [])
        dq, dk, dv, dpks, dpvs = _backward(do, q, k, v, o, lse, pks, pvs, list(sels), plan, ctx.scale)
        return (dq, dk, dv, None, None, None, *dpks, *dpvs)


def _forward(q, k, v, pks, pvs, sels, plan: LLSAPlan, scale: float):
    """Launch the forward kernel: `o [B, H, N_pad, D]`, `lse [B*H, N_pad]` float32."""
    kern = _kernels()
    b, h, n_pad, d = q.shape
    qr, kr, vr = _rows(q), _rows(k), _rows(v)
    o = torch.empty_like(qr)
    lse = torch.empty(qr.shape[:2], device=q.device, dtype=torch.float32)
    a = _level_args(q, pks, pvs, sels, plan)
    meta = _meta(plan, d, q.dtype)
    bt, opts = _tiles(plan, meta)
    with _on_device(q):
        kern["fwd"][_grid(plan.n_blocks, b * h)](
            qr, kr, vr, *a["enr"][0], *a["enr"][1], *a["top"], *a["sel"], o, lse,
            plan.n, n_pad, plan.level_len(2) if plan.levels >= 2 else 1,
            plan.level_len(3) if plan.levels >= 3 else 1, plan.level_len(plan.levels), scale, BT=bt, **meta, **opts)
    return o.view(b, h, n_pad, d), lse


def _backward(do, q, k, v, o, lse, pks, pvs, sels, plan: LLSAPlan, scale: float):
    """Launch the backward kernels; returns dq, dk, dv (`[B, H, N_pad, D]`) and pooled grads per level."""
    with _on_device(q):
        return _backward_launch(do, q, k, v, o, lse, pks, pvs, sels, plan, scale)


def _backward_launch(do, q, k, v, o, lse, pks, pvs, sels, plan: LLSAPlan, scale: float):
    import triton

    kern = _kernels()
    b, h, n_pad, d = q.shape
    bh = b * h
    qr, kr, vr, dor = _rows(q), _rows(k), _rows(v), _rows(do)
    delta = (dor.float() * _rows(o).float()).sum(-1).contiguous()          # [BH, N_pad]
    a = _level_args(q, pks, pvs, sels, plan)
    meta = _meta(plan, d, q.dtype)
    n2 = plan.level_len(2) if plan.levels >= 2 else 1
    n3 = plan.level_len(3) if plan.levels >= 3 else 1
    n_top = plan.level_len(plan.levels)
    bt, opts = _tiles(plan, meta)
    common = (plan.n, n_pad, n2, n3, n_top, scale)

    dq = torch.empty_like(qr)
    kern["dq"][_grid(plan.n_blocks, bh)](
        qr, kr, vr, dor, lse, delta, *a["enr"][0], *a["enr"][1], *a["top"], *a["sel"], dq, *common, BT=bt, **meta,
        **opts)

    # Fine dK/dV: one program per key block, over the query blocks listed for it by the index transpose.
    off, qids = index_transpose(a["sel"][0], plan.n_blocks)
    dk, dv = torch.empty_like(kr), torch.empty_like(vr)
    kern["dkv"][_grid(plan.n_blocks, bh)](qr, kr, vr, dor, lse, delta, off, qids, dk, dv, *common, **meta,
                                          **opts)

    dpks, dpvs = [], []
    if plan.enrich:
        for lvl in range(1, plan.levels):  # pooled level lvl, owned per parent block of level lvl+1
            n_up = plan.level_len(lvl + 1)
            off_u, qids_u = index_transpose(a["sel"][lvl], n_up)
            pk, pv = a["pk"][lvl - 1], a["pv"][lvl - 1]
            # each listed entry is B^lvl fine query blocks: past DPKV_ROWS_PER_SPLIT, split them over grid
            # axis 1 into fp32 partials (summed here, as for the top level), so no program walks them all
            r_chunk, n_split = _dpkv_splits(plan.block ** lvl)
            if n_split == 1:
                dpk, dpv = torch.empty_like(pk), torch.empty_like(pv)
            else:
                dpk = torch.empty((n_split, *pk.shape), device=q.device, dtype=torch.float32)
                dpv = torch.empty_like(dpk)
            kern["dpkv"][_grid(n_up, bh, n_split)](
                qr, dor, lse, delta, pk, pv, a["lw"][lvl - 1], off_u, qids_u, dpk, dpv, *common,
                plan.level_len(lvl), a["sel"][lvl].shape[1] * a["sel"][lvl].shape[2], r_chunk,
                POW=plan.block ** lvl, **meta, **opts)
            if n_split > 1:
                dpk, dpv = dpk.sum(0).to(pk.dtype), dpv.sum(0).to(pv.dtype)
            dpks.append(dpk.view(b, h, -1, d))
            dpvs.append(dpv.view(b, h, -1, d))
        # Coarsest level: every query reads every pooled key, so split the query blocks over grid axis 1
        # (enough programs on a GPU) and sum the per-split partials afterwards -- still no atomics.
        pk, pv, lw = a["top"]
        n_split = max(1, min(plan.n_blocks, TOP_SPLITS))
        chunk = triton.cdiv(plan.n_blocks, n_split)
        n_split = triton.cdiv(plan.n_blocks, chunk)
        part_k = torch.empty((n_split, *pk.shape), device=q.device, dtype=torch.float32)
        part_v = torch.empty_like(part_k)
        kern["dtop"][_grid(triton.cdiv(n_top, bt), bh, n_split)](
            qr, dor, lse, delta, pk, pv, lw, part_k, part_v, *common, chunk, BT=bt, **meta, **opts)
        dpks.append(part_k.sum(0).to(pk.dtype).view(b, h, -1, d))
        dpvs.append(part_v.sum(0).to(pv.dtype).view(b, h, -1, d))
    shape = (b, h, n_pad, d)
    return dq.view(shape), dk.view(shape), dv.view(shape), dpks, dpvs


# ----------------------------------------------------------------------------------------------------
# Triton kernels. Plain functions here; `_kernels()` wraps them with `triton.jit` on first use.
# All tensors are contiguous rows `[B*H, n, D]`; one program owns one output tile (no atomics).
# ----------------------------------------------------------------------------------------------------

_JIT_HELPERS = ("_mm_nt", "_mm_nn", "_mm_tn", "_load_rows", "_slot_rows", "_pooled_slot", "_fine_scores",
                "_pooled_scores",
                "_online_update", "_dq_update", "_dkv_update")
_JIT_KERNELS = {"fwd": "_llsa_fwd_kernel", "dq": "_llsa_dq_kernel", "dkv": "_llsa_dkv_kernel",
                "dpkv": "_llsa_dpkv_kernel", "dtop": "_llsa_dtop_kernel"}
_KERNELS: dict | None = None


def _kernels() -> dict:
    """The Triton kernels, decorated on first use (so TRITON_INTERPRET is read then, not at import)."""
    global _KERNELS
    if _KERNELS is None:
        import triton

        g = globals()
        for name in _JIT_HELPERS + tuple(_JIT_KERNELS.values()):
            g[name] = triton.jit(g[name])  # the kernels resolve helpers through these globals
        _KERNELS = {key: g[name] for key, name in _JIT_KERNELS.items()}
    return _KERNELS


if TRITON_AVAILABLE:
    import triton.language as tl

    def _mm_nt(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] @ b [N, K]^T -> [M, N] fp32 (broadcast-sum when a tile is below tl.dot's 16)."""
        if USE_DOT:
            return tl.dot(a, tl.trans(b), input_precision=PRECISION)
        else:
            return tl.sum(a.to(tl.float32)[:, None, :] * b.to(tl.float32)[None, :, :], axis=2)

    def _mm_nn(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a [M, K] @ b [K, N] -> [M, N] fp32."""
        if USE_DOT:
            return tl.dot(a, b, input_precision=PRECISION)
        else:
            return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)

    def _mm_tn(a, b, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """a [K, M]^T @ b [K, N] -> [M, N] fp32."""
        if USE_DOT:
            return tl.dot(tl.trans(a), b, input_precision=PRECISION)
        else:
            return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[:, None, :], axis=0)

    def _load_rows(ptr, rows, row_ok, offs_d, D: tl.constexpr):
        """Rows `rows` of a `[n, D]` matrix at `ptr` -> [len(rows), BLOCK_D], zeros outside."""
        return tl.load(ptr + rows[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D),
                       other=0.0)

    def _slot_rows(slot, offs_b, BS: tl.constexpr):
        """Rows of the block in one top-K slot (-1 = empty) -> (row ids, row mask); branch-free: an empty slot
        reads block 0 under an all-false mask, so the gathered loads stay in the loop body and pipeline."""
        ok = (offs_b * 0 + slot) >= 0  # broadcast first: the interpreter rejects a block & scalar mask
        return tl.maximum(slot, 0) * BS + offs_b, ok

    def _pooled_slot(slot, offs_b, PK, PV, LW, offs_d, D: tl.constexpr, BS: tl.constexpr):
        """One selected block of pooled keys (enrichment level 1 or 2): (token ids, mask, keys, values,
        log-weights), masked and -inf for an empty slot."""
        offs_t, ok = _slot_rows(slot, offs_b, BS)
        kt = _load_rows(PK, offs_t, ok, offs_d, D)
        vt = _load_rows(PV, offs_t, ok, offs_d, D)
        return offs_t, ok, kt, vt, tl.load(LW + offs_t, mask=ok, other=float("-inf"))

    def _fine_scores(q, kt, offs_m, offs_n, key_ok, n_valid, scale, CAUSAL: tl.constexpr, USE_DOT: tl.constexpr,
                     PRECISION: tl.constexpr):
        """Scaled scores of fine keys; keys of an empty slot, padded keys and (causal) future keys -> -inf."""
        s = _mm_nt(q, kt, USE_DOT, PRECISION) * scale
        ok = key_ok[None, :] & (offs_n[None, :] < n_valid) & (offs_m[:, None] >= 0)
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= offs_m[:, None])
        return tl.where(ok, s, float("-inf"))

    def _pooled_scores(q, kt, lw, offs_m, offs_t, key_ok, POW: tl.constexpr, scale, CAUSAL: tl.constexpr,
                       USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """Scores of pooled keys (each standing for POW tokens) plus their log-weight; keys of an empty slot
        -> -inf; causal: only keys whose whole block lies at or before the query."""
        s = _mm_nt(q, kt, USE_DOT, PRECISION) * scale + lw[None, :]
        ok = key_ok[None, :] & (offs_m[:, None] >= 0)
        if CAUSAL:
            ok = ok & (((offs_t + 1) * POW - 1)[None, :] <= offs_m[:, None])
        return tl.where(ok, s, float("-inf"))

    def _online_update(acc, m_i, l_i, s, vt, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """One online-softmax step over a key tile. m_i starts finite, so an all -inf tile (an empty slot)
        gives alpha = 1 and p = 0 and leaves acc, m_i, l_i bit-for-bit unchanged."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm_nn(p.to(vt.dtype), vt, USE_DOT, PRECISION)
        return acc, m_new, l_new

    def _dq_update(dq, s, do, lse, delta, kt, vt, scale, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """dQ += dS K for one key tile (FlashAttention-2 style, p recomputed from the saved lse); a -inf
        score (empty slot, masked key) gives p = 0, hence dS = 0: no contribution."""
        p = tl.exp(s - lse[:, None])
        dp = _mm_nt(do, vt, USE_DOT, PRECISION)
        ds = p * (dp - delta[:, None])
        return dq + _mm_nn(ds.to(kt.dtype), kt, USE_DOT, PRECISION) * scale

    def _dkv_update(dk, dv, s, q, do, lse, delta, vt, scale, USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """dK += dS^T Q, dV += P^T dO for one query tile against the program's key tile."""
        p = tl.exp(s - lse[:, None])
        dv = dv + _mm_tn(p.to(do.dtype), do, USE_DOT, PRECISION)
        dp = _mm_nt(do, vt, USE_DOT, PRECISION)
        ds = p * (dp - delta[:, None])
        dk = dk + _mm_tn(ds.to(q.dtype), q, USE_DOT, PRECISION) * scale
        return dk, dv

    def _llsa_fwd_kernel(Q, K, V, PKA, PVA, LWA, PKB, PVB, LWB, PKT, PVT, LWT, SEL1, SEL2, SEL3, OUT, LSE,
                         n_valid, n_pad, n2, n3, n_top, scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, LEVELS: tl.constexpr,
                         K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, POW1: tl.constexpr,
                         POW2: tl.constexpr, POW_TOP: tl.constexpr, CAUSAL: tl.constexpr, ENRICH: tl.constexpr,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):
        """One program = one fine query block of BS queries of one (batch, head); grid axis 0 = both, folded."""
        n1 = n_pad // BS
        pid = tl.program_id(0)
        qb = pid % n1
        bh = (pid // n1).to(tl.int64)
        offs_m = qb * BS + tl.arange(0, BS)
        offs_b = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        all_rows = offs_m >= 0
        q = _load_rows(Q + bh * n_pad * D, offs_m, all_rows, offs_d, D)
        m_i = tl.full([BS], -1.0e30, tl.float32)
        l_i = tl.zeros([BS], tl.float32)
        acc = tl.zeros([BS, BLOCK_D], tl.float32)
        # 1) the fine key blocks chosen for this query block
        for j in range(K1):
            offs_n, ok = _slot_rows(tl.load(SEL1 + (bh * n1 + qb) * K1 + j), offs_b, BS)
            kt = _load_rows(K + bh * n_pad * D, offs_n, ok, offs_d, D)
            vt = _load_rows(V + bh * n_pad * D, offs_n, ok, offs_d, D)
            s = _fine_scores(q, kt, offs_m, offs_n, ok, n_valid, scale, CAUSAL, USE_DOT, PRECISION)
            acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vt, USE_DOT, PRECISION)
        if ENRICH:
            # 2) level-1 pooled keys: children of the level-2 blocks this block's level-2 ancestor kept
            if LEVELS >= 2:
                anc = qb // POW1
                for j in range(K2):
                    offs_t, ok, kt, vt, lw = _pooled_slot(tl.load(SEL2 + (bh * n2 + anc) * K2 + j), offs_b,
                                                          PKA + bh * n1 * D, PVA + bh * n1 * D, LWA,
                                                          offs_d, D, BS)
                    s = _pooled_scores(q, kt, lw, offs_m, offs_t, ok, POW1, scale, CAUSAL, USE_DOT, PRECISION)
                    acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vt, USE_DOT, PRECISION)
            # level-2 pooled keys under the level-3 blocks kept by the level-3 ancestor
            if LEVELS >= 3:
                anc3 = qb // POW2
                for j in range(K3):
                    offs_t, ok, kt, vt, lw = _pooled_slot(tl.load(SEL3 + (bh * n3 + anc3) * K3 + j), offs_b,
                                                          PKB + bh * n2 * D, PVB + bh * n2 * D, LWB,
                                                          offs_d, D, BS)
                    s = _pooled_scores(q, kt, lw, offs_m, offs_t, ok, POW2, scale, CAUSAL, USE_DOT, PRECISION)
                    acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vt, USE_DOT, PRECISION)
            # 3) every pooled key of the coarsest level
            for t0 in range(0, n_top, BT):
                offs_t = t0 + tl.arange(0, BT)
                t_ok = offs_t < n_top
                kt = _load_rows(PKT + bh * n_top * D, offs_t, t_ok, offs_d, D)
                vt = _load_rows(PVT + bh * n_top * D, offs_t, t_ok, offs_d, D)
                lw = tl.load(LWT + offs_t, mask=t_ok, other=float("-inf"))
                s = _pooled_scores(q, kt, lw, offs_m, offs_t, t_ok, POW_TOP, scale, CAUSAL, USE_DOT, PRECISION)
                acc, m_i, l_i = _online_update(acc, m_i, l_i, s, vt, USE_DOT, PRECISION)
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        lse = tl.where(l_i > 0, m_i + tl.log(l_safe), float("inf"))  # +inf: a row with no key gives p = 0
        tl.store(OUT + bh * n_pad * D + offs_m[:, None] * D + offs_d[None, :], o.to(OUT.dtype.element_ty),
                 mask=offs_d[None, :] < D)
        tl.store(LSE + bh * n_pad + offs_m, lse)

    def _llsa_dq_kernel(Q, K, V, DO, LSE, DELTA, PKA, PVA, LWA, PKB, PVB, LWB, PKT, PVT, LWT, SEL1, SEL2, SEL3, DQ,
                        n_valid, n_pad, n2, n3, n_top, scale,
                        D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, LEVELS: tl.constexpr,
                        K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, POW1: tl.constexpr,
                        POW2: tl.constexpr, POW_TOP: tl.constexpr, CAUSAL: tl.constexpr, ENRICH: tl.constexpr,
                        USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):
        """dQ of one fine query block over exactly the key set of the forward (same branch-free gathers)."""
        n1 = n_pad // BS
        pid = tl.program_id(0)
        qb = pid % n1
        bh = (pid // n1).to(tl.int64)
        offs_m = qb * BS + tl.arange(0, BS)
        offs_b = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        all_rows = offs_m >= 0
        q = _load_rows(Q + bh * n_pad * D, offs_m, all_rows, offs_d, D)
        do = _load_rows(DO + bh * n_pad * D, offs_m, all_rows, offs_d, D)
        lse = tl.load(LSE + bh * n_pad + offs_m)
        delta = tl.load(DELTA + bh * n_pad + offs_m)
        dq = tl.zeros([BS, BLOCK_D], tl.float32)
        for j in range(K1):
            offs_n, ok = _slot_rows(tl.load(SEL1 + (bh * n1 + qb) * K1 + j), offs_b, BS)
            kt = _load_rows(K + bh * n_pad * D, offs_n, ok, offs_d, D)
            vt = _load_rows(V + bh * n_pad * D, offs_n, ok, offs_d, D)
            s = _fine_scores(q, kt, offs_m, offs_n, ok, n_valid, scale, CAUSAL, USE_DOT, PRECISION)
            dq = _dq_update(dq, s, do, lse, delta, kt, vt, scale, USE_DOT, PRECISION)
        if ENRICH:
            if LEVELS >= 2:
                anc = qb // POW1
                for j in range(K2):
                    offs_t, ok, kt, vt, lw = _pooled_slot(tl.load(SEL2 + (bh * n2 + anc) * K2 + j), offs_b,
                                                          PKA + bh * n1 * D, PVA + bh * n1 * D, LWA,
                                                          offs_d, D, BS)
                    s = _pooled_scores(q, kt, lw, offs_m, offs_t, ok, POW1, scale, CAUSAL, USE_DOT, PRECISION)
                    dq = _dq_update(dq, s, do, lse, delta, kt, vt, scale, USE_DOT, PRECISION)
            if LEVELS >= 3:
                anc3 = qb // POW2
                for j in range(K3):
                    offs_t, ok, kt, vt, lw = _pooled_slot(tl.load(SEL3 + (bh * n3 + anc3) * K3 + j), offs_b,
                                                          PKB + bh * n2 * D, PVB + bh * n2 * D, LWB,
                                                          offs_d, D, BS)
                    s = _pooled_scores(q, kt, lw, offs_m, offs_t, ok, POW2, scale, CAUSAL, USE_DOT, PRECISION)
                    dq = _dq_update(dq, s, do, lse, delta, kt, vt, scale, USE_DOT, PRECISION)
            for t0 in range(0, n_top, BT):
                offs_t = t0 + tl.arange(0, BT)
                t_ok = offs_t < n_top
                kt = _load_rows(PKT + bh * n_top * D, offs_t, t_ok, offs_d, D)
                vt = _load_rows(PVT + bh * n_top * D, offs_t, t_ok, offs_d, D)
                lw = tl.load(LWT + offs_t, mask=t_ok, other=float("-inf"))
                s = _pooled_scores(q, kt, lw, offs_m, offs_t, t_ok, POW_TOP, scale, CAUSAL, USE_DOT, PRECISION)
                dq = _dq_update(dq, s, do, lse, delta, kt, vt, scale, USE_DOT, PRECISION)
        tl.store(DQ + bh * n_pad * D + offs_m[:, None] * D + offs_d[None, :], dq.to(DQ.dtype.element_ty),
                 mask=offs_d[None, :] < D)

    def _llsa_dkv_kernel(Q, K, V, DO, LSE, DELTA, OFF, QIDS, DK, DV, n_valid, n_pad, n2, n3, n_top, scale,
                         D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, LEVELS: tl.constexpr,
                         K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, POW1: tl.constexpr,
                         POW2: tl.constexpr, POW_TOP: tl.constexpr, CAUSAL: tl.constexpr, ENRICH: tl.constexpr,
                         USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """dK, dV of one fine key block, over only the query blocks that selected it (key-major CSR, which
        lists real selections only: empty slots sort past the last offset)."""
        n1 = n_pad // BS
        pid = tl.program_id(0)
        kb = pid % n1
        bh = (pid // n1).to(tl.int64)
        offs_n = kb * BS + tl.arange(0, BS)
        offs_b = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        all_rows = offs_n >= 0
        kt = _load_rows(K + bh * n_pad * D, offs_n, all_rows, offs_d, D)
        vt = _load_rows(V + bh * n_pad * D, offs_n, all_rows, offs_d, D)
        dk = tl.zeros([BS, BLOCK_D], tl.float32)
        dv = tl.zeros([BS, BLOCK_D], tl.float32)
        start = tl.load(OFF + bh * (n1 + 1) + kb)
        end = tl.load(OFF + bh * (n1 + 1) + kb + 1)
        for e in range(start, end):
            qb = tl.load(QIDS + bh * n1 * K1 + e)
            offs_m = qb * BS + offs_b
            q = _load_rows(Q + bh * n_pad * D, offs_m, all_rows, offs_d, D)
            do = _load_rows(DO + bh * n_pad * D, offs_m, all_rows, offs_d, D)
            lse = tl.load(LSE + bh * n_pad + offs_m)
            delta = tl.load(DELTA + bh * n_pad + offs_m)
            s = _fine_scores(q, kt, offs_m, offs_n, all_rows, n_valid, scale, CAUSAL, USE_DOT, PRECISION)
            dk, dv = _dkv_update(dk, dv, s, q, do, lse, delta, vt, scale, USE_DOT, PRECISION)
        out = bh * n_pad * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + out, dk.to(DK.dtype.element_ty), mask=offs_d[None, :] < D)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=offs_d[None, :] < D)

    def _llsa_dpkv_kernel(Q, DO, LSE, DELTA, PK, PV, LW, OFF, QIDS, DPK, DPV, n_valid, n_pad, n2, n3, n_top, scale,
                          n_lvl, n_list, r_chunk, POW: tl.constexpr,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, LEVELS: tl.constexpr,
                          K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, POW1: tl.constexpr,
                          POW2: tl.constexpr, POW_TOP: tl.constexpr, CAUSAL: tl.constexpr, ENRICH: tl.constexpr,
                          USE_DOT: tl.constexpr, PRECISION: tl.constexpr):
        """dK, dV of the BS pooled keys (level l, each standing for POW = BS^l tokens) under one level-(l+1)
        block, over the fine query blocks whose level-(l+1) ancestor kept that block (CSR of its top-K).

        Each listed level-(l+1) query token is POW fine query blocks; grid axis 1 splits them into runs of
        `r_chunk`. DPK, DPV are `[splits, B*H, n_lvl, D]` (fp32 partials, summed by the host) or, with one
        split, the gradients themselves."""
        n_up = n_lvl // BS
        pid = tl.program_id(0)
        pb = pid % n_up
        bh = (pid // n_up).to(tl.int64)
        split = tl.program_id(1)
        n_bh = tl.num_programs(0) // n_up
        r_start = split * r_chunk
        r_end = tl.minimum(r_start + r_chunk, POW)
        offs_t = pb * BS + tl.arange(0, BS)
        offs_b = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        all_rows = offs_t >= 0
        kt = _load_rows(PK + bh * n_lvl * D, offs_t, all_rows, offs_d, D)
        vt = _load_rows(PV + bh * n_lvl * D, offs_t, all_rows, offs_d, D)
        lw = tl.load(LW + offs_t)
        dk = tl.zeros([BS, BLOCK_D], tl.float32)
        dv = tl.zeros([BS, BLOCK_D], tl.float32)
        start = tl.load(OFF + bh * (n_up + 1) + pb)
        end = tl.load(OFF + bh * (n_up + 1) + pb + 1)
        for e in range(start, end):
            qa = tl.load(QIDS + bh * n_list + e)        # a level-(l+1) query token ...
            for r in range(r_start, r_end):              # ... = POW fine query blocks (this split's run)
                offs_m = (qa * POW + r) * BS + offs_b
                q = _load_rows(Q + bh * n_pad * D, offs_m, all_rows, offs_d, D)
                do = _load_rows(DO + bh * n_pad * D, offs_m, all_rows, offs_d, D)
                lse = tl.load(LSE + bh * n_pad + offs_m)
                delta = tl.load(DELTA + bh * n_pad + offs_m)
                s = _pooled_scores(q, kt, lw, offs_m, offs_t, all_rows, POW, scale, CAUSAL, USE_DOT, PRECISION)
                dk, dv = _dkv_update(dk, dv, s, q, do, lse, delta, vt, scale, USE_DOT, PRECISION)
        out = (split * n_bh + bh) * n_lvl * D + offs_t[:, None] * D + offs_d[None, :]
        tl.store(DPK + out, dk.to(DPK.dtype.element_ty), mask=offs_d[None, :] < D)
        tl.store(DPV + out, dv.to(DPV.dtype.element_ty), mask=offs_d[None, :] < D)

    def _llsa_dtop_kernel(Q, DO, LSE, DELTA, PK, PV, LW, DPK, DPV, n_valid, n_pad, n2, n3, n_top, scale, chunk,
                          D: tl.constexpr, BLOCK_D: tl.constexpr, BS: tl.constexpr, LEVELS: tl.constexpr,
                          K1: tl.constexpr, K2: tl.constexpr, K3: tl.constexpr, POW1: tl.constexpr,
                          POW2: tl.constexpr, POW_TOP: tl.constexpr, CAUSAL: tl.constexpr, ENRICH: tl.constexpr,
                          USE_DOT: tl.constexpr, PRECISION: tl.constexpr, BT: tl.constexpr):
        """Partial dK, dV of BT coarsest-level pooled keys over one chunk of query blocks (every query reads
        them); DPK, DPV are `[splits, B*H, n_top, D]` fp32 partials, summed by the host."""
        n_tb = tl.cdiv(n_top, BT)
        pid = tl.program_id(0)
        tb = pid % n_tb
        bh = (pid // n_tb).to(tl.int64)
        split = tl.program_id(1)
        n_bh = tl.num_programs(0) // n_tb
        n1 = n_pad // BS
        q_start = split * chunk
        q_end = tl.minimum(q_start + chunk, n1)
        offs_t = tb * BT + tl.arange(0, BT)
        t_ok = offs_t < n_top
        offs_b = tl.arange(0, BS)
        offs_d = tl.arange(0, BLOCK_D)
        all_rows = offs_b >= 0
        kt = _load_rows(PK + bh * n_top * D, offs_t, t_ok, offs_d, D)
        vt = _load_rows(PV + bh * n_top * D, offs_t, t_ok, offs_d, D)
        lw = tl.load(LW + offs_t, mask=t_ok, other=float("-inf"))
        dk = tl.zeros([BT, BLOCK_D], tl.float32)
        dv = tl.zeros([BT, BLOCK_D], tl.float32)
        for qb in range(q_start, q_end):
            offs_m = qb * BS + offs_b
            q = _load_rows(Q + bh * n_pad * D, offs_m, all_rows, offs_d, D)
            do = _load_rows(DO + bh * n_pad * D, offs_m, all_rows, offs_d, D)
            lse = tl.load(LSE + bh * n_pad + offs_m)
            delta = tl.load(DELTA + bh * n_pad + offs_m)
            s = _pooled_scores(q, kt, lw, offs_m, offs_t, t_ok, POW_TOP, scale, CAUSAL, USE_DOT, PRECISION)
            dk, dv = _dkv_update(dk, dv, s, q, do, lse, delta, vt, scale, USE_DOT, PRECISION)
        out = (split * n_bh + bh) * n_top * D + offs_t[:, None] * D + offs_d[None, :]
        ok = t_ok[:, None] & (offs_d[None, :] < D)
        tl.store(DPK + out, dk, mask=ok)
        tl.store(DPV + out, dv, mask=ok)


# ----------------------------------------------------------------------------------------------------
# Launch variants (the AOT compile test, tokensel.kernels.aot)
# ----------------------------------------------------------------------------------------------------

# (block size B, head dim D): tl.dot at D 64 / 128 / 96 (not a power of 2: BLOCK_D 128, masked), and the
# broadcast-sum path (USE_DOT off: B < 16) at D 12 (BLOCK_D 16, masked)
AOT_SHAPES = {"b16d64": (16, 64), "b16d128": (16, 128), "b16d96": (16, 96), "b4d12": (4, 12)}
# sequence length as a multiple of B^L: the coarsest level then has 1 token (BT at its minimum, the coarsest
# top-K clamped to 1, n_top specialized to the constant 1, a ragged tail), 32 (BT 32) or 128 tokens (BT 64)
AOT_LENGTHS = {"short": (1, -3), "mid": (32, -5), "long": (128, 0)}


# constexprs the host passes with one value only (tokensel.kernels.aot checks every other bool takes both)
AOT_SINGLE_VALUED = {"_llsa_dpkv_kernel": {"ENRICH": "launched only for enriched plans"},
                     "_llsa_dtop_kernel": {"ENRICH": "launched only for enriched plans"}}


def launch_variants() -> list:
    """The launches `_forward` / `_backward_launch` make on a GPU, for `tokensel.kernels.aot` (the AOT compile
    test), built with the host's helpers (`make_plan`, `_meta`, `_tiles`, `_dpkv_splits`, the top-level split
    rule) at top_k 8 and the kernels' argument order; per plan: fwd, dq, dkv, and with enrichment one dpkv per
    level below the top (split into fp32 partials where B^l > DPKV_ROWS_PER_SPLIT) and dtop.

    Axes: dtype (bf16, fp16, fp32 with allow_tf32 off -> "ieee": BT 16 and 8 warps, and on -> "tf32"),
    shape (`AOT_SHAPES`), levels 1-3, causal, enrich, length (`AOT_LENGTHS`: BT and the clamped top-K). Rows: a
    pairwise covering design (`aot.pairwise`: every value pair of every two axes in some row) seeded with the
    module defaults (B 16, levels 2, non-causal, enriched) at D 64 and 128 for bf16 and exact fp32, and one
    enriched 3-level broadcast-path plan (the pooled dK/dV kernel without tl.dot).
    """
    import triton

    from tokensel.kernels.aot import Variant, allow_tf32, pairwise, ptr

    kern = _kernels()
    dtypes = {"bf16": (torch.bfloat16, False), "fp16": (torch.float16, False), "fp32-ieee": (torch.float32, False),
              "fp32-tf32": (torch.float32, True)}
    axes = dict(dtype=list(dtypes), shape=list(AOT_SHAPES), levels=[1, 2, 3], causal=[False, True],
                enrich=[True, False], length=list(AOT_LENGTHS))
    seeds = [dict(dtype=d, shape=s, levels=2, causal=False, enrich=True, length="long")
             for d in ("bf16", "fp32-ieee") for s in ("b16d64", "b16d128")]
    seeds.append(dict(dtype="bf16", shape="b4d12", levels=3, causal=True, enrich=True, length="long"))  # dpkv, bcast
    f32, i32 = "*fp32", "*i32"
    out = []
    for row in pairwise(axes, seeds):
        dtype, tf32 = dtypes[row["dtype"]]
        bs, d = AOT_SHAPES[row["shape"]]
        levels = row["levels"]
        mult, tail = AOT_LENGTHS[row["length"]]
        plan = make_plan(mult * bs ** levels + tail, levels, bs, 8, row["causal"], row["enrich"])
        with allow_tf32(tf32):
            meta = _meta(plan, d, dtype)
        bt, opts = _tiles(plan, meta)
        opts = dict(num_warps=opts.get("num_warps", 4), num_stages=opts.get("num_stages", 3), tags=dict(row))
        p = ptr(dtype)
        n_top = plan.level_len(levels)
        common = dict(n_valid=plan.n, n_pad=plan.n_pad, n2=plan.level_len(2) if levels >= 2 else 1,
                      n3=plan.level_len(3) if levels >= 3 else 1, n_top=n_top, scale=d ** -0.5, **meta)
        enr = dict(PKA=p, PVA=p, LWA=f32, PKB=p, PVB=p, LWB=f32, PKT=p, PVT=p, LWT=f32, SEL1=i32, SEL2=i32, SEL3=i32)
        grads = dict(Q=p, DO=p, LSE=f32, DELTA=f32)
        out.append(Variant(kern["fwd"], dict(common, Q=p, K=p, V=p, **enr, OUT=p, LSE=f32, BT=bt), **opts))
        out.append(Variant(kern["dq"], dict(common, **grads, K=p, V=p, **enr, DQ=p, BT=bt), **opts))
        out.append(Variant(kern["dkv"], dict(common, **grads, K=p, V=p, OFF=i32, QIDS=i32, DK=p, DV=p), **opts))
        if plan.enrich:
            for lvl in range(1, levels):
                r_chunk, n_split = _dpkv_splits(bs ** lvl)
                part = f32 if n_split > 1 else p
                out.append(Variant(kern["dpkv"], dict(
                    common, **grads, PK=p, PV=p, LW=f32, OFF=i32, QIDS=i32, DPK=part, DPV=part,
                    n_lvl=plan.level_len(lvl), n_list=plan.level_len(lvl + 1) * plan.top_k[lvl], r_chunk=r_chunk,
                    POW=bs ** lvl), **dict(opts, tags=dict(row, dpkv_level=lvl))))
            n_split = max(1, min(plan.n_blocks, TOP_SPLITS))
            chunk = triton.cdiv(plan.n_blocks, n_split)
            out.append(Variant(kern["dtop"], dict(common, **grads, PK=p, PV=p, LW=f32, DPK=f32, DPV=f32, chunk=chunk,
                                                  BT=bt), **opts))
    return out


__all__ = ["llsa_attention", "llsa_core", "llsa_core_triton", "llsa_reference"]
