"""Weighted per-token loss with an explicit normaliser."""

from __future__ import annotations

from torch import Tensor

NORMALISERS = ("selected", "valid", "global_selected")


def weighted_token_loss(loss: Tensor, weights: Tensor, valid: Tensor, normaliser: str = "selected"
                        ) -> tuple[Tensor, Tensor]:
    """`sum(w * loss) / denom`; returns the loss and the (detached) denominator used.

    Args:
        loss: `[B, T]` per-token loss (0 where not valid).
        weights: `[B, T]` selector weights (already zero where not valid).
        valid: `[B, T]` bool, labelled positions.
        normaliser:
            "selected": total weight of this micro-batch (Rho-1 / ssToken: mean over selected tokens).
            "valid": number of labelled tokens (selection scales the loss down; LLaMA-Factory style).
            "global_selected": total weight summed over data-parallel ranks, divided by world size, so
                DDP's gradient averaging yields sum_{all ranks} w*l / total selected: a 2-process run then
                trains exactly like one process holding both halves.
    A micro-batch that selects nothing gives a zero loss that still has a graph (no division by zero).
    """
    if normaliser not in NORMALISERS:
        raise ValueError(f"normaliser={normaliser!r} must be one of {NORMALISERS}")
    num = (weights * loss).sum()
    if normaliser == "valid":
        denom = valid.sum().to(loss.dtype)
    else:
        denom = weights.sum().detach().to(loss.dtype)
    if normaliser == "global_selected":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            denom = denom.clone()
            dist.all_reduce(denom)
            denom = denom / dist.get_world_size()
    if float(denom) <= 0:
        return num * 0.0, denom
    return num / denom, denom
