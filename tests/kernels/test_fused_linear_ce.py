"""Fused Triton linear + cross-entropy against the chunked pure-torch reference.

Without CUDA the kernels run in the Triton interpreter (conftest.py sets TRITON_INTERPRET=1) at small,
awkward shapes in fp32/fp16 (and bf16: the op upcasts tl.dot operands in the interpreter). With CUDA the
same tests run natively, and the `gpu` tests add bf16 parity at real shapes.

Acceptance rule (CCE's): per element, |ours - gt| <= |torch_same_dtype - gt| + atol * max|gt| + rtol * |gt|,
where gt is the reference on fp32 copies of the inputs and torch_same_dtype the reference in the test dtype.
The rule charges the kernel only for error beyond what torch itself makes in that dtype.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from tokensel.kernels import fused_linear_ce as flce  # noqa: E402  (after conftest set TRITON_INTERPRET)
from tokensel.kernels.fused_linear_ce import (  # noqa: E402
    FusedLinearCrossEntropy,
    FusedLinearCrossEntropyFunction,
    fused_linear_cross_entropy,
)
from tokensel.kernels.reference import linear_cross_entropy as reference  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not flce.INTERPRET:
    pytest.skip("fused_linear_ce was imported before TRITON_INTERPRET=1 was set; no CUDA to run it natively",
                allow_module_level=True)

# (atol as a fraction of max|gt|, rtol), on top of torch's own error in the same dtype
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (1e-3, 1e-2), torch.bfloat16: (1e-2, 5e-2)}
# interpreter: small tiles so a few-dozen-row case still crosses row, vocab and H tile edges
SMALL = dict(block_m=16, block_v=128, block_k=32) if flce.INTERPRET else {}


def make_case(n, h, v, dtype, *, bias=False, ignore_every=0, keep=1.0, soft=False, seed=0):
    """Inputs with logits of std ~2 (a realistic softmax), targets with every `ignore_every`-th row ignored,
    and upstream per-token weights: a `keep` fraction non-zero, soft (random in (0, 1]) or 0/1."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=gen)
    w = torch.randn(v, h, generator=gen) * (2.0 / math.sqrt(h))
    b = torch.randn(v, generator=gen) * 0.5 if bias else None
    t = torch.randint(0, v, (n,), generator=gen)
    if ignore_every:
        t[::ignore_every] = -100
    g = (torch.rand(n, generator=gen) < keep).float()
    if soft:
        g *= torch.rand(n, generator=gen) + 0.01
    cast = lambda a: None if a is None else a.to(DEVICE, dtype)
    return cast(x), cast(w), t.to(DEVICE), cast(b), g.to(DEVICE)


def run(fn, x, w, t, b, g, **kw):
    """(loss, entropy, lse, dX, dW, db) of `sum(g * loss)` through op `fn`, on fresh leaf copies."""
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    b = b.detach().clone().requires_grad_() if b is not None else None
    loss, ent, lse = fn(x, w, t, b, **kw)
    (loss * g).sum().backward()
    return dict(loss=loss, entropy=ent, lse=lse, dx=x.grad, dw=w.grad, db=None if b is None else b.grad)


def ground_truth(x, w, t, b, g, **kw):
    """The reference on fp32 copies (gt) and in the inputs' own dtype (what torch itself achieves)."""
    up = lambda a: None if a is None else a.float()
    return run(reference, up(x), up(w), t, up(b), g, **kw), run(reference, x, w, t, b, g, **kw)


def assert_matches(ours, gt, same, dtype, keys=("loss", "entropy", "lse", "dx", "dw", "db")):
    atol, rtol = TOL[dtype]
    for k in keys:
        if gt[k] is None:
            assert ours[k] is None, k
            continue
        o, r, s = ours[k].float(), gt[k].float(), same[k].float()
        assert o.shape == r.shape and ours[k].dtype == same[k].dtype, (k, o.shape, r.shape, ours[k].dtype)
        bound = (s - r).abs() + atol * r.abs().max().clamp_min(1e-30) + rtol * r.abs()
        excess = ((o - r).abs() - bound).max().item()
        worst = (o - r).abs().max().item()
        assert excess <= 0, f"{k} ({dtype}): max |ours - gt| = {worst:.3e}, over the bound by {excess:.3e}"


