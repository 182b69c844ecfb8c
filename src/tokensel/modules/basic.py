"""Controls every method must beat: all tokens, and a seeded random subset at the same keep ratio."""

from __future__ import annotations

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats


class FullSelection(TokenSelector):
    """Train on every labelled token (plain SFT / CLM).

    Args:
        scope: unused (every token is kept whatever the scope); accepted for a uniform selector interface.
    """

    needs = frozenset()

    def select(self, stats: TokenStats) -> Tensor:
        return stats.valid.float()


class RandomSelection(TokenSelector):
    """Keep a uniformly random `ceil(k * n)` of the valid tokens (per batch or per sample), seeded.

    Args:
        k: keep ratio in [0, 1].
        seed: the stream is seeded by a hash of (seed, optimizer step, micro-batch, rank): every rank and
            every accumulated micro-batch draws independently, seeds s and s + 1 give unrelated streams,
            and a resumed run draws the same masks.
        scope: "batch" (one ranking over the micro-batch), "sample" (per original sample, also inside packed
            rows) or "global" (one draw and ranking over the global batch of all data-parallel ranks).
    """

    needs = frozenset()

    def __init__(self, k: float = 0.6, seed: int = 0, scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"RandomSelection: k={k} must lie in [0, 1]")
        self.k, self.seed = k, seed
        self.tie_seed = seed

    def select(self, stats: TokenStats) -> Tensor:
        g = stats.generator(self.seed, shared=self.scope == "global")
        if self.scope == "global":
            # One draw per valid token of the *global* batch, in global order (rank 0's rows first), from a
            # stream every rank shares, so W ranks holding B rows each keep exactly the tokens one process
            # holding W * B rows keeps, whatever the padding.
            from tokensel.modules.base import _gather_global

            valid = stats.valid.bool()
            _, all_v, off = _gather_global(torch.zeros(valid.shape, device=valid.device), valid)
            before, mine = int(all_v[:off].sum()), int(valid.sum())
            draw = torch.rand(int(all_v.sum()), generator=g)[before: before + mine]
            score = torch.zeros(valid.shape).masked_scatter(valid.cpu(), draw).to(valid.device)
        else:
            score = torch.rand(stats.valid.shape, generator=g).to(stats.valid.device)
        return self.topk_mask(score, stats.valid, self.k, stats=stats)
