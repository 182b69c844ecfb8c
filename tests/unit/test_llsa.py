"""LLSA reference (pure PyTorch): exactness against dense attention, an independent brute-force oracle at
partial top-K, causality (no output reads a later token), gradients (float64 gradcheck), selection
invariants, padding, index transpose, and the attention module."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokensel.errors import ConfigError
from tokensel.kernels.llsa_reference import (
    index_transpose,
    level_log_weights,
    llsa_core_reference,
    llsa_prepare,
    llsa_reference,
    make_plan,
    pad_to_plan,
    pool_pyramid,
    select_blocks,
)
from tokensel.modules.llsa import DenseAttention, LLSAttention

ALL = 10_000  # a top-K larger than any block count: clamped to "keep every block"


def rand_qkv(n, d=8, b=1, h=2, dtype=torch.float64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=g, dtype=dtype).requires_grad_(grad) for _ in range(3)]


def dense_enriched(q, k, v, plan, scale):
    """Dense attention over every fine key plus every pooled key of every level, each pooled logit
    raised by log(its real token count): what LLSA computes when top-K keeps every block."""
    qp, kp, vp = (pad_to_plan(t, plan) for t in (q, k, v))
    keys = torch.cat([kp, *pool_pyramid(kp, plan)], dim=2)
    vals = torch.cat([vp, *pool_pyramid(vp, plan)], dim=2)
    pos = torch.arange(plan.n_pad)
    bias = [torch.where(pos < plan.n, 0.0, -math.inf).double()]
    last = [pos]
    for lvl in range(1, plan.levels + 1):
        bias.append(level_log_weights(plan, lvl, dtype=torch.float64))
        last.append((torch.arange(plan.level_len(lvl)) + 1) * plan.block ** lvl - 1)
    s = qp @ keys.transpose(-1, -2) * scale + torch.cat(bias).to(q.dtype)
    if plan.causal:
        s = s.masked_fill(torch.cat(last)[None, :] > pos[:, None], -math.inf)
    return (torch.softmax(s, -1) @ vals)[:, :, : plan.n]


@pytest.mark.parametrize("n,levels,block,causal", [(37, 1, 4, False), (37, 2, 4, True), (50, 3, 2, False),
                                                    (61, 3, 2, True), (16, 2, 4, False), (5, 2, 4, True)])
def test_full_topk_without_enrichment_equals_dense_sdpa(n, levels, block, causal):
    q, k, v = rand_qkv(n)
    out = llsa_reference(q, k, v, levels, block, ALL, causal=causal, enrich=False)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("n,levels,block,causal", [(37, 1, 4, False), (45, 2, 4, True), (50, 3, 2, False),
                                                    (61, 3, 2, True)])
def test_full_topk_with_enrichment_equals_dense_over_weighted_pooled_keys(n, levels, block, causal):
    q, k, v = rand_qkv(n)
    plan = make_plan(n, levels, block, ALL, causal)
    out = llsa_reference(q, k, v, levels, block, ALL, causal=causal)
    torch.testing.assert_close(out, dense_enriched(q, k, v, plan, q.shape[-1] ** -0.5), rtol=1e-10, atol=1e-10)


def test_reweighting_is_log_block_size_per_level():
    plan = make_plan(70, levels=3, block_size=2, top_k=2)  # n_pad = 72: the last blocks are ragged
    for lvl in (1, 2, 3):
        lw = level_log_weights(plan, lvl, dtype=torch.float64)
        assert lw[0] == pytest.approx(math.log(2 ** lvl))
        counts = (70 - torch.arange(plan.level_len(lvl)) * 2 ** lvl).clamp(0, 2 ** lvl)
        assert torch.equal(torch.isinf(lw), counts == 0)
    no_rw = make_plan(70, levels=2, block_size=2, top_k=2, reweight=False)
    assert level_log_weights(no_rw, 1)[0] == 0.0


@pytest.mark.parametrize("levels,causal", [(2, False), (3, True)])
def test_gradcheck_end_to_end_float64(levels, causal):
    """Pooling, sparse selection and attention together (selection is piecewise constant)."""
    q, k, v = rand_qkv(27, d=4, h=1, seed=1, grad=True)
    fn = lambda q, k, v: llsa_reference(q, k, v, levels, 2, [2, 2, 2][:levels], causal=causal)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, fast_mode=True)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_core_covers_pooled_keys_of_every_level(causal):
    """Gradcheck the attention core w.r.t. the pooled keys/values of each of 3 levels (the reweighted
    logits), with a fixed sparse selection: the gradient bug suspected in the official L1 kernel (pooled
    dK/dV missing the block weight) would fail here."""
    q, k, v = rand_qkv(13, d=3, h=1, seed=2)  # padded to 16: 8, 4 and 2 pooled tokens, one kept per level
    plan = make_plan(13, levels=3, block_size=2, top_k=1, causal=causal)
    qp, kp, vp, pks, pvs, sels = llsa_prepare(q, k, v, plan)
    assert all((s == -1).sum() < s.numel() for s in sels)
    leaves = [t.detach().clone().requires_grad_() for t in (qp, kp, vp, *pks, *pvs)]

    def fn(qp, kp, vp, pk1, pk2, pk3, pv1, pv2, pv3):
        return llsa_core_reference(qp, kp, vp, [pk1, pk2, pk3], [pv1, pv2, pv3], sels, plan, 0.5)

    assert torch.autograd.gradcheck(fn, tuple(leaves), eps=1e-6, atol=1e-7)  # full Jacobians
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum() + (out ** 2).sum(), leaves[3:])
    assert all(g.abs().sum() > 0 for g in grads), "every pooled level must receive gradient"


def test_selection_is_hierarchical_and_sparse():
    q, k, v = rand_qkv(256, b=2)
    plan = make_plan(256, levels=2, block_size=4, top_k=[3, 2])
    *_, sels = llsa_prepare(q, k, v, plan)
    s1, s2 = sels
    assert s1.shape == (2, 2, 64, 3) and s2.shape == (2, 2, 16, 2)
    parents = s2[:, :, torch.arange(64) // 4]                       # kept level-2 blocks of each parent
    assert ((s1 // 4).unsqueeze(-1) == parents.unsqueeze(-2)).any(-1).all(), "fine blocks must be children"
    assert (s1.sort(-1).values.diff(dim=-1) > 0).all(), "no block selected twice"


def test_causal_selection_keeps_diagonal_and_no_future():
    q, k, v = rand_qkv(100, b=1)
    plan = make_plan(100, levels=2, block_size=4, top_k=[2, 2], causal=True)
    *_, sels = llsa_prepare(q, k, v, plan)
    for lvl, s in enumerate(sels, start=1):
        qi = torch.arange(s.shape[2])[:, None]
        assert ((s == -1) | (s <= qi)).all(), f"level {lvl}: future block selected"
        real = qi[:, 0] * 4 ** lvl < 100  # query blocks holding a real token (the rest is padding)
        assert (s == qi).any(-1)[..., real].all(), f"level {lvl}: diagonal block missing"


def test_ragged_tail_is_padded_not_dropped():
    n = 37  # not a power of two, not a multiple of block**levels = 16
    q, k, v = rand_qkv(n, grad=True)
    out = llsa_reference(q, k, v, levels=2, block_size=4, top_k=[2, 2])
    assert out.shape == q.shape and torch.isfinite(out).all()
    out[:, :, 0].sum().backward()  # the first query still reads the last token (through the pooled keys)
    assert k.grad[:, :, -1].abs().sum() > 0 and v.grad[:, :, -1].abs().sum() > 0
    plan = make_plan(n, 2, 4, 2)
    pooled = pool_pyramid(pad_to_plan(k.detach(), plan), plan)
    torch.testing.assert_close(pooled[0][:, :, 9], k.detach()[:, :, 36])       # a 1-token block: its mean
    torch.testing.assert_close(pooled[1][:, :, 2], k.detach()[:, :, 32:].mean(2))


def test_index_transpose_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    sel = torch.stack([torch.randperm(9, generator=g)[:3] for _ in range(2 * 7)]).view(2, 7, 3)
    sel[0, 2, 1] = -1
    off, qids = index_transpose(sel, 9)
    for r in range(2):
        for key in range(9):
            got = qids[r, off[r, key]:off[r, key + 1]].tolist()
            assert got == [i for i in range(7) if key in sel[r, i].tolist()]


def test_module_dense_and_llsa_share_weights_and_agree_on_full_topk():
    torch.manual_seed(0)
    llsa = LLSAttention(32, 4, levels=2, block_size=4, top_k=ALL, enrich=False, causal=True).double()
    dense = DenseAttention(32, 4, levels=2, block_size=4, top_k=ALL, causal=True).double()
    dense.load_state_dict(llsa.state_dict())
    x = torch.randn(2, 45, 32, dtype=torch.float64)
    torch.testing.assert_close(llsa(x), dense(x))


def test_half_precision_runs():
    q, k, v = rand_qkv(40, dtype=torch.bfloat16)
    out = llsa_reference(q, k, v, levels=2, block_size=4, top_k=2)
    ref = llsa_reference(q.double(), k.double(), v.double(), levels=2, block_size=4, top_k=2)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kwargs,key", [(dict(levels=4), "levels"), (dict(block_size=6), "block_size"),
                                        (dict(top_k=[8]), "top_k"), (dict(top_k=0), "top_k")])
def test_bad_config_raises_config_error(kwargs, key):
    args = dict(dim=32, num_heads=4, levels=2, block_size=4, top_k=8) | kwargs
    with pytest.raises(ConfigError, match=key):
        LLSAttention(**args)


# ----------------------------------------------------------------------------------------------------
# Independent brute-force oracle (written from the algorithm, not from llsa_reference's helpers)
# ----------------------------------------------------------------------------------------------------

def _block_mean(x, level, t, block, n):
    """Mean over the real fine tokens of level-`level` block `t` of `x [n, D]` (None if it has none)."""
    size = block ** level
    lo, hi = t * size, min((t + 1) * size, n)
    return x[lo:hi].mean(0) if hi > lo else None


def brute_selection(q, k, levels, block, top_k, causal):
    """Hierarchical top-K of one head (`q, k [n, D]`), by explicit loops and sorting.

    Returns {(level, t): sorted kept key-block ids}. Level-`l` query token `t` scores level-`l` key
    blocks with its pooled query (causal: the pooled query of token `t - 1`, and its own block `t` is kept
    first); at the coarsest level every real block is a candidate, below only the children of the blocks
    its parent kept; causal mode drops candidates after `t`.
    """
    n = q.shape[0]
    sel = {}
    for lvl in range(levels, 0, -1):
        n_real = math.ceil(n / block ** lvl)
        for t in range(n_real):
            if lvl == levels:
                cands = list(range(n_real))
            else:
                cands = [c * block + r for c in sel[(lvl + 1, t // block)] for r in range(block)]
            cands = [j for j in cands if j < n_real and (not causal or j <= t)]
            if causal:
                query = _block_mean(q, lvl, t - 1, block, n) if t > 0 else None
                forced, cands = [t], [j for j in cands if j != t]
            else:
                query, forced = _block_mean(q, lvl, t, block, n), []
            scored = sorted(cands, key=lambda j: -float(query @ _block_mean(k, lvl, j, block, n)))
            sel[(lvl, t)] = sorted((forced + scored)[: top_k[lvl - 1]])
    return sel


def brute_llsa(q, k, v, levels, block, top_k, causal):
    """LLSA of one head by brute force: the selection above, then for every query an explicit key list
    (fine keys of its kept level-1 blocks; the level-l means under the blocks its level-(l+1) ancestor kept;
    every coarsest-level mean), each mean with logit bias log(its real token count), then a dense softmax."""
    n, d = q.shape
    sel = brute_selection(q, k, levels, block, top_k, causal)
    out = torch.empty_like(q)
    for i in range(n):
        keys, vals, bias = [], [], []
        for blk in sel[(1, i // block)]:
            for j in range(blk * block, min((blk + 1) * block, n)):
                if not causal or j <= i:
                    keys.append(k[j]), vals.append(v[j]), bias.append(0.0)
        pooled = [(lvl, t) for lvl in range(1, levels) for pb in sel[(lvl + 1, i // block ** (lvl + 1))]
                  for t in range(pb * block, (pb + 1) * block)]
        pooled += [(levels, t) for t in range(math.ceil(n / block ** levels))]
        for lvl, t in pooled:
            size = block ** lvl
            count = min(size, n - t * size)
            if count <= 0 or (causal and (t + 1) * size - 1 > i):
                continue
            keys.append(_block_mean(k, lvl, t, block, n)), vals.append(_block_mean(v, lvl, t, block, n))
            bias.append(math.log(count))
        s = torch.stack(keys) @ q[i] * d ** -0.5 + torch.tensor(bias, dtype=q.dtype)
        out[i] = torch.softmax(s, 0) @ torch.stack(vals)
    return out


ORACLE_CASES = [  # (n, levels, block, top_k per level, causal): partial top-K everywhere, mostly ragged
    (64, 2, 4, [2, 2], False), (61, 2, 4, [3, 2], False), (61, 2, 4, [3, 2], True), (70, 3, 2, [2, 2, 2], False),
    (45, 3, 2, [2, 1, 2], True), (37, 1, 4, [3], False), (37, 1, 4, [2], True), (100, 3, 2, [3, 2, 3], True),
]


@pytest.mark.parametrize("n,levels,block,top_k,causal", ORACLE_CASES)
def test_partial_topk_matches_brute_force_oracle(n, levels, block, top_k, causal):
    q, k, v = rand_qkv(n, d=4, seed=n + levels)
    plan = make_plan(n, levels, block, top_k, causal)
    assert all(plan.top_k[lvl] < plan.level_len(lvl + 1) for lvl in range(levels)), "top-K must be partial"
    out = llsa_reference(q, k, v, levels, block, top_k, causal=causal)
    for h in range(q.shape[1]):
        ref = brute_llsa(q[0, h], k[0, h], v[0, h], levels, block, top_k, causal)
        torch.testing.assert_close(out[0, h], ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,levels,block,top_k,causal", ORACLE_CASES + [
    (300, 3, 4, [3, 2, 2], False), (300, 3, 4, [3, 2, 2], True), (256, 2, 16, [3, 2], False)])
def test_selection_is_argmax_k_of_pooled_scores(n, levels, block, top_k, causal):
    """Every level's kept blocks are exactly the top-K (not e.g. bottom-K) of the pooled scores among
    its candidates; checked against the loops above, and on partial top-K so the choice matters."""
    q, k, v = rand_qkv(n, d=8, b=2, seed=7 * n + levels)
    plan = make_plan(n, levels, block, top_k, causal)
    *_, sels = llsa_prepare(q, k, v, plan)
    for b in range(2):
        for h in range(q.shape[1]):
            want = brute_selection(q[b, h], k[b, h], levels, block, top_k, causal)
            for (lvl, t), ids in want.items():
                got = sorted(i for i in sels[lvl - 1][b, h, t].tolist() if i >= 0)
                assert got == ids, f"level {lvl} token {t}: kept {got}, argmax-K is {ids}"


def test_selection_reverses_under_negated_queries():
    """A pure argmax test without the oracle: negating the queries turns top-K into bottom-K, so at the
    coarsest level (all candidates) the two selections are disjoint when 2K <= number of blocks."""
    q, k, v = rand_qkv(256, seed=3)
    plan = make_plan(256, levels=2, block_size=4, top_k=[2, 3])
    pq, pk = pool_pyramid(q, plan), pool_pyramid(k, plan)
    top = select_blocks(pq, pk, plan)[-1]
    bottom = select_blocks([-p for p in pq], pk, plan)[-1]
    scores = pq[-1] @ pk[-1].transpose(-1, -2)
    assert (scores.gather(-1, top).min(-1).values > scores.gather(-1, bottom).max(-1).values).all()


CAUSAL_CASES = [  # (n, levels, block, top_k): lengths that are and are not powers of two
    (37, 1, 4, [2]), (61, 2, 4, [2, 2]), (100, 3, 2, [2, 2, 2]), (256, 2, 4, [2, 2]), (256, 3, 4, [2, 1, 2]),
    (61, 3, 2, [3, 1, 2]),
]


def perturbed_positions(n):
    """Every position for short sequences, a spread including both ends for longer ones."""
    return range(n) if n <= 64 else sorted(set(range(0, n, 7)) | {1, n - 2, n - 1})


def perturb_token(tensors, j, seed):
    """Copies of q, k, v with token j replaced by large random values in all three."""
    g = torch.Generator().manual_seed(seed)
    out = [t.clone() for t in tensors]
    for t in out:
        t[:, :, j] = 5 * torch.randn(t[:, :, j].shape, generator=g, dtype=t.dtype)
    return out


@pytest.mark.parametrize("n,levels,block,top_k", CAUSAL_CASES)
def test_causal_output_is_exactly_independent_of_later_tokens(n, levels, block, top_k):
    """Perturbing token j (its q, k and v) leaves every output i < j bit-for-bit unchanged: neither the
    keys read nor the block selection (pooled queries of a block reach ahead) may see the future."""
    qkv = rand_qkv(n, d=8, seed=n)
    kw = dict(levels=levels, block_size=block, top_k=top_k, causal=True)
    out = llsa_reference(*qkv, **kw)
    for j in perturbed_positions(n):
        out_j = llsa_reference(*perturb_token(qkv, j, seed=j), **kw)
        assert torch.equal(out_j[:, :, :j], out[:, :, :j]), f"an output before {j} read token {j}"
        assert not torch.equal(out_j[:, :, j], out[:, :, j])  # the perturbation does reach token j itself