CASES = {  # name: (N, H, V, options for make_case, options for the op)
    "n1": (1, 32, 1000, dict(), dict()),
    "odd_bias_ignored_soft": (37, 48, 1001, dict(bias=True, ignore_every=5, keep=0.7, soft=True), dict()),
    "softcap": (19, 40, 1000, dict(bias=True, keep=0.6), dict(softcap=4.0)),
    "splits_chunks": (33, 64, 1001, dict(ignore_every=7), dict(num_splits=3, chunk_size=8)),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(CASES))
def test_parity_with_reference(case, dtype):
    n, h, v, make_kw, op_kw = CASES[case]
    x, w, t, b, g = make_case(n, h, v, dtype, **make_kw)
    softcap = op_kw.get("softcap")
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL, **op_kw)
    gt, same = ground_truth(x, w, t, b, g, softcap=softcap)
    assert_matches(ours, gt, same, dtype)
    assert not ours["entropy"].requires_grad and not ours["lse"].requires_grad and ours["loss"].requires_grad
    assert FusedLinearCrossEntropyFunction.last_backward_rows == int(((g != 0) & (t != -100)).sum())


def test_bf16_parity_small():
    """bf16 also works off-GPU: the op casts tl.dot operands to fp32 in the interpreter."""
    x, w, t, b, g = make_case(21, 48, 1001, torch.bfloat16, bias=True, ignore_every=4, keep=0.6)
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL)
    assert_matches(ours, *ground_truth(x, w, t, b, g), torch.bfloat16)


def test_fp16_normalised_weights_do_not_underflow():
    """Weights of 1/16384 (a mean over many tokens) times softmax probabilities underflow fp16 dlogits; the op
    rescales by max|g| first. Without it dX is ~8x and dW ~4x less accurate than below (measured)."""
    x, w, t, _, g = make_case(40, 64, 1001, torch.float16)
    g = g / 16384
    ours = run(fused_linear_cross_entropy, x, w, t, None, g, **SMALL)
    gt, _ = ground_truth(x, w, t, None, g)
    for k, tol in (("dx", 2e-3), ("dw", 1e-3)):
        rel = ((ours[k].float() - gt[k]).abs().max() / gt[k].abs().max()).item()
        assert rel < tol, (k, rel)


def test_all_rows_ignored():
    x, w, t, _, g = make_case(20, 32, 1000, torch.float32)
    t[:] = -100
    ours = run(fused_linear_cross_entropy, x, w, t, None, g, **SMALL)
    assert torch.equal(ours["loss"], torch.zeros_like(ours["loss"]))
    assert torch.count_nonzero(ours["dx"]) == 0 and torch.count_nonzero(ours["dw"]) == 0
    assert FusedLinearCrossEntropyFunction.last_backward_rows == 0
    assert FusedLinearCrossEntropyFunction.last_backward_programs == 0
    assert_matches(ours, *ground_truth(x, w, t, None, g), torch.float32, keys=("entropy", "lse"))


def test_all_zero_weight_matrix():
    """W = 0: every logit is 0, so lse = entropy = loss = log V, dX = 0 and dW = (1/V - onehot)^T X."""
    v = 1001
    x, w, t, b, g = make_case(18, 32, v, torch.float32, bias=False, keep=1.0)
    w = torch.zeros_like(w)
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL)
    log_v = torch.full_like(ours["lse"], math.log(v))
    for k in ("loss", "entropy", "lse"):
        torch.testing.assert_close(ours[k], log_v, rtol=1e-6, atol=1e-5)
    assert torch.count_nonzero(ours["dx"]) == 0
    assert_matches(ours, *ground_truth(x, w, t, b, g), torch.float32)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy (the interpreter) warns about the NaN rows
