"""Pure-PyTorch reference ops: the CPU path and the oracle every Triton kernel is tested against.

`linear_cross_entropy` is the LM head of the spine. It returns, per token, the cross-entropy loss
(differentiable), the entropy of the predictive distribution and the log-sum-exp (both detached),
without ever holding the full `[N, V]` logits: rows are processed `chunk_size` at a time, and the
backward recomputes each chunk's logits instead of saving them.

The backward receives the per-token upstream gradient. Token selection reaches the op this way
(`loss = sum(w * l) / n` gives `grad_l = w / n`), so rows whose gradient is exactly zero are dropped
before any logits are recomputed: keeping 60% of tokens costs ~60% of the head's backward matmuls.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

DEFAULT_CHUNK = 2048


def _logits(h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None) -> Tensor:
    """fp32 logits of one chunk of rows, with optional tanh soft-capping (Gemma-2 style)."""
    z = (h @ weight.t()).float()
    if bias is not None:
        z = z + bias.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z


def _chunk_stats(z: Tensor, t: Tensor, ignore_index: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, entropy, lse) of fp32 logits `z` [n, V] for targets `t` [n]."""
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse[:, None])
    entropy = lse - (p * z).sum(-1)
    valid = t != ignore_index
    tgt = z.gather(1, t.clamp_min(0)[:, None]).squeeze(1)
    loss = torch.where(valid, lse - tgt, torch.zeros_like(lse))
    return loss, entropy, lse


def linear_cross_entropy_forward(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None,
                                 chunk_size=DEFAULT_CHUNK):
    """No-grad forward: (loss [N], entropy [N], lse [N]) in fp32, `chunk_size` rows at a time."""
    n = hidden.shape[0]
    out = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            z = _logits(hidden[s:e], weight, bias, softcap)
            out[0, s:e], out[1, s:e], out[2, s:e] = _chunk_stats(z, targets[s:e], ignore_index)
    return out[0], out[1], out[2]


def linear_cross_entropy_backward(grad_loss, hidden, weight, targets, lse, bias=None, ignore_index=-100,
                                  softcap=None, chunk_size=DEFAULT_CHUNK, need_weight_grad=True):
    """Gradients (dX, dW, db) for upstream `grad_loss` [N]; only rows with a non-zero gradient are recomputed.

    d loss_i / d z_i = softmax(z_i) - onehot(t_i); with softcap, chained through `c * tanh(z / c)`.
    Returns the number of rows visited as a fourth value (tests count it).
    """
    grad_loss = grad_loss.float()
    active = ((grad_loss != 0) & (targets != ignore_index)).nonzero().squeeze(1)
    dx = torch.zeros_like(hidden)
    dw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight_grad else None
    db = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if bias is not None else None
    for s in range(0, active.numel(), chunk_size):
        rows = active[s:s + chunk_size]
        h, t, g = hidden[rows], targets[rows], grad_loss[rows]
        raw = (h @ weight.t()).float() + (bias.float() if bias is not None else 0)
        z = softcap * torch.tanh(raw / softcap) if softcap is not None else raw
        dz = torch.exp(z - lse[rows, None])
        dz[torch.arange(rows.numel(), device=dz.device), t] -= 1.0
        dz *= g[:, None]
        if softcap is not None:
            dz *= 1.0 - (z / softcap) ** 2
        dx[rows] = (dz.to(weight.dtype) @ weight).to(hidden.dtype)
        if dw is not None:
            dw += dz.t() @ h.float()
        if db is not None:
            db += dz.sum(0)
    return dx, dw, db, int(active.numel())


class LinearCrossEntropyFunction(torch.autograd.Function):
    """autograd wrapper of the chunked reference: saves only hidden, targets and lse (no logits)."""

    last_backward_rows = 0  # rows recomputed by the latest backward; a test and the benchmarks read it

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, ignore_index, softcap, chunk_size):
        loss, entropy, lse = linear_cross_entropy_forward(hidden, weight, targets, bias, ignore_index, softcap,
                                                          chunk_size)
        ctx.save_for_backward(hidden, weight, targets, bias, lse)
        ctx.cfg = (ignore_index, softcap, chunk_size)
        ctx.mark_non_differentiable(entropy, lse)
        return loss, entropy, lse

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy, _grad_lse):
        hidden, weight, targets, bias, lse = ctx.saved_tensors
        ignore_index, softcap, chunk_size = ctx.cfg
        dx, dw, db, rows = linear_cross_entropy_backward(
            grad_loss, hidden, weight, targets, lse, bias, ignore_index, softcap, chunk_size,
            need_weight_grad=ctx.needs_input_grad[1])
        LinearCrossEntropyFunction.last_backward_rows = rows
        dw = dw.to(weight.dtype) if dw is not None else None
        db = db.to(bias.dtype) if db is not None else None
        return dx if ctx.needs_input_grad[0] else None, dw, None, db, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None,
                         ignore_index: int = -100, softcap: float | None = None,
                         chunk_size: int = DEFAULT_CHUNK) -> tuple[Tensor, Tensor, Tensor]:
    """Chunked linear + cross-entropy.

    Args:
        hidden: `[N, H]` final hidden states.
        weight: `[V, H]` LM-head weight (tied embeddings work: pass the embedding matrix).
        targets: `[N]` token ids; `ignore_index` rows get loss 0 and no gradient.
        bias: optional `[V]`.
        softcap: optional logit soft-cap `c * tanh(z / c)`.
    Returns:
        `(loss [N], entropy [N], lse [N])`, fp32. Only `loss` carries a gradient.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be [N, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: targets {tuple(targets.shape)} must be [N={hidden.shape[0]}]")
    return LinearCrossEntropyFunction.apply(hidden, weight, targets, bias, ignore_index, softcap, chunk_size)


def naive_linear_cross_entropy(hidden, weight, targets, bias=None, ignore_index=-100, softcap=None):
    """The plain definition (full fp32 logits in memory): the oracle for tests and the benchmark baseline."""
    z = _logits(hidden, weight, bias, softcap)
    loss = F.cross_entropy(z, targets, ignore_index=ignore_index, reduction="none")
    logp = torch.log_softmax(z, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    return loss, entropy.detach(), torch.logsumexp(z, -1).detach()
