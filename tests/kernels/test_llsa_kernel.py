"""LLSA Triton kernels against the PyTorch reference: forward, dQ/dK/dV and the pooled dK/dV of every
level, at lengths that are neither powers of two nor block multiples, with empty (-1) selection slots,
many (batch x head) programs, and the split pooled dK/dV loop. Without CUDA they run in the Triton
interpreter (fp32 and fp16; the interpreter mishandles bf16 tl.dot); GPU tests run bf16 and TF32 on CUDA.

Precision: every fp32 test runs with `torch.backends.cuda.matmul.allow_tf32 = False` (the autouse fixture
below), so the kernels' fp32 `tl.dot` is exact ("ieee") and the reference's matmuls are exact too: the
tolerances are fp32 rounding. TF32 has its own CUDA test with tolerances derived from TF32 rounding."""

import os
import types

import pytest
import torch

if not torch.cuda.is_available():  # tests/kernels/conftest.py does the same; kept for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tokensel.kernels import llsa as llsa_mod  # noqa: E402
from tokensel.kernels.llsa import llsa_attention, llsa_core_reference, llsa_core_triton  # noqa: E402
from tokensel.kernels.llsa_reference import llsa_prepare, make_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TF32_U = 2.0 ** -11  # TF32 unit roundoff: 10 explicit mantissa bits, round to nearest


@pytest.fixture(autouse=True)
def exact_fp32():
    """fp32 means fp32 here: no TF32 in the kernels' tl.dot nor in the reference's matmuls."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def run_core(core, plan, q, k, v, do, sels=None):
    """Output and gradients (q, k, v, then pooled k / v of every level) of one core on shared inputs;
    `sels` overrides the selection (so a low-precision run and its fp32 oracle keep the same blocks)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    qp, kp, vp, pks, pvs, own = llsa_prepare(q, k, v, plan)
    sels = own if sels is None else sels
    for p in pks + pvs:
        p.retain_grad()
    o = core(qp, kp, vp, pks, pvs, sels, plan, q.shape[-1] ** -0.5)[:, :, : plan.n]
    (o * do).sum().backward()
    pooled = [p.grad for p in pks + pvs] if plan.enrich else []
    return [o.detach(), q.grad, k.grad, v.grad, *pooled]


def grad_names(levels, enrich):
    return ["o", "dq", "dk", "dv"] + ([f"dpk{i}" for i in range(1, levels + 1)]
                                       + [f"dpv{i}" for i in range(1, levels + 1)]) * enrich


def assert_all_close(tri, ref, names, **tol):
    assert len(tri) == len(ref) == len(names)
    for name, a, b in zip(names, tri, ref):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, name=name: f"{name}: {m}")


CASES = [  # (n, levels, block, top_k, causal, enrich, heads, head_dim)
    pytest.param(37, 1, 4, 3, False, True, 2, 16, id="L1-n37-h2"),
    pytest.param(45, 2, 4, [2, 2], True, True, 1, 16, id="L2-causal-n45"),
    pytest.param(43, 3, 2, [2, 1, 2], False, True, 1, 12, id="L3-n43-d12"),
    pytest.param(37, 3, 2, 2, True, True, 1, 8, id="L3-causal-n37"),
    pytest.param(29, 2, 4, 2, False, False, 1, 8, id="L2-no-enrich-n29"),
    pytest.param(300, 2, 16, [3, 2], True, True, 1, 16, id="L2-block16-tldot-n300"),
]


@pytest.mark.parametrize("n,levels,block,top_k,causal,enrich,h,d", CASES)
def test_triton_matches_reference_fwd_bwd(n, levels, block, top_k, causal, enrich, h, d):
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(1, h, n, d, generator=g).to(DEVICE) for _ in range(4))
    plan = make_plan(n, levels, block, top_k, causal, enrich)
    ref = run_core(llsa_core_reference, plan, q, k, v, do)
    tri = run_core(llsa_core_triton, plan, q, k, v, do)
    assert_all_close(tri, ref, grad_names(levels, enrich), rtol=2e-4, atol=2e-5)