def test_zero_weight_rows_contribute_exactly_nothing():
    """Rows with weight 0 are never visited: make their hidden states NaN and the gradients stay finite,
    dX of those rows is exactly 0, dW equals the reference on the kept rows alone, and the counters say
    how many rows and programs the backward used."""
    n, h, v = 40, 32, 1000
    x, w, t, _, g = make_case(n, h, v, torch.float32, keep=0.4, soft=True, seed=3)
    dropped = g == 0
    x = x.clone()
    x[dropped] = float("nan")
    ours = run(fused_linear_cross_entropy, x, w, t, None, g, **SMALL)
    assert torch.isnan(ours["loss"][dropped]).all()  # the forward did see the NaNs...
    assert torch.equal(ours["dx"][dropped], torch.zeros_like(ours["dx"][dropped]))  # ...the backward did not
    assert torch.isfinite(ours["dw"]).all() and torch.isfinite(ours["dx"]).all()

    kept = ~dropped
    k = int(kept.sum())
    gt = run(reference, x[kept], w, t[kept], None, g[kept])
    torch.testing.assert_close(ours["dx"][kept], gt["dx"], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours["dw"], gt["dw"], rtol=1e-4, atol=1e-6)
    assert FusedLinearCrossEntropyFunction.last_backward_rows == k
    bm, bv = (SMALL or flce._config(x.dtype, {}))["block_m"], (SMALL or flce._config(x.dtype, {}))["block_v"]
    assert FusedLinearCrossEntropyFunction.last_backward_programs == math.ceil(k / bm) * math.ceil(v / bv)


def test_all_zero_gradient_launches_nothing():
    x, w, t, b, g = make_case(24, 32, 1000, torch.float32, bias=True)
    ours = run(fused_linear_cross_entropy, x, w, t, b, torch.zeros_like(g), **SMALL)
    assert FusedLinearCrossEntropyFunction.last_backward_rows == 0
    assert FusedLinearCrossEntropyFunction.last_backward_programs == 0
    for k in ("dx", "dw", "db"):
        assert torch.count_nonzero(ours[k]) == 0, k


def test_backward_work_scales_with_kept_rows():
    """Programs launched by the backward fall with the keep ratio (the forward is the same for all)."""
    n, h, v = 64, 32, 1000
    programs = {}
    for keep in (1.0, 0.5, 0.25):
        x, w, t, _, _ = make_case(n, h, v, torch.float32, seed=5)
        g = torch.zeros(n, device=DEVICE)
        g[: int(n * keep)] = 1.0
        run(fused_linear_cross_entropy, x, w, t, None, g, block_m=16, block_v=128, block_k=32)
        assert FusedLinearCrossEntropyFunction.last_backward_rows == int(n * keep)
        programs[keep] = FusedLinearCrossEntropyFunction.last_backward_programs
    assert programs[1.0] == 2 * programs[0.5] == 4 * programs[0.25]


