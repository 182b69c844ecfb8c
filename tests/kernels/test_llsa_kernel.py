"""LLSA Triton kernels against the PyTorch reference: forward, dQ/dK/dV and the pooled dK/dV of every
level, at lengths that are neither powers of two nor block multiples. Without CUDA they run in the
Triton interpreter (fp32; the interpreter mishandles bf16 tl.dot); a GPU test runs bf16 on CUDA."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # tests/kernels/conftest.py does the same; kept for running this file alone
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from tokensel.kernels.llsa import llsa_attention, llsa_core_reference, llsa_core_triton  # noqa: E402
from tokensel.kernels.llsa_reference import llsa_prepare, make_plan  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


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
    names = ["o", "dq", "dk", "dv"] + [f"dpk{i}" for i in range(1, levels + 1)] * enrich \
        + [f"dpv{i}" for i in range(1, levels + 1)] * enrich
    for name, a, b in zip(names, tri, ref):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=2e-5, msg=lambda m, name=name: f"{name}: {m}")


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