def test_fp32_dot_precision_follows_torch_tf32_switch():
    """The kernels' PRECISION constexpr: exact fp32 unless torch allows TF32 matmuls (as the fused CE)."""
    plan = make_plan(300, 2, 16, 8)
    assert llsa_mod._meta(plan, 64, torch.float32)["PRECISION"] == "ieee"
    # exact fp32 dots run on FMA units: the spill-free tiles of the sm_80 / sm_90 builds
    assert llsa_mod._tiles(plan, llsa_mod._meta(plan, 64, torch.float32)) == (16, {"num_warps": 8})
    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
    assert llsa_mod._meta(plan, 64, torch.float32)["PRECISION"] == "tf32"
    assert llsa_mod._tiles(plan, llsa_mod._meta(plan, 64, torch.float32)) == (16, {})  # 4 warps; BT from n_top
    for dt in (torch.float16, torch.bfloat16):  # ignored by tl.dot for half operands; same value as the fused CE
        assert llsa_mod._meta(plan, 64, dt)["PRECISION"] == "tf32"


def tf32_tolerance(ref: torch.Tensor) -> dict:
    """Bounds for a result whose dots ran on TF32-rounded operands. Each rounded operand pair perturbs a
    product by at most 2u (u = 2^-11); a chain of at most four dependent rounded dots (scores -> p -> dp ->
    dS -> dq/dk) and the softmax's amplification of score errors give the factor 8 relative error, and
    cancellation in a sum is covered by an absolute term at the same relative scale of the largest entry."""
    return dict(rtol=8 * TF32_U, atol=8 * TF32_U * ref.abs().max().item())


def test_tf32_tolerance_covers_tf32_rounded_inputs():
    """A CPU check of the GPU TF32 test's bound: the exact reference on TF32-rounded q, k, v, do (the
    rounding every fp32 tl.dot applies to them on the GPU) stays inside `tf32_tolerance`, with room."""
    def tf32(x):
        bits = x.contiguous().view(torch.int32)
        return ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).view(torch.float32)

    n, levels, block, top_k, d = 300, 2, 16, [3, 2], 16
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(1, 1, n, d, generator=g) for _ in range(4))
    plan = make_plan(n, levels, block, top_k, causal=True)
    sels = llsa_prepare(q, k, v, plan)[-1]
    exact = run_core(llsa_core_reference, plan, *(t.double() for t in (q, k, v, do)), sels=sels)
    rounded = run_core(llsa_core_reference, plan, *(tf32(t).double() for t in (q, k, v, do)), sels=sels)
    for name, a, b in zip(grad_names(levels, True), rounded, exact):
        tol = tf32_tolerance(b)
        assert ((a - b).abs() <= (tol["atol"] + tol["rtol"] * b.abs()) / 2).all(), name  # half the bound


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the interpreter's tl.dot is always exact)")
def test_gpu_fp32_tf32_matches_reference_within_tf32_rounding():
    """With TF32 allowed the fp32 dots run as TF32 on the GPU; the oracle is the float64 reference on the
    same selection, and the bound is `tf32_tolerance` (not fp32's)."""
    n, levels, block, top_k, d = 300, 2, 16, [3, 2], 16
    g = torch.Generator().manual_seed(n)
    q, k, v, do = (torch.randn(1, 2, n, d, generator=g).to(DEVICE) for _ in range(4))
    plan = make_plan(n, levels, block, top_k, causal=True)
    sels = llsa_prepare(q, k, v, plan)[-1]
    ref = run_core(llsa_core_reference, plan, *(t.double() for t in (q, k, v, do)), sels=sels)
    torch.backends.cuda.matmul.allow_tf32 = True  # the fixture restores it
    assert llsa_mod._meta(plan, d, torch.float32)["PRECISION"] == "tf32"
    tri = run_core(llsa_core_triton, plan, q, k, v, do, sels=sels)
    for name, a, b in zip(grad_names(levels, True), tri, ref):
        torch.testing.assert_close(a.double(), b, **tf32_tolerance(b), msg=lambda m, name=name: f"{name}: {m}")


EMPTY_SLOT_CASES = [  # (n, levels, block, top_k, causal, head_dim)
    pytest.param(43, 3, 2, [2, 2, 2], False, 8, id="L3-n43"),
    pytest.param(45, 2, 4, [3, 2], True, 8, id="L2-causal-n45"),
    pytest.param(300, 2, 16, [3, 2], False, 16, id="L2-block16-tldot-n300"),
]