def test_tied_embeddings():
    """One matrix as input embedding and LM head: both gradient paths add up as in the reference."""
    v, h, n = 1000, 32, 17
    gen = torch.Generator().manual_seed(7)
    emb0 = (torch.randn(v, h, generator=gen) * 0.3).to(DEVICE)
    ids = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    t = torch.randint(0, v, (n,), generator=gen).to(DEVICE)
    grads = []
    for fn, kw in ((fused_linear_cross_entropy, SMALL), (reference, {})):
        emb = emb0.clone().requires_grad_()
        hidden = torch.tanh(torch.nn.functional.embedding(ids, emb) * 2.0)
        loss, _, _ = fn(hidden, emb, t, **kw)
        loss.mean().backward()
        grads.append(emb.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_module_functional_and_switch_agree(monkeypatch):
    from tokensel.kernels import linear_cross_entropy

    monkeypatch.delenv("TOKENSEL_KERNELS", raising=False)
    x, w, t, b, _ = make_case(9, 32, 1000, torch.float32, bias=True)
    head = FusedLinearCrossEntropy(softcap=10.0, **SMALL)
    assert "softcap=10.0" in repr(head)
    with torch.no_grad():
        a = head(x, w, t, b)
        c = fused_linear_cross_entropy(x, w, t, b, softcap=10.0, **SMALL)
        d = linear_cross_entropy(x, w, t, b, softcap=10.0, backend="triton", **SMALL)
    for u, y, z in zip(a, c, d):
        assert torch.equal(u, y) and torch.equal(u, z)


def test_autocast_runs_the_head_in_the_autocast_dtype():
    """Like `hidden @ weight.T` under autocast: fp32 leaves, 16-bit head, fp32 gradients back to the leaves."""
    x, w, t, _, g = make_case(12, 32, 1000, torch.float32, keep=0.5)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ours = run(fused_linear_cross_entropy, x, w, t, None, g, **SMALL)
    assert ours["dx"].dtype == ours["dw"].dtype == torch.float32
    bf = lambda a: a.to(torch.bfloat16)
    expect = run(fused_linear_cross_entropy, bf(x), bf(w), t, None, g, **SMALL)
    for k in ("loss", "entropy", "lse", "dx", "dw"):
        torch.testing.assert_close(ours[k], expect[k].float(), rtol=0, atol=0)


def test_bad_inputs_have_clear_errors():
    x, w, t, _, _ = make_case(4, 32, 1000, torch.float32)
    with pytest.raises(ValueError, match=r"\[N, H\] and \[V, H\]"):
        fused_linear_cross_entropy(x, w[:, :16], t)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_cross_entropy(x, w, t[:3])
    with pytest.raises(TypeError, match="cast one"):
        fused_linear_cross_entropy(x.half(), w, t)
    with pytest.raises(TypeError, match="unknown option"):
        fused_linear_cross_entropy(x, w, t, block_n=64)
    with pytest.raises(ValueError, match="power of 2"):
        fused_linear_cross_entropy(x, w, t, block_v=100)


# ------------------------------------------------------------- grid order, vocabulary slicing, fallbacks

# (num_splits, vocab_chunk, group_m, chunk_size) at V=1001 with 128-wide tiles (8 vocab blocks, the last one
# 105 columns wide): vocab_chunk 384 leaves a partial last slice, 1000 rounds up to one 1024-wide slice, 128 is
# one block per slice; chunk_size 8 makes several row chunks (dW then accumulates across them)
SLICING = [(1, None, 8, None), (2, 384, 1, None), (5, 128, 3, None), (8, 1000, 2, 8), (3, 256, 8, 8)]


@pytest.mark.parametrize("splits,vocab_chunk,group_m,chunk_size", SLICING,
                         ids=[f"s{a}-vc{b}-g{c}-r{d}" for a, b, c, d in SLICING])
def test_splits_slices_and_groups_match_reference(splits, vocab_chunk, group_m, chunk_size):
    """Forward split counts and backward vocabulary slices / swizzle groups / row chunks change no result:
    bias, softcap, ignored targets and soft per-token weights with zeros, at shapes off every tile edge."""
    x, w, t, b, g = make_case(45, 40, 1001, torch.float32, bias=True, ignore_every=6, keep=0.6, soft=True, seed=11)
    opts = dict(SMALL, num_splits=splits, vocab_chunk=vocab_chunk, group_m=group_m, chunk_size=chunk_size)
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, softcap=9.0, **opts)
    assert_matches(ours, *ground_truth(x, w, t, b, g, softcap=9.0), torch.float32)
    k = int(((g != 0) & (t != -100)).sum())
    assert FusedLinearCrossEntropyFunction.last_backward_rows == k
    if chunk_size is None:  # the slices tile the vocabulary exactly: as many programs as one [k, V] pass
        assert FusedLinearCrossEntropyFunction.last_backward_programs == math.ceil(k / 16) * math.ceil(1001 / 128)


