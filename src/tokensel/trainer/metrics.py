"""Evaluation means over a whole validation / test set and all ranks, for every module (LM, ViT, DiT).

Each rank feeds its own share of the set (`EvalShard`) into weighted `MeanMetric`s (or `SumMetric`s); at the
stage's end they are reduced over ranks once (torchmetrics syncs sums and weights, so the result is the mean over
every item scored, whatever the split) and reset. Items that only pad a rank's share carry weight 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def eval_metrics(module, stage: str, means: list[str], sums: tuple[str, ...] = ()) -> dict:
    """The stage's metrics by key, made on first use on the module's device (float64 sums where the device has
    them). Every rank must ask for the same keys: they are reduced together, in one order."""
    from torchmetrics.aggregation import MeanMetric, SumMetric

    by_stage = module.__dict__.setdefault("_eval_metrics", {})
    if stage not in by_stage:
        made = {k: MeanMetric() for k in means} | {k: SumMetric() for k in sums}
        for m in made.values():
            m.to(module.device)
            if module.device.type != "mps":
                m.set_dtype(torch.float64)
        by_stage[stage] = made
    return by_stage[stage]


def update_mean(metric, values: Tensor, weight: Tensor | None = None) -> None:
    """Add `values` (any shape) with per-value `weight` (default 1) in the metric's dtype."""
    dtype = metric.mean_value.dtype if hasattr(metric, "mean_value") else metric.sum_value.dtype
    if weight is None:
        metric.update(values.detach().to(dtype))
    else:
        metric.update(values.detach().to(dtype), weight.detach().to(dtype))


def compute_eval_metrics(module, stage: str) -> dict[str, Tensor]:
    """Every metric of the stage reduced over all ranks (float32), then reset; {} when the stage fed none."""
    made = module.__dict__.get("_eval_metrics", {}).get(stage)
    if not made:
        return {}
    values = {k: m.compute().float() for k, m in made.items()}
    for m in made.values():
        m.reset()
    return values
