"""Controls every method must beat: all tokens, and a seeded random subset at the same keep ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats


class FullSelection(TokenSelector):
    """Train on every labelled token (plain SFT / CLM)."""

    needs = frozenset()

    def select(self, stats: TokenStats) -> Tensor:
        return stats.valid.float()


class RandomSelection(TokenSelector):
    """Keep a uniformly random `ceil(k * n)` of the valid tokens (per batch or per sample), seeded.

    Args:
        k: keep ratio in [0, 1].
        seed: the random stream is `seed + step`, so a resumed run draws the same masks.
        scope: "batch" (one ranking over the micro-batch) or "sample" (per row).
    """

    needs = frozenset()

    def __init__(self, k: float = 0.6, seed: int = 0, scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"RandomSelection: k={k} must lie in [0, 1]")
        self.k, self.seed = k, seed

    def select(self, stats: TokenStats) -> Tensor:
        g = torch.Generator().manual_seed(self.seed + int(stats.step))
        score = torch.rand(stats.valid.shape, generator=g).to(stats.valid.device)
        return self.topk_mask(score, stats.valid, self.k)