def test_swizzle_group_and_grid_order_are_bit_exact():
    """The dlogits swizzle only reorders programs: gradients are bit-identical across group sizes."""
    x, w, t, b, g = make_case(50, 32, 700, torch.float32, bias=True, keep=0.7, soft=True, seed=4)
    outs = [run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL, vocab_chunk=256, group_m=gm)
            for gm in (1, 2, 3, 64)]
    for o in outs[1:]:
        for key in ("loss", "entropy", "lse", "dx", "dw", "db"):
            assert torch.equal(o[key], outs[0][key]), key


def test_fp16_slices_and_row_chunks():
    """fp16: the pre-scaled dlogits, the sliced dW GEMMs (written in fp16) and the fp32 dX accumulator."""
    x, w, t, b, g = make_case(37, 48, 1001, torch.float16, bias=True, ignore_every=5, keep=0.7, soft=True)
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL, vocab_chunk=384, chunk_size=16, num_splits=4)
    assert_matches(ours, *ground_truth(x, w, t, b, g), torch.float16)


def test_default_splits_keep_x_in_l2():
    """On a GPU the forward uses >= 16 vocabulary splits (programs in flight: all splits of a few row blocks),
    enough programs for two waves, and never more splits than vocabulary blocks."""
    assert flce._default_splits(128, 1002, 132) == flce.MIN_SPLITS  # N=16k, V=128k, H100/H200
    assert flce._default_splits(8, 1002, 132) == 33  # small N: fill the GPU twice
    assert flce._default_splits(128, 5, 132) == 5
    assert flce._num_splits(128, 1002, torch.device("cpu"), None) == 1
    assert flce._num_splits(128, 1002, torch.device("cpu"), 4000) == 1002


def test_entropy_is_accurate_at_large_logits():
    """Entropy from sum e (z - m): no cancellation against |z| (logits offset by a bias of ~60 here), checked
    against a float64 ground truth."""
    x, w, t, b, _ = make_case(40, 32, 1001, torch.float32, bias=True, seed=9)
    b = b + 60.0
    with torch.no_grad():
        _, ent, _ = fused_linear_cross_entropy(x, w, t, b, **SMALL, num_splits=3)
        z = x.double() @ w.double().t() + b.double()
        logp = torch.log_softmax(z, -1)
        gt = -(logp.exp() * logp).sum(-1)
    err = (ent.double() - gt).abs().max().item()
    assert err < 5e-6, err  # 2.0e-6 in the interpreter; the unshifted sum e*z gave 1.1e-5 here


@pytest.fixture
def fresh_mm_mode(monkeypatch):
    """An empty probe cache, restored afterwards (other tests keep the real probe's answer)."""
    monkeypatch.setattr(flce, "_MM_MODE", {})
    return monkeypatch


def _fake_fp32_out(monkeypatch, addmm_ok: bool, mm_ok: bool):
    """torch.addmm / torch.mm whose `out_dtype=` form works (emulated in fp32) or raises, as on some builds."""
    real_addmm, real_mm = torch.addmm, torch.mm

    def addmm(acc, a, b, *args, out_dtype=None, out=None, **kw):
        if out_dtype is None:
            return real_addmm(acc, a, b, *args, **kw, **({} if out is None else dict(out=out)))
        if not addmm_ok:
            raise RuntimeError("self and mat2 must have the same dtype")
        return out.copy_(acc + a.float() @ b.float())

    def mm(a, b, *args, out_dtype=None, **kw):
        if out_dtype is None:
            return real_mm(a, b, *args, **kw)
        if not mm_ok:
            raise RuntimeError("mm: out_dtype not supported")
        return a.float() @ b.float()

    monkeypatch.setattr(torch, "addmm", addmm)
    monkeypatch.setattr(torch, "mm", mm)


