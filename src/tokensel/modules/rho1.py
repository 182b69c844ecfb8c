"""Rho-1 selective language modelling (Lin et al., arXiv 2404.07965, NeurIPS 2024).

Score = excess loss `L_theta(i) - L_ref(i)` (Eq. 3): high where the reference model finds the token
easy but the current model still gets it wrong. Keep the top `k` fraction of tokens *in the batch*
("ranking the tokens in a batch according to their excess loss and using only the top k%", §2.2);
k=0.6 is the paper's TinyLlama-1.1B default (0.7 for Mistral-7B). The reference losses come from a
frozen reference model loaded like the base model (`SelectiveLM(reference_model=...)`) or from a
precomputed per-token file (`SelectiveLM(reference_losses=...)`).
"""

from __future__ import annotations

from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats


class Rho1Selection(TokenSelector):
    """Keep the top-k% excess-loss tokens.

    Args:
        k: keep ratio (paper: 0.6 for 1B models, 0.7 for 7B).
        scope: "batch" as in the paper; "sample" ranks within each sequence; "global" across ranks.
    """

    needs = frozenset({"loss", "ref_loss"})

    def __init__(self, k: float = 0.6, scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= k <= 1.0:
            raise ValueError(f"Rho1Selection: k={k} must lie in [0, 1]")
        self.k = k

    def excess_loss(self, stats: TokenStats) -> Tensor:
        return stats.loss - stats.ref_loss

    def select(self, stats: TokenStats) -> Tensor:
        return self.topk_mask(self.excess_loss(stats), stats.valid, self.k, stats=stats)
