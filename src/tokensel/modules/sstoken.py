"""ssToken: self-modulated and semantic-aware token selection (Qin et al., arXiv 2510.18250, ICLR 2026).

Scores per response token i (see methods/llm_selectors.md §2):

* Retrospective excess loss (Eq. 3): `REL(i) = L_his(i) - L_theta(i)`. High = the current model has
  *improved* on this token relative to its history model. Polarity is the opposite of Rho-1 (which keeps
  tokens where the current model is *worse* than the reference). Min-max normalised per sample over the
  valid tokens (Eq. 8): `(REL - min) / (max - min + 1e-8)`.
* Semantic score (Eq. 5-7): attention mass the token's query puts on the prompt at one layer (default the
  last, as the official code), averaged over heads, in [0, 1], no further normalisation. The spine
  computes it with `AttentionProbe` (one layer recomputed under no-grad; every layer keeps SDPA). The
  score of response token t uses query row t, the token's own position (`attn_row: "t"`): the paper's
  Eq. 5 and both official scripts (`attn[prompt_len:, :prompt_len]`). `attn_row: "t-1"` (our earlier
  default, kept as an option) uses the row of the position whose hidden state predicts token t; under it
  the first response token always scores exactly 1.

Score = gamma * N(REL) + (1 - gamma) * attn (Eq. 9); keep the top `ceil(rho * L_resp)` per sample (per
original sample, also inside packed rows). Defaults gamma=0.5, rho=0.6 (paper and code).

Warm-up: the official code forces gamma to 0 (attention only) while the dataset index is below 10,000, about
the first 20% of its single shuffle-free epoch, because REL is near random at the start and min-max would
blow tiny REL differences up to [0, 1]. Default here: `warmup_fraction=0.2` of the run's optimizer steps
(keyed on the optimizer step, so it survives shuffling); `warmup_steps` sets a step count instead; both 0 =
off (the paper text's reading, which does not mention a warm-up).

Deviations that remain (ours, not the paper's): the warm-up is keyed on optimizer steps rather than the
dataset index; `history: ema` is an EMA of the trainable (LoRA A and B) factors, not of the merged weights
(the paper gives no EMA decay and its runs use the fixed base model); `history: base` recomputes the base
losses live (no grad) each step, where the official code precomputes them offline (`history: cached` is
that path); LoRA dropout is re-sampled in the probe's recomputation (as in the official hook version); the
probe ignores attention logit soft-capping (Gemma-2).

History model (`SelectiveLM(history=...)`): "base" = the model with LoRA disabled (what all the paper's
runs use), "ema" = an EMA copy of the trainable weights (Eq. 4; decay `SelectiveLM(ema_decay=...)`, no
value is reported in the paper), "cached" = per-token history losses from a file.
"""

from __future__ import annotations

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats, sample_parts


def minmax_per_sample(x: Tensor, valid: Tensor, eps: float = 1e-8, groups: Tensor | None = None) -> Tensor:
    """`(x - min) / (max - min + eps)` per row over valid positions; 0 elsewhere. With `groups` (`[B, T]`
    sample ids of packed rows) per original sample instead of per row."""
    valid = valid.bool()
    if groups is not None:
        out = torch.zeros_like(x, dtype=torch.float32)
        for b, part in sample_parts(valid, groups):
            lo, hi = x[b][part].min(), x[b][part].max()
            out[b] = torch.where(part, (x[b] - lo) / (hi - lo + eps), out[b])
        return out
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
        attn_row: "t" (the token's own query row: paper and official code) or "t-1" (the predicting position).
        warmup_fraction: share of the run's optimizer steps with attention-only selection (official code: the
            first ~20%); needs the run length (`trainer.max_steps`, or the estimated stepping batches).
        warmup_steps: attention-only optimizer steps as a count; when set it overrides `warmup_fraction`.
        scope: "sample" as in the paper; "batch" / "global" rank the combined score over the batch / ranks.
    """

    needs = frozenset({"loss", "his_loss", "attn_prompt"})

    def __init__(self, rho: float = 0.6, gamma: float = 0.5, layer: int = -1, attn_row: str = "t",
                 warmup_fraction: float = 0.2, warmup_steps: int | None = None, scope: str = "sample") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= rho <= 1.0:
            raise ValueError(f"SsTokenSelection: rho={rho} must lie in [0, 1]")
        if not 0.0 <= gamma <= 1.0:
            raise ValueError(f"SsTokenSelection: gamma={gamma} must lie in [0, 1]")
        if attn_row not in ("t", "t-1"):
            raise ValueError(f"SsTokenSelection: attn_row={attn_row!r} must be 't' (paper, official code) or 't-1'")
        if not 0.0 <= warmup_fraction < 1.0:
            raise ValueError(f"SsTokenSelection: warmup_fraction={warmup_fraction} must lie in [0, 1)")
        if warmup_steps is not None and warmup_steps < 0:
            raise ValueError(f"SsTokenSelection: warmup_steps={warmup_steps} must be >= 0 (or null)")
        self.rho, self.gamma, self.attn_layer, self.attn_row = rho, gamma, layer, attn_row
        self.warmup_fraction, self.warmup_steps = warmup_fraction, warmup_steps
        needs = {"loss"}
        if gamma > 0:
            needs.add("his_loss")
        if gamma < 1 or self.has_warmup:
            needs.add("attn_prompt")
        self.needs = frozenset(needs)  # instance override: the spine computes only what the weights use
        self.last_score: Tensor | None = None

    @property
    def has_warmup(self) -> bool:
        return bool(self.warmup_steps) if self.warmup_steps is not None else self.warmup_fraction > 0

    def warmup_length(self, total_steps: int) -> int:
        """Attention-only optimizer steps for a run of `total_steps` steps."""
        if self.warmup_steps is not None:
            return int(self.warmup_steps)
        if self.warmup_fraction <= 0:
            return 0
        if total_steps <= 0:
            raise ValueError("SsTokenSelection: warmup_fraction needs the run length (trainer.max_steps or a "
                             "finite epoch count); set warmup_steps instead")
        return int(round(self.warmup_fraction * total_steps))

    def gamma_at(self, step: int, total_steps: int = 0) -> float:
        return 0.0 if step < self.warmup_length(total_steps) else self.gamma

    def rel(self, stats: TokenStats) -> Tensor:
        """Retrospective excess loss L_his - L_theta (high = improved over history)."""
        return stats.his_loss - stats.loss

    def score(self, stats: TokenStats) -> Tensor:
        g = self.gamma_at(int(stats.step), int(stats.total_steps))
        s = torch.zeros_like(stats.valid, dtype=torch.float32)
        if g > 0:
            s = s + g * minmax_per_sample(self.rel(stats).float(), stats.valid, groups=stats.groups())
        if g < 1:
            s = s + (1 - g) * stats.attn_prompt.float()
        return s

    def select(self, stats: TokenStats) -> Tensor:
        s = self.score(stats)
        self.last_score = s.detach()
        return self.topk_mask(s, stats.valid, self.rho, stats=stats)
