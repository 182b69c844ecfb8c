"""LLSA (Log-linear Sparse Attention, Zhou et al., arXiv 2512.16615) in pure PyTorch.

This is the CPU path of `tokensel.kernels.llsa.llsa_attention` and the oracle the Triton kernels are
tested against. It never builds an `N x N` mask: every query block gathers its own key set.

The hierarchy (block size `B`, `L` levels, top-K `K_l` per level, level 0 = tokens):

1. *Pooling.* Level `l` holds `N / B^l` mean-pooled tokens of Q, K and V; pooled token `t` of level
   `l` stands for the fine tokens `[t B^l, (t+1) B^l)`.
2. *Selection* (no gradient, hard top-K). At the coarsest level `L` every pooled query scores every
   pooled key and keeps `K_L`. At each finer level `l` a level-`l` query block scores only the `B`
   children of each of the `K_{l+1}` blocks its parent kept, and keeps `K_l` of them. Level 1's
   choice is the fine key blocks (`B` tokens each) of every query block of `B` queries.
3. *Attention with hierarchical KV enrichment.* A query block attends to
   - the `K_1 B` fine keys of its selected blocks (weight 1);
   - for every level `1 <= l < L`, the `K_{l+1} B` level-`l` pooled keys that were the candidates of
     its level-`l` selection (children of the blocks its level-`l+1` ancestor kept);
   - all `N / B^L` pooled keys of the coarsest level.
   A pooled key of level `l` enters the softmax with its score plus `log(B^l)` ("KV reweighting": as
   if it were repeated once per token it summarises). Pooled keys are not de-duplicated against the
   fine keys they overlap, as in the official code.

Two points where we deviate from, or go beyond, the paper and its code (documented, deliberate):

* Padding. The official kernels need `N` a power of two (and a multiple of 1024 / 16384 for the coarse
  part to run at all). Here any `N` works: the sequence is zero-padded to a multiple of `B^L`, padded
  keys are masked, a pooled token is the mean over its *real* tokens only, and its reweighting uses
  its real token count (`B^l` for a full block, fewer at the ragged end, `-inf` for an empty one).
* Causal mode (the paper is non-causal only). No output `i` depends on any token after `i` (tested
  exactly: perturbing token `j` leaves outputs `i < j` bit-for-bit equal). Keys: a query at `i` sees a
  fine key `j <= i`, and a pooled key only if its whole block lies at or before `i`, so no later token
  leaks through a mean. Selection (still one choice per query block at each level, so the sparse-index
  contract is unchanged): the pooled query of a block averages positions after most of its queries, so
  level-`l` token `t` is scored with the pooled query of the *previous* level-`l` token `t - 1`
  (positions `[(t-1) B^l, t B^l)`, all before every query of `t`); token 0 has no such query and keeps
  only itself. Candidates after `t` are masked, and the diagonal block `t` is always kept (its own
  pooled key, which reaches ahead, is never scored), so each query keeps at least itself. Candidate keys
  `j < t` are whole blocks before `t`. The parent choice a level inherits was made the same way one
  level up, from positions before the parent block. So what a query block reads is fixed by tokens
  before the block.

The paper states the enrichment set as "coarse tokens of length O(K log N) found in the selection
stage"; we follow the released code's reading of it (the candidate set scored at each level, `K B`
tokens, and the whole coarsest level), which the notes in `methods/arch_selectors.md` §3.1 record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

try:
    from tokensel.errors import ConfigError
except ImportError:  # an exported copy run with trust_remote_code where tokensel is not installed
    from .errors import ConfigError

MAX_LEVELS = 3
NEG_INF = float("-inf")


@dataclass(frozen=True)
class LLSAPlan:
    """Static shape of one LLSA call: lengths per level and effective top-K.

    `top_k[l - 1]` is the number of blocks kept at level `l` (`top_k[0]` picks the fine key blocks).
    The effective values are clamped to the number of candidates, so short sequences degrade to
    "keep everything" instead of failing.
    """

    n: int
    n_pad: int
    levels: int
    block: int
    top_k: tuple[int, ...]
    causal: bool = False
    enrich: bool = True
    reweight: bool = True

    def level_len(self, level: int) -> int:
        """Number of (pooled) tokens at `level` (0 = fine tokens)."""
        return self.n_pad // self.block ** level

    @property
    def n_blocks(self) -> int:
        """Number of fine query blocks (= level-1 tokens)."""
        return self.level_len(1)


def normalize_top_k(top_k: int | list[int] | tuple[int, ...], levels: int) -> tuple[int, ...]:
    """`top_k` as one int per level (finest first); raise ConfigError on a bad value."""
    ks = (top_k,) * levels if isinstance(top_k, int) else tuple(int(k) for k in top_k)
    if len(ks) != levels:
        raise ConfigError(f"top_k={list(ks)} needs one value per level (levels={levels}), finest level first")
    if any(k < 1 for k in ks):
        raise ConfigError(f"top_k={list(ks)}: every level must keep at least 1 block")
    return ks


def validate_llsa_args(levels: int, block_size: int, top_k) -> tuple[int, ...]:
    """Check the user-facing hyper-parameters once (module init); returns `top_k` per level."""
    if not 1 <= int(levels) <= MAX_LEVELS:
        raise ConfigError(f"levels={levels}: LLSA supports 1 to {MAX_LEVELS} pooling levels")
    if block_size < 2 or block_size & (block_size - 1):
        raise ConfigError(f"block_size={block_size} must be a power of two >= 2 (Triton tiles need it); try 4 or 16")
    return normalize_top_k(top_k, levels)


def make_plan(n: int, levels: int = 2, block_size: int = 16, top_k=8, causal: bool = False,
              enrich: bool = True, reweight: bool = True) -> LLSAPlan:
    """Pad `n` to a multiple of `block_size**levels` and clamp top-K to the candidates of each level."""
    ks = validate_llsa_args(levels, block_size, top_k)
    unit = block_size ** levels
    n_pad = max(unit, math.ceil(n / unit) * unit)
    eff = [0] * levels
    eff[-1] = min(ks[-1], n_pad // unit)                     # coarsest: dense over all its tokens
    for lvl in range(levels - 1, 0, -1):                     # finer: among children of the kept blocks
        eff[lvl - 1] = min(ks[lvl - 1], eff[lvl] * block_size)
    return LLSAPlan(n, n_pad, levels, block_size, tuple(eff), causal, enrich, reweight)


# ----------------------------------------------------------------------------------------------------
# Pooling pyramid
# ----------------------------------------------------------------------------------------------------

def level_counts(plan: LLSAPlan, level: int, device=None, dtype=torch.float32) -> Tensor:
    """Real (unpadded) tokens under each pooled token of `level`: `[N / B^level]`."""
    size = plan.block ** level
    start = torch.arange(plan.level_len(level), device=device, dtype=dtype) * size
    return (plan.n - start).clamp(0, size)


def level_log_weights(plan: LLSAPlan, level: int, device=None, dtype=torch.float32) -> Tensor:
    """Logit bias of each pooled key of `level`: log(real token count), -inf for an empty block.

    Without reweighting (the paper's ablation) the bias is 0 for every non-empty block.
    """
    cnt = level_counts(plan, level, device, dtype)
    if plan.reweight:
        return torch.log(cnt)
    return torch.where(cnt > 0, torch.zeros_like(cnt), torch.full_like(cnt, NEG_INF))


def pad_to_plan(x: Tensor, plan: LLSAPlan) -> Tensor:
    """Zero-pad `[B, H, N, D]` along N to `plan.n_pad`."""
    extra = plan.n_pad - x.shape[2]
    return torch.nn.functional.pad(x, (0, 0, 0, extra)) if extra else x


def pool_pyramid(x: Tensor, plan: LLSAPlan) -> list[Tensor]:
    """Mean-pool a padded `[B, H, N_pad, D]` level by level: returns `[B, H, N_pad / B^l, D]` for l = 1..L.

    Each pooled token is the mean of the *real* tokens of its block (padding is zero and excluded
    from the count), so a ragged tail is not diluted. Differentiable.
    """
    out, cur, cur_cnt = [], x, None
    for lvl in range(1, plan.levels + 1):
        # counts in fp32 (fp64 for fp64 inputs): a half type cannot hold every count up to B^3 exactly
        cnt = level_counts(plan, lvl, x.device, torch.float64 if x.dtype == torch.float64 else torch.float32)
        b, h, n, d = cur.shape
        blocks = cur.view(b, h, n // plan.block, plan.block, d)
        if cur_cnt is not None:  # undo the previous mean so the sum is over fine tokens
            blocks = blocks * cur_cnt.view(-1, plan.block, 1)
        summed = blocks.sum(3)
        cur = (summed / cnt.clamp_min(1).view(-1, 1)).to(x.dtype)
        cur_cnt = cnt
        out.append(cur)
    return out


# ----------------------------------------------------------------------------------------------------
# Hierarchical top-K selection (no gradient)
# ----------------------------------------------------------------------------------------------------

def _gather_blocks(bank: Tensor, blocks: Tensor, bs: int) -> Tensor:
    """`bank [B, H, n, D]` (n a multiple of bs), block ids `[B, H, G, K]` -> rows `[B, H, G, K * bs, D]`."""
    b, h, n, d = bank.shape
    flat = bank.reshape(b * h * (n // bs), bs * d)
    base = (torch.arange(b * h, device=bank.device) * (n // bs)).view(b, h, 1, 1)
    out = flat.index_select(0, (blocks.clamp_min(0) + base).reshape(-1))
    return out.view(b, h, blocks.shape[2], blocks.shape[3] * bs, d)


def _mask_candidates(scores: Tensor, q_ids: Tensor, k_ids: Tensor, ok: Tensor, causal: bool) -> Tensor:
    """Set invalid candidates to -inf and (causal) future blocks to -inf, the diagonal to +inf."""
    scores = scores.masked_fill(~ok, NEG_INF)
    if causal:
        scores = scores.masked_fill(k_ids > q_ids, NEG_INF)
        scores = scores.masked_fill(ok & (k_ids == q_ids), float("inf"))
    return scores


def _topk_ids(scores: Tensor, cand: Tensor, k: int) -> Tensor:
    """Top-k candidates of the last dim (candidate ids `cand`, same shape); -1 where only -inf was left."""
    val, pos = scores.topk(k, dim=-1, sorted=False)
    ids = cand.gather(-1, pos)
    return torch.where(val == NEG_INF, torch.full_like(ids, -1), ids)


def selection_queries(pq: Tensor, plan: LLSAPlan) -> Tensor:
    """The fp32 queries that score keys in the selection of one level, `[B, H, n_l, D]`.

    Non-causal: the pooled queries themselves. Causal: level-`l` token `t` is scored with the pooled query
    of token `t - 1` (which summarises fine positions `[(t-1) B^l, t B^l)`, all before the first query of
    token `t`), and token 0 with zeros (it has nothing to choose: only its own, forced, diagonal block).
    So the blocks chosen for a query depend on no query at or after the block's start.
    """
    q = pq.float()
    if plan.causal:
        q = torch.cat([torch.zeros_like(q[:, :, :1]), q[:, :, :-1]], dim=2)
    return q


@torch.no_grad()
def select_blocks(pq: list[Tensor], pk: list[Tensor], plan: LLSAPlan) -> list[Tensor]:
    """Hierarchical top-K, coarse to fine. Returns `sels[l-1]`: `[B, H, N/B^l, K_l]` int64 key-token ids
    of level `l` kept by each level-`l` query token (-1 = nothing valid to keep).

    The queries are `selection_queries(pq[l-1])` (in causal mode shifted by one token, see there).
    At a finer level the `B` children of one parent share their `K_{l+1} B` candidates, so the candidate
    keys are gathered once per parent (`[B, H, N/B^{l+1}, K_{l+1} B, D]`) and the `B` child queries are
    scored with one batched matmul.

    Cost: dense `(N/B^L)^2` at the top, then `N/B^l x K_{l+1} B` scores per level: O(N) overall; the
    largest transient is the level-1 candidate keys, `N/B^2 x K_2 B x D` values.
    """
    bs, top = plan.block, plan.levels
    sels: list[Tensor | None] = [None] * top
    q, k = selection_queries(pq[top - 1], plan), pk[top - 1].float()
    n_top = plan.level_len(top)
    ids = torch.arange(n_top, device=q.device)
    ok = (level_counts(plan, top, q.device) > 0).expand(n_top, n_top)
    scores = _mask_candidates(q @ k.transpose(-1, -2), ids[:, None], ids[None, :], ok, plan.causal)
    cand = ids.expand(*scores.shape)
    sels[top - 1] = _topk_ids(scores, cand, plan.top_k[top - 1])
    for lvl in range(top - 1, 0, -1):
        q, k = selection_queries(pq[lvl - 1], plan), pk[lvl - 1].float()
        b, h, n_l, d = q.shape
        parent = sels[lvl]                                                  # [B, H, n_l / B, K_{l+1}]
        ok = (parent >= 0).repeat_interleave(bs, dim=-1)
        cand = (parent.clamp_min(0).unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).flatten(-2)
        ok = (ok & (level_counts(plan, lvl, q.device)[cand] > 0)).unsqueeze(-2)   # [B, H, n_l / B, 1, K B]
        keys = _gather_blocks(k, parent, bs)                                # [B, H, n_l / B, K B, D]: per parent
        scores = q.view(b, h, n_l // bs, bs, d) @ keys.transpose(-1, -2)    # [B, H, n_l / B, B, K B]
        q_ids = torch.arange(n_l, device=q.device).view(n_l // bs, bs, 1)
        cand = cand.unsqueeze(-2)
        scores = _mask_candidates(scores, q_ids, cand, ok, plan.causal)
        sel = _topk_ids(scores, cand.expand(*scores.shape), plan.top_k[lvl - 1])
        sels[lvl - 1] = sel.view(b, h, n_l, -1)
    return sels  # type: ignore[return-value]


def index_transpose(sel: Tensor, n_keys: int) -> tuple[Tensor, Tensor]:
    """Query-major top-K lists -> key-major (CSR) lists, without atomics.

    Args:
        sel: `[R, nq, K]` key ids per query row (-1 = empty slot); R = batch x heads.
        n_keys: number of key ids.
    Returns:
        offsets `[R, n_keys + 1]` int32 and query ids `[R, nq * K]` int32: the query rows that selected
        key `j` are `qids[r, offsets[r, j]:offsets[r, j + 1]]`, in increasing order.
    """
    r, nq, k = sel.shape
    flat = sel.reshape(r, nq * k).long()
    key = torch.where(flat >= 0, flat, torch.full_like(flat, n_keys))      # empty slots sort last
    order = torch.argsort(key, dim=1, stable=True)
    qids = (order // k).to(torch.int32)
    counts = torch.zeros(r, n_keys + 1, dtype=torch.int64, device=sel.device)
    counts.scatter_add_(1, key, torch.ones_like(key))
    offsets = torch.zeros(r, n_keys + 1, dtype=torch.int64, device=sel.device)
    offsets[:, 1:] = counts[:, :n_keys].cumsum(1)
    return offsets.to(torch.int32), qids


# ----------------------------------------------------------------------------------------------------
# Attention core
# ----------------------------------------------------------------------------------------------------

@dataclass
class _KeyGroup:
    """Keys shared by `G` groups of `Q` consecutive queries (`G * Q = N_pad`): `keys, values [B, H, G, M, D]`
    (or `[B, H, 1, M, D]` for keys every query shares), additive `bias [B, H, G, M]` (log block weight,
    -inf for an invalid key) and the last fine position each key covers, `last [B|1, H|1, G, M]` (causal rule).
    """

    keys: Tensor
    values: Tensor
    bias: Tensor
    last: Tensor


def _fine_group(k: Tensor, v: Tensor, sel: Tensor, plan: LLSAPlan) -> _KeyGroup:
    """Selected fine key blocks, one set per fine query block (G = N / B, Q = B), weight 1."""
    bs = plan.block
    pos = (sel.clamp_min(0).unsqueeze(-1) * bs + torch.arange(bs, device=k.device)).flatten(-2)
    ok = (sel >= 0).repeat_interleave(bs, dim=-1) & (pos < plan.n)
    bias = torch.where(ok, torch.zeros((), device=k.device, dtype=k.dtype), NEG_INF)
    return _KeyGroup(_gather_blocks(k, sel, bs), _gather_blocks(v, sel, bs), bias, pos)


def _enrich_group(pk: Tensor, pv: Tensor, sel_up: Tensor, lvl: int, plan: LLSAPlan) -> _KeyGroup:
    """Level-`lvl` pooled keys under the `K_{lvl+1}` blocks each level-`lvl+1` query token kept.

    Every fine query under that token shares them, so they are gathered once per group of `B^{lvl+1}`
    queries (G = N / B^{lvl+1}) and scored with one matmul per group, not once per query block.
    """
    bs = plan.block
    tok = (sel_up.clamp_min(0).unsqueeze(-1) * bs + torch.arange(bs, device=pk.device)).flatten(-2)
    ok = (sel_up >= 0).repeat_interleave(bs, dim=-1)
    bias = torch.where(ok, level_log_weights(plan, lvl, pk.device, pk.dtype)[tok], NEG_INF)
    return _KeyGroup(_gather_blocks(pk, sel_up, bs), _gather_blocks(pv, sel_up, bs), bias,
                     (tok + 1) * bs ** lvl - 1)


def _top_group(pk: Tensor, pv: Tensor, plan: LLSAPlan) -> _KeyGroup:
    """Every pooled key of the coarsest level, shared by all queries (G = 1, no gather)."""
    lvl = plan.levels
    bias = level_log_weights(plan, lvl, pk.device, pk.dtype).view(1, 1, 1, -1)
    last = ((torch.arange(plan.level_len(lvl), device=pk.device) + 1) * plan.block ** lvl - 1).view(1, 1, 1, -1)
    return _KeyGroup(pk.unsqueeze(2), pv.unsqueeze(2), bias, last)


def _group_scores(qs: Tensor, g: _KeyGroup, causal: bool) -> Tensor:
    """Scaled scores of queries `qs [B, H, N_pad, D]` against one key group -> `[B, H, N_pad, M]`."""
    b, h, n_pad, d = qs.shape
    n_groups, m = g.keys.shape[2], g.keys.shape[3]
    per = n_pad // n_groups
    bias = g.bias.unsqueeze(-2)                                                 # [., ., G, 1, M]
    if causal:  # a key is visible once the whole block it summarises lies at or before the query
        q_pos = torch.arange(n_pad, device=qs.device).view(n_groups, per, 1)
        bias = bias + torch.where(g.last.unsqueeze(-2) <= q_pos, 0.0, NEG_INF).to(qs.dtype)
    bias = bias.expand(b, h, n_groups, -1, m).reshape(b * h * n_groups, -1, m)
    keys = g.keys.expand(b, h, -1, -1, -1).reshape(b * h * n_groups, m, d)
    scores = torch.baddbmm(bias, qs.reshape(b * h * n_groups, per, d), keys.transpose(1, 2))
    return scores.view(b, h, n_pad, m)


def llsa_core_reference(q: Tensor, k: Tensor, v: Tensor, pks: list[Tensor], pvs: list[Tensor],
                        sels: list[Tensor], plan: LLSAPlan, scale: float, return_lse: bool = False):
    """Sparse attention of padded `q, k, v [B, H, N_pad, D]` given pooled keys/values per level and the
    selection `sels` (from `select_blocks`). Differentiable in q, k, v and every pooled key/value.

    Keys come in groups shared by runs of consecutive queries: the selected fine blocks (per query
    block), the enrichment keys of level l (per level-(l+1) query token: B^{l+1} queries) and the whole
    coarsest level (all queries). Each group is gathered once and scored with batched matmuls; one
    softmax runs over all groups. Memory is O(N (K B + sum_l K B / B^l + N / B^L)), never O(N^2).

    Returns `o [B, H, N_pad, D]` (and the row log-sum-exp `[B, H, N_pad]` float32 with `return_lse`).
    """
    b, h, n_pad, d = q.shape
    groups = [_fine_group(k, v, sels[0], plan)]
    if plan.enrich:
        groups += [_enrich_group(pks[lvl - 1], pvs[lvl - 1], sels[lvl], lvl, plan) for lvl in range(1, plan.levels)]
        groups.append(_top_group(pks[-1], pvs[-1], plan))
    qs = q * scale
    scores = torch.cat([_group_scores(qs, g, plan.causal) for g in groups], dim=-1)
    # Every row has a finite entry (a real key in non-causal mode, the query itself in causal mode,
    # whose diagonal block is always kept), so a plain softmax is safe.
    low = q.dtype in (torch.float16, torch.bfloat16)  # softmax in fp32 for half inputs
    p = torch.softmax(scores, dim=-1, dtype=torch.float32 if low else None).to(q.dtype)
    out, start = None, 0
    for g in groups:
        n_groups, m = g.values.shape[2], g.values.shape[3]
        pg = p[..., start:start + m].reshape(b, h, n_groups, n_pad // n_groups, m)
        part = (pg @ g.values).view(b, h, n_pad, d)                            # values broadcast over B, H
        out = part if out is None else out + part
        start += m
    if return_lse:
        return out, torch.logsumexp(scores.float() if low else scores, dim=-1)
    return out


def llsa_prepare(q: Tensor, k: Tensor, v: Tensor, plan: LLSAPlan):
    """Pad, pool and select: the part shared by every backend.

    Returns padded `(q, k, v)`, pooled `pks`, `pvs` (lists over levels, differentiable) and `sels`.
    Pooled queries only feed the (gradient-free) selection, as in the paper.
    """
    qp, kp, vp = (pad_to_plan(t, plan) for t in (q, k, v))
    pks, pvs = pool_pyramid(kp, plan), pool_pyramid(vp, plan)
    with torch.no_grad():
        pqs = pool_pyramid(qp.detach(), plan)
        sels = select_blocks(pqs, [p.detach() for p in pks], plan)
    return qp, kp, vp, pks, pvs, sels


def llsa_reference(q: Tensor, k: Tensor, v: Tensor, levels: int = 2, block_size: int = 16, top_k=8,
                   causal: bool = False, enrich: bool = True, reweight: bool = True,
                   scale: float | None = None) -> Tensor:
    """LLSA attention of `q, k, v [B, H, N, D]` (any N) in pure PyTorch -> `[B, H, N, D]`.

    Args:
        levels: pooling levels L (1 to 3); the paper uses 1 below 128^2 tokens and 2 above.
        block_size: tokens per block B (power of two; paper: 16).
        top_k: blocks kept per level, one int for all or a list, finest level first (paper: 8).
        causal: mask the future (not in the paper; see the module docstring).
        enrich: add the pooled keys of every level (hierarchical KV enrichment); False gives plain
            hierarchical top-K block attention.
        reweight: add log(block size) to pooled-key logits (the paper's KV reweighting).
        scale: softmax scale, default `D ** -0.5`.
    """
    plan = make_plan(q.shape[2], levels, block_size, top_k, causal, enrich, reweight)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    qp, kp, vp, pks, pvs, sels = llsa_prepare(q, k, v, plan)
    return llsa_core_reference(qp, kp, vp, pks, pvs, sels, plan, scale)[:, :, : q.shape[2]]


__all__ = [
    "LLSAPlan", "make_plan", "validate_llsa_args", "normalize_top_k", "level_counts", "level_log_weights",
    "pad_to_plan", "pool_pyramid", "selection_queries", "select_blocks", "index_transpose",
    "llsa_core_reference", "llsa_prepare", "llsa_reference",
]