@pytest.mark.parametrize("n,levels,block,top_k,causal,d", EMPTY_SLOT_CASES)
def test_empty_selection_slots_add_nothing(n, levels, block, top_k, causal, d):
    """Rows whose top-K slots are partly -1 at every level (the branch-free kernels load block 0 under a
    false mask there and score it -inf): forward and every gradient equal the reference's."""
    g = torch.Generator().manual_seed(n + 1)
    q, k, v, do = (torch.randn(2, 1, n, d, generator=g).to(DEVICE) for _ in range(4))
    plan = make_plan(n, levels, block, top_k, causal)
    sels = [s.clone() for s in llsa_prepare(q, k, v, plan)[-1]]
    for lvl, s in enumerate(sels):
        drop = torch.rand(s.shape, generator=g).to(s.device) < 0.4
        if lvl == 0 and causal:  # keep each block's own diagonal slot: the first query sees nothing else
            own = torch.arange(s.shape[2], device=s.device).view(1, 1, -1, 1)
            drop &= s != own
        s[drop] = -1
    assert all((s < 0).any() for s in sels) and all((s >= 0).any() for s in sels)
    ref = run_core(llsa_core_reference, plan, q, k, v, do, sels=sels)
    tri = run_core(llsa_core_triton, plan, q, k, v, do, sels=sels)
    assert_all_close(tri, ref, grad_names(levels, True), rtol=2e-4, atol=2e-5)


