"""ESLM: risk-averse selective language modelling (Bal, Cevher, Muehlebach; arXiv 2505.19893).

Per-token risk score S = per-token loss or predictive entropy of the current model (from the trained
forward; no reference model). Value-at-risk threshold: `VaR_alpha` = the empirical alpha-quantile of the
scores over the batch (or per sample, or all-gathered across ranks: `scope`). Keep every token with
`S >= VaR_alpha` ("at or above": ties at the threshold are all kept). The loss is the mean over kept tokens
(`normaliser: selected`); with S = loss this is the empirical CVaR_alpha of the token losses (the mean of
the upper (1 - alpha) tail), which tests/unit/test_eslm.py checks against the Rockafellar-Uryasev formula.

Quantile convention (the paper's tie rule is NOT FOUND; ours): `VaR_alpha = sorted(S)[floor(alpha * n)]`
(clamped to the last element), the smallest score whose upper tail holds `ceil((1 - alpha) * n)` tokens; so
without ties exactly `ceil((1 - alpha) * n)` tokens are kept, as `topk_mask(ratio=1 - alpha)` would.
Default alpha=0.4 (not reported by the paper; a third-party plan sweeps 0.4-0.7).

Ada-ESLM (`AdaEslmSelection`): the paper only says alpha is "adaptively tuned during training"; its rule
is NOT FOUND. Our rule (documented, testable): alpha tracks a target *risk mass*. For each batch let
`a_hat` be the smallest alpha whose kept upper tail carries at least `target_mass` of the batch's total
score (scores are non-negative: losses and entropies are); then `alpha <- beta * alpha + (1 - beta) * a_hat`,
clipped to `[alpha_min, alpha_max]`, and the batch is selected with the updated alpha. Why: when the
risk is concentrated on a few tokens (late training, most tokens learned) alpha rises and ESLM trains on
fewer tokens; when losses are spread out (early training) alpha falls and more tokens train, which is the
intent of adapting the confidence level. alpha is a buffer, so it is checkpointed and resumes exactly.

Deviations that remain (no public ESLM code exists; see methods/llm_selectors.md): the tie rule and the
alpha default are ours (above); the Ada-ESLM rule is ours; ESLM-KD (`SelectiveLM(distill=...)`) selects
over alpha * KL(teacher || student) + (1 - alpha) * CE, our reading of "integrates with KD" (no
teacher-derived score option); the ICLR version's instance-level (early-exit proxy) stage before the
token VaR is not implemented; masking the loss does not cut transformer FLOPs (only the LM-head backward
skips unselected rows). The pretraining recipes build GPT-2 from its config, which trains with dropout 0.1,
so the risk scores come from a dropout-noised forward (the paper does not say).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats, _gather_global, sample_parts


def var_threshold(score: Tensor, alpha: float) -> Tensor:
    """Empirical alpha-quantile of a 1-D tensor: `sorted[floor(alpha * n)]` (clamped); +inf if empty."""
    n = score.numel()
    if n == 0:
        return torch.tensor(float("inf"), device=score.device)
    s = torch.sort(score.float()).values
    return s[min(n - 1, int(math.floor(alpha * n + 1e-9)))]


def var_mask(score: Tensor, valid: Tensor, alpha: float, scope: str = "batch", groups: Tensor | None = None
             ) -> Tensor:
    """`[B, T]` float 0/1: valid tokens with score >= the alpha-quantile of their ranking group. `groups`
    (`[B, T]` sample ids, scope "sample"): one quantile per original sample inside packed rows."""
    valid = valid.bool()
    if scope == "sample" and groups is not None:
        keep = torch.zeros_like(valid)
        for b, part in sample_parts(valid, groups):
            keep[b] |= part & (score[b].float() >= var_threshold(score[b][part], alpha))
        return keep.float()
    if scope == "sample":
        thr = torch.stack([var_threshold(score[b][valid[b]], alpha) for b in range(score.shape[0])])[:, None]
    elif scope == "global":
        all_s, all_v, _ = _gather_global(score.float(), valid)
        thr = var_threshold(all_s[all_v], alpha)
    elif scope == "batch":
        thr = var_threshold(score[valid], alpha)
    else:
        raise ValueError(f"scope={scope!r} must be one of 'batch', 'sample', 'global'")
    return ((score.float() >= thr) & valid).float()


class EslmSelection(TokenSelector):
    """Keep tokens whose risk score is at or above the batch's alpha-quantile (VaR); CVaR when score=loss.

    Args:
        alpha: confidence level in [0, 1); about (1 - alpha) of the tokens are kept.
        score: "loss" (CVaR objective) or "entropy".
        scope: "batch" (the paper's mini-batch), "sample" (per row) or "global" (all-gathered across ranks).
    """

    def __init__(self, alpha: float = 0.4, score: str = "loss", scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if not 0.0 <= alpha < 1.0:
            raise ValueError(f"{type(self).__name__}: alpha={alpha} must lie in [0, 1)")
        if score not in ("loss", "entropy"):
            raise ValueError(f"{type(self).__name__}: score={score!r} must be 'loss' or 'entropy'")
        self.alpha, self.score_name = alpha, score
        self.needs = frozenset({score})
        self.last_score: Tensor | None = None

    def current_alpha(self, stats: TokenStats) -> float:
        return self.alpha

    def select(self, stats: TokenStats) -> Tensor:
        s = getattr(stats, self.score_name).detach().float()
        self.last_score = s
        groups = stats.groups() if self.scope == "sample" else None
        return var_mask(s, stats.valid, self.current_alpha(stats), self.scope, groups)


class AdaEslmSelection(EslmSelection):
    """ESLM with alpha adapted to keep a target share of the batch's risk mass (our documented rule).

    Args:
        alpha: starting confidence level.
        target_mass: share of the batch's total score the kept tail should carry (0.8 = keep the
            smallest upper tail holding 80% of the loss mass).
        beta: smoothing of alpha across steps (0 = follow each batch exactly).
        alpha_min: lower clip of alpha.
        alpha_max: upper clip of alpha.
        score: as `EslmSelection`.
        scope: as `EslmSelection`.
    """

    def __init__(self, alpha: float = 0.4, target_mass: float = 0.8, beta: float = 0.9, alpha_min: float = 0.1,
                 alpha_max: float = 0.9, score: str = "loss", scope: str = "batch") -> None:
        super().__init__(alpha=alpha, score=score, scope=scope)
        if not 0.0 < target_mass <= 1.0:
            raise ValueError(f"AdaEslmSelection: target_mass={target_mass} must lie in (0, 1]")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"AdaEslmSelection: beta={beta} must lie in [0, 1)")
        if not 0.0 <= alpha_min <= alpha_max < 1.0:
            raise ValueError("AdaEslmSelection: need 0 <= alpha_min <= alpha_max < 1")
        self.target_mass, self.beta, self.alpha_min, self.alpha_max = target_mass, beta, alpha_min, alpha_max
        self.register_buffer("alpha_state", torch.tensor(float(alpha)))
        self.register_buffer("last_step", torch.tensor(-1))

    @staticmethod
    def mass_alpha(score: Tensor, target_mass: float) -> float:
        """Smallest alpha whose upper tail (of size n - floor(alpha n)) carries >= target_mass of the total."""
        s = torch.sort(score.float().clamp_min(0), descending=True).values
        n = s.numel()
        total = float(s.sum())
        if n == 0 or total <= 0:
            return 0.0
        k = int((torch.cumsum(s, 0) >= target_mass * total - 1e-6 * total).nonzero()[0, 0]) + 1  # tail size
        return (n - k) / n

    def current_alpha(self, stats: TokenStats) -> float:
        s = getattr(stats, self.score_name).detach().float()
        if self.scope == "global":
            all_s, all_v, _ = _gather_global(s, stats.valid.bool())
            pool = all_s[all_v]
        else:
            pool = s[stats.valid.bool()]
        if int(self.last_step) != int(stats.step):  # one update per optimizer step (not per accumulation)
            a_hat = self.mass_alpha(pool, self.target_mass)
            new = self.beta * float(self.alpha_state) + (1 - self.beta) * a_hat
            self.alpha_state.fill_(min(self.alpha_max, max(self.alpha_min, new)))
            self.last_step.fill_(int(stats.step))
        return float(self.alpha_state)