@pytest.mark.parametrize("addmm_ok,mm_ok,mode", [(True, False, "addmm"), (False, True, "mm"), (False, False, "lowp")])
def test_fp32_output_matmul_fallback_warns_once(fresh_mm_mode, caplog, addmm_ok, mm_ok, mode):
    """The dX accumulation probes `addmm(out_dtype=float32)` once; when it is missing it logs one warning,
    takes a fast path (never fp32 copies of the operands) and the gradients stay right."""
    _fake_fp32_out(fresh_mm_mode, addmm_ok, mm_ok)
    x, w, t, b, g = make_case(29, 32, 1001, torch.float16, bias=True, keep=0.7, soft=True, seed=2)
    gt, same = ground_truth(x, w, t, b, g)
    with caplog.at_level("WARNING", logger=flce.__name__):
        for _ in range(2):
            ours = run(fused_linear_cross_entropy, x, w, t, b, g, **SMALL, vocab_chunk=384)
            assert_matches(ours, gt, same, torch.float16)
    assert flce._MM_MODE == {(torch.device(DEVICE).type, torch.float16): mode}
    warnings = [r for r in caplog.records if "out_dtype=float32" in r.getMessage()]
    assert len(warnings) == (0 if mode == "addmm" else 1), [r.getMessage() for r in warnings]


def test_tile_table_and_overrides():
    """The tuned-tile table (unmeasured: today's default everywhere), `tiles=` by name, and single overrides."""
    for dt in (torch.bfloat16, torch.float16, torch.float32):
        assert flce._table_tiles(dt, 4096) in flce.TILE_CANDIDATES
    assert flce._table_tiles(torch.bfloat16, 4096) == "128x128x64_w8_s3"
    cfg = flce._config(torch.bfloat16, dict(tiles="128x256x64_w8_s3", num_stages=4), 4096)
    assert (cfg["block_m"], cfg["block_v"], cfg["num_stages"]) == (128, 256, 4)
    with pytest.raises(ValueError, match="known"):
        flce._config(torch.bfloat16, dict(tiles="256x256"))
    with pytest.raises(ValueError, match="group_m"):
        flce._config(torch.bfloat16, dict(group_m=0))


def test_fp32_refuses_64_deep_tiles_on_gpu(monkeypatch):
    """fp32 with block_k 64 exceeds the GPU's shared memory (tests/kernels/test_aot_compile.py measured it)."""
    monkeypatch.setattr(flce, "INTERPRET", False)
    assert flce._config(torch.float32, {}, 4096)["block_k"] == 32
    with pytest.raises(ValueError, match="fp32 inputs need block_k <= 32"):
        flce._config(torch.float32, dict(tiles="128x128x64_w8_s3"), 4096)
    assert flce._config(torch.bfloat16, dict(tiles="128x128x64_w8_s3"), 4096)["block_k"] == 64


# --------------------------------------------------------------------------------------------- GPU only

gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("n,h,v,softcap", [(4096, 2048, 32000, None), (2048, 4096, 128256, None),
                                           (1000, 2048, 32001, 30.0)])
def test_gpu_bf16_parity_real_shapes(n, h, v, softcap):
    x, w, t, b, g = make_case(n, h, v, torch.bfloat16, bias=softcap is not None, ignore_every=10, keep=0.6,
                              soft=True)
    ours = run(fused_linear_cross_entropy, x, w, t, b, g, softcap=softcap)
    assert_matches(ours, *ground_truth(x, w, t, b, g, softcap=softcap), torch.bfloat16)


@pytest.mark.gpu
@gpu
def test_gpu_forward_never_materialises_logits():
    n, h, v = 4096, 1024, 128256
    x, w, t, _, _ = make_case(n, h, v, torch.bfloat16)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        fused_linear_cross_entropy(x, w, t)
    extra = torch.cuda.max_memory_allocated() - base
    logits = n * v * 2
    assert extra < logits / 64, f"forward used {extra / 2**20:.1f} MiB extra; the logits are {logits / 2**20:.0f} MiB"
