"""Rho-1 selective language modelling (Lin et al., arXiv 2404.07965, NeurIPS 2024).

Score = excess loss `L_theta(i) - L_ref(i)` (Eq. 3): high where the reference model finds the token
easy but the current model still gets it wrong. Keep the top `k` fraction of tokens *in the batch*
("ranking the tokens in a batch according to their excess loss and using only the top k%", §2.2);
k=0.6 is the paper's TinyLlama-1.1B default (0.7 for Mistral-7B). The reference losses come from a
frozen reference model loaded like the base model (`SelectiveLM(reference_model=...)`) or from a
precomputed per-token file (`SelectiveLM(reference_losses=...)`).

The reference model (RM) is the base model trained on curated high-quality data (§2.1): stage 1 is
`recipes/rho1_reference.yaml` (SFT on a seeded curated split, exported on fit end), stage 2
`recipes/rho1.yaml` (the selective run on the rest; it never trains on the curated split). A frozen copy
of the start weights (`reference_model: initial`) is refused: it makes the excess loss 0 at step 0 and
then keeps the tokens whose loss rose.

`StaticRho1Selection` is the offline variant that the ssToken and TokenCleaning papers ran as their
"Rho-1" SFT baseline: score = L_base - L_ref from two per-token caches written once by `trainer predict`
(base model, reference model), so the score never changes during training.

Deviations that remain: microsoft/rho publishes no training code, so the ranking unit follows the text
("tokens in a batch") over the local micro-batch (`scope: global` ranks over all data-parallel ranks, as a
1M-token global batch does); ties break at random (seeded), never by position; the normaliser `selected`
is the mean over the micro-batch's kept tokens (`global_selected` is exact across accumulation).
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


class StaticRho1Selection(Rho1Selection):
    """Offline Rho-1: keep the top-k% tokens by `L_base - L_ref`, both from caches computed once before training.

    Args:
        k: keep ratio (ssToken's baseline setting: 0.6).
        scope: "batch", "sample" or "global" as `Rho1Selection`.
    Needs `model.base_losses` and `model.reference_losses`: `trainer predict` with `TokenStatsWriter`, once
    with the base model and once with the reference model (commands in `recipes/rho1_static.yaml`).
    """

    needs = frozenset({"base_loss", "ref_loss"})

    def excess_loss(self, stats: TokenStats) -> Tensor:
        return stats.base_loss - stats.ref_loss
