"""The chunked per-token linear-CE op against the plain definition: values and gradients."""

import pytest
import torch
import torch.nn.functional as F

from tokensel.kernels.reference import LinearCrossEntropyFunction, linear_cross_entropy, naive_linear_cross_entropy


def _case(n, h, v, seed=0, dtype=torch.float64, ignore_frac=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, h, generator=g, dtype=dtype)
    w = torch.randn(v, h, generator=g, dtype=dtype) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    t[torch.rand(n, generator=g) < ignore_frac] = -100
    return x, w, t


@pytest.mark.parametrize("n,h,v,chunk", [(1, 3, 5, 4), (7, 5, 11, 3), (33, 8, 101, 8), (64, 16, 1001, 17)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_matches_full_softmax_values_and_grads(n, h, v, chunk, softcap):
    x, w, t = _case(n, h, v)
    b = torch.randn(v, dtype=x.dtype)
    upstream = torch.rand(n, dtype=torch.float32)
    upstream[::3] = 0.0  # unselected rows
    xr, wr, br = (a.clone().requires_grad_() for a in (x, w, b))
    loss, ent, lse = linear_cross_entropy(xr, wr, t, bias=br, softcap=softcap, chunk_size=chunk)
    (loss * upstream).sum().backward()

    xn, wn, bn = (a.clone().requires_grad_() for a in (x, w, b))
    z = xn @ wn.t() + bn
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    ref = F.cross_entropy(z, t, ignore_index=-100, reduction="none")
    p = torch.softmax(z, -1)
    ref_ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    (ref * upstream.double()).sum().backward()

    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ent.double(), ref_ent.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1).detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xr.grad, xn.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wr.grad, wn.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(br.grad, bn.grad, rtol=1e-5, atol=1e-6)
    assert (loss[t == -100] == 0).all()


def test_fp32_matches_naive_and_skips_zero_rows():
    x, w, t = _case(50, 12, 300, dtype=torch.float32, ignore_frac=0.0)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, _ = linear_cross_entropy(xr, wr, t, chunk_size=16)
    ref, _, _ = naive_linear_cross_entropy(x, w, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-5)
    keep = torch.zeros(50)
    keep[[3, 10, 11, 40]] = 1.0
    (loss * keep).sum().backward()
    assert LinearCrossEntropyFunction.last_backward_rows == 4  # only kept rows recomputed
    assert xr.grad[keep == 0].abs().max() == 0  # unselected rows get exactly zero gradient
    # dW equals the gradient from the kept rows alone
    wk = w.clone().requires_grad_()
    lk, _, _ = linear_cross_entropy(x[keep == 1], wk, t[keep == 1])
    lk.sum().backward()
    torch.testing.assert_close(wr.grad, wk.grad, rtol=1e-5, atol=1e-6)


def test_all_zero_grad_and_all_ignored():
    x, w, t = _case(9, 4, 13, dtype=torch.float32)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss, _, _ = linear_cross_entropy(xr, wr, torch.full_like(t, -100))
    assert (loss == 0).all()
    (loss * 1.0).sum().backward()
    assert LinearCrossEntropyFunction.last_backward_rows == 0
    assert xr.grad.abs().sum() == 0 and wr.grad.abs().sum() == 0


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"must be \[N, H\] and \[V, H\]"):
        linear_cross_entropy(torch.zeros(3, 4), torch.zeros(5, 3), torch.zeros(3, dtype=torch.long))