def test_grid_folds_batch_heads_into_axis_0():
    """CUDA caps grid axes 1 and 2 at 65,535 (axis 0 at 2^31 - 1): a ViT batch of 8192 images x 12 heads
    at 64k tokens, or 70k fine blocks of one head, must stay inside every axis."""
    limits = (2 ** 31 - 1, 65535, 65535)
    for n_tiles, n_bh, n_split in ((65536 // 16, 8192 * 12, 1), (4, 70_000, 32), (70_000, 1, 16), (1, 98_304, 1)):
        grid = llsa_mod._grid(n_tiles, n_bh, n_split)
        assert grid[0] == n_tiles * n_bh and all(g <= lim for g, lim in zip(grid, limits)), grid
    with pytest.raises(ValueError, match="grid"):
        llsa_mod._grid(2 ** 20, 2 ** 12)


def test_many_batch_heads_through_the_folded_grid():
    """70 (batch x head) rows, every kernel (fine, enriched, pooled and top-level dK/dV) decoding its
    (tile, batch x head) from the folded axis 0: equal to the reference per row."""
    g = torch.Generator().manual_seed(70)
    q, k, v, do = (torch.randn(7, 10, 7, 4, generator=g).to(DEVICE) for _ in range(4))
    plan = make_plan(7, 2, 2, [1, 1], causal=True)
    ref = run_core(llsa_core_reference, plan, q, k, v, do)
    tri = run_core(llsa_core_triton, plan, q, k, v, do)
    assert_all_close(tri, ref, grad_names(2, True), rtol=2e-4, atol=2e-5)


def test_pooled_dkv_split_matches_reference(monkeypatch):
    """The level-l pooled dK/dV loop over B^l fine query blocks per listed entry, split over grid axis 1
    into fp32 partials: level 2 at B = 16 splits 16 ways; forced here to one block per split at L = 3."""
    assert llsa_mod._dpkv_splits(16) == (16, 1) and llsa_mod._dpkv_splits(256) == (16, 16)
    monkeypatch.setattr(llsa_mod, "DPKV_ROWS_PER_SPLIT", 1)
    assert llsa_mod._dpkv_splits(4) == (1, 4)
    for causal in (False, True):
        g = torch.Generator().manual_seed(43)
        q, k, v, do = (torch.randn(1, 2, 43, 8, generator=g).to(DEVICE) for _ in range(4))
        plan = make_plan(43, 3, 2, [2, 1, 2], causal)
        ref = run_core(llsa_core_reference, plan, q, k, v, do)
        tri = run_core(llsa_core_triton, plan, q, k, v, do)
        assert_all_close(tri, ref, grad_names(3, True), rtol=2e-4, atol=2e-5)


def test_fp16_matches_fp32_reference():
    """fp16 through tl.dot (block 16) in the interpreter, on the fp32 oracle's selection."""
    g = torch.Generator().manual_seed(3)
    q, k, v, do = (torch.randn(1, 1, 300, 16, generator=g).to(DEVICE) for _ in range(4))
    plan = make_plan(300, 2, 16, [3, 2], causal=True)
    sels = llsa_prepare(q, k, v, plan)[-1]
    ref = run_core(llsa_core_reference, plan, q, k, v, do, sels=sels)
    tri = run_core(llsa_core_triton, plan, *(t.half() for t in (q, k, v, do)), sels=sels)
    for name, a, b in zip(grad_names(2, True), tri, ref):
        assert a.dtype == torch.float16
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 5e-3, f"{name}: relative error {rel:.2e}"


def test_mixed_dtypes_raise_a_clear_error():
    q, k, v = (torch.randn(1, 1, 16, 8) for _ in range(3))
    plan = make_plan(16, 1, 4, 2)
    qp, kp, vp, pks, pvs, sels = llsa_prepare(q, k.half(), v, plan)
    with pytest.raises(TypeError, match="share one dtype"):
        llsa_core_triton(qp, kp, vp, pks, pvs, sels, plan, 8 ** -0.5)


def test_launches_are_guarded_to_the_inputs_device():
    """Triton launches on the current CUDA device: the host code makes it the inputs' device."""
    guard = llsa_mod._on_device(types.SimpleNamespace(device=torch.device("cuda", 1)))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(llsa_mod._on_device(torch.zeros(1)), torch.cuda.device)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_inputs_on_a_non_current_device():
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (torch.randn(1, 2, 300, 16, generator=g).to("cuda:1") for _ in range(4))
    plan = make_plan(300, 2, 16, [3, 2], causal=True)
    assert torch.cuda.current_device() == 0
    ref = run_core(llsa_core_reference, plan, q, k, v, do)
    tri = run_core(llsa_core_triton, plan, q, k, v, do)
    assert_all_close(tri, ref, grad_names(2, True), rtol=2e-4, atol=2e-5)


CAUSAL_CASES = [  # (n, levels, block, top_k, head_dim): tiny fp32 shapes for the interpreter
    pytest.param(37, 1, 4, 2, 8, id="L1-n37"),
    pytest.param(61, 2, 4, [2, 2], 8, id="L2-n61"),
    pytest.param(100, 3, 4, [2, 1, 2], 4, id="L3-n100"),
    pytest.param(256, 2, 8, [2, 2], 4, id="L2-n256"),
    pytest.param(100, 1, 16, 2, 16, id="L1-n100-block16-tldot"),
]


@pytest.mark.parametrize("n,levels,block,top_k,d", CAUSAL_CASES)
def test_triton_causal_output_is_exactly_independent_of_later_tokens(n, levels, block, top_k, d):
    """Through the Triton forward: perturbing token j (q, k and v) leaves outputs i < j bit-for-bit equal."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(1, 1, n, d, generator=g).to(DEVICE) for _ in range(3))
    plan = make_plan(n, levels, block, top_k, causal=True)

    def forward(q, k, v):
        qp, kp, vp, pks, pvs, sels = llsa_prepare(q, k, v, plan)
        return llsa_core_triton(qp, kp, vp, pks, pvs, sels, plan, d ** -0.5)[:, :, :n]

    out = forward(q, k, v)
    for j in sorted({*range(1, n, n // 8), n - 1}):
        q2, k2, v2 = (t.clone() for t in (q, k, v))
        for t in (q2, k2, v2):
            t[:, :, j] = 5 * torch.randn(d, generator=g).to(DEVICE)
        out_j = forward(q2, k2, v2)
        assert torch.equal(out_j[:, :, :j], out[:, :, :j]), f"an output before {j} read token {j}"
        assert not torch.equal(out_j[:, :, j], out[:, :, j])


def test_functional_backend_switch(monkeypatch):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 1, 23, 8, generator=g).to(DEVICE) for _ in range(3))
    kw = dict(levels=2, block_size=4, top_k=2)
    monkeypatch.setenv("TOKENSEL_KERNELS", "triton")
    tri = llsa_attention(q, k, v, **kw)
    monkeypatch.setenv("TOKENSEL_KERNELS", "torch")
    ref = llsa_attention(q, k, v, **kw)
    torch.testing.assert_close(tri, ref, rtol=2e-4, atol=2e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_bf16_paper_shape():
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(1, 2, 4096, 64, generator=g, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    plan = make_plan(4096, 2, 16, 8)
    sels = llsa_prepare(q, k, v, plan)[-1]
    ref = run_core(llsa_core_reference, plan, *(t.float() for t in (q, k, v, do)), sels=sels)
    tri = run_core(llsa_core_triton, plan, q, k, v, do, sels=sels)
    for a, b in zip(tri, ref):
        rel = (a.float() - b).norm() / b.norm()
        assert rel < 2e-2
