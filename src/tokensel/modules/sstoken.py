"""ssToken: self-modulated and semantic-aware token selection (Qin et al., arXiv 2510.18250, ICLR 2026).

Scores per response token i (see methods/llm_selectors.md §2):

* Retrospective excess loss (Eq. 3): `REL(i) = L_his(i) - L_theta(i)`. High = the current model has
  *improved* on this token relative to its history model. Polarity is the opposite of Rho-1 (which keeps
  tokens where the current model is *worse* than the reference). Min-max normalised per sample over the
  valid tokens (Eq. 8): `(REL - min) / (max - min + 1e-8)`.
* Semantic score (Eq. 5-7): attention mass the token's query puts on the prompt at one layer (default the
  last, as the official code), averaged over heads, in [0, 1], no further normalisation. The spine
  computes it with `AttentionProbe` (one layer recomputed under no-grad; every layer keeps SDPA). Our
  alignment choice: the score at label position t uses query row t-1 (the position whose hidden state
  predicts token t), the same alignment as the per-token loss.

Score = gamma * N(REL) + (1 - gamma) * attn (Eq. 9); keep the top `ceil(rho * L_resp)` per sample.
Defaults gamma=0.5, rho=0.6 (paper and code). The official code runs an attention-only warm-up
(gamma forced to 0) for the first ~20% of the single epoch, keyed on the dataset index; we key it on the
optimizer step (`warmup_steps`, 0 = off) so it survives shuffling.

History model (`SelectiveLM(history=...)`): "base" = the model with LoRA disabled (what all the paper's
runs use), "ema" = an EMA copy of the trainable weights (Eq. 4; decay `SelectiveLM(ema_decay=...)`, no
value is reported in the paper), "cached" = per-token history losses from a file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats


def minmax_per_sample(x: Tensor, valid: Tensor, eps: float = 1e-8) -> Tensor:
    """`(x - min) / (max - min + eps)` per row over valid positions; 0 elsewhere."""
    valid = valid.bool()
    lo = x.masked_fill(~valid, float("inf")).amin(1, keepdim=True)
    hi = x.masked_fill(~valid, float("-inf")).amax(1, keepdim=True)
    out = (x - lo) / (hi - lo + eps)
    return torch.where(valid, out, torch.zeros_like(out))


class SsTokenSelection(TokenSelector):
    """Keep the top-rho tokens per sample by gamma * minmax(L_his - L_theta) + (1 - gamma) * attention-to-prompt.

    Args:
        rho: keep ratio (paper 0.6; 0.8 for 14B models).
        gamma: weight of the self-modulated (REL) score; 1 - gamma weighs the attention score.
        layer: decoder layer whose attention gives the semantic score (-1 = last, the code's choice).
        warmup_steps: optimizer steps of attention-only selection at the start (0 = none).
        scope: "sample" as in the paper; "batch" / "global" rank the combined score over the batch / ranks.
    """

    needs = frozenset({"loss", "his_loss", "attn_prompt"})

    def __init__(self, rho: float = 0.6, gamma: float = 0.5, layer: int = -1, warmup_steps: int = 0,
                 scope: str = "sample") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"SsTokenSelection: rho={rho} must lie in [0, 1]")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"SsTokenSelection: gamma={gamma} must lie in [0, 1]")
        self.rho, self.gamma, self.attn_layer, self.warmup_steps = rho, gamma, layer, warmup_steps
        needs = {"loss"}
        if gamma > 0:
            needs.add("his_loss")
        if gamma < 1 or warmup_steps > 0:
            needs.add("attn_prompt")
        self.needs = frozenset(needs)  # instance override: the spine computes only what the weights use
        self.last_score: Tensor | None = None

    def gamma_at(self, step: int) -> float:
        return 0.0 if step < self.warmup_steps else self.gamma

    def rel(self, stats: TokenStats) -> Tensor:
        """Retrospective excess loss L_his - L_theta (high = improved over history)."""
        return stats.his_loss - stats.loss

    def score(self, stats: TokenStats) -> Tensor:
        g = self.gamma_at(int(stats.step))
        s = torch.zeros_like(stats.valid, dtype=torch.float32)
        if g > 0:
            s = s + g * minmax_per_sample(self.rel(stats).float(), stats.valid)
        if g < 1:
            s = s + (1 - g) * stats.attn_prompt.float()
        return s

    def select(self, stats: TokenStats) -> Tensor:
        s = self.score(stats)
        self.last_score = s.detach()
        return self.topk_mask(s, stats.valid, self.rho)
