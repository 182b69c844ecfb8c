"""Q-Tuning: quadrant-based sample triage + neighbour-smoothed token pruning (Wang et al., arXiv 2509.23873).

Before the trained forward, a no-grad scoring pass of the *current* model (Alg. 1 line 4) gives each
sample's answer-token statistics (the spine's `score_loss` / `score_entropy`):
    PPL(x) = exp(mean_i loss_i)   (Eq. 4)        Ent(x) = mean_i H_i   (Eq. 5)
Error-Uncertainty quadrants (§3.1):
    Q1 harmful noise       = high PPL, high Ent -> dropped
    Q2 valuable misconcep. = high PPL, low Ent  -> kept, token-pruned
    Q3 redundant knowledge = low PPL,  low Ent  -> dropped
    Q4 calibration data    = low PPL,  high Ent -> kept whole
Thresholds by bisection (Alg. 1): alpha, beta in [0, 0.49]; ppl_hi = Q_{1-alpha}(PPL), ppl_lo = Q_alpha(PPL),
ent_lo = Q_beta(Ent), ent_hi = Q_{1-beta}(Ent) (linear-interpolated quantiles); r = |Q2 u Q4| / B; r below
the sample keep ratio relaxes (alpha_lo, beta_lo <- alpha, beta), else tightens. After `max_iter` rounds the
split is drawn at the midpoints (Fig. 2). Samples in the middle bands belong to no quadrant and are dropped.
If fewer than `ceil(sample_ratio * B)` samples are kept, the rest is topped up (Alg. lines 18-20) by
`supp = |PPL^ - Ent^|` (min-max normalised in the batch), Q1 u Q3 first, then the unassigned samples (our
extension, so the budget is always met). We do not trim when bisection overshoots.

Token pruning in Q2 (Eq. 7): s_i = (1 - lambda) PPL_i + lambda (PPL_{i-1} + PPL_{i+1}), PPL_i = exp(loss_i),
lambda = 0.5; the paper *sums* the neighbours. Boundary (NOT FOUND; ours): a missing neighbour (first / last
answer token, or a neighbour outside the answer) is replaced by the token's own PPL_i. Keep the *lowest*
`max(1, floor(token_ratio * L))` scores (the text: "tokens with high local PPL are removed"; the
"Reversed PPL" ablation scores worse). Q4 keeps every token, so the realised token ratio exceeds
`token_ratio`. Dropped samples leave the batch before the trained forward (no forward/backward cost).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats, Triage, _gather_global

Q1, Q2, Q3, Q4, NONE = 1, 2, 3, 4, 0


def quadrants(ppl: Tensor, ent: Tensor, alpha: float, beta: float) -> Tensor:
    """Quadrant id per sample (0 = none) at quantile levels alpha (PPL) and beta (Ent)."""
    ppl, ent = ppl.double(), ent.double()
    ppl_hi, ppl_lo = torch.quantile(ppl, 1 - alpha), torch.quantile(ppl, alpha)
    ent_hi, ent_lo = torch.quantile(ent, 1 - beta), torch.quantile(ent, beta)
    q = torch.zeros_like(ppl, dtype=torch.long)
    hi_p, lo_p, hi_e, lo_e = ppl >= ppl_hi, ppl <= ppl_lo, ent >= ent_hi, ent <= ent_lo
    q[lo_p & hi_e] = Q4
    q[lo_p & lo_e] = Q3
    q[hi_p & lo_e] = Q2
    q[hi_p & hi_e] = Q1
    return q


def bisect_quadrants(ppl: Tensor, ent: Tensor, sample_ratio: float, max_iter: int = 10
                     ) -> tuple[Tensor, float, float]:
    """Alg. 1 stage 1: bisection on (alpha, beta) towards |Q2 u Q4| / B = sample_ratio.
    Returns (quadrant ids, alpha, beta) at the final midpoints."""
    a_lo, a_hi, b_lo, b_hi = 0.0, 0.49, 0.0, 0.49
    n = ppl.numel()
    for _ in range(max_iter):
        a, b = (a_lo + a_hi) / 2, (b_lo + b_hi) / 2
        q = quadrants(ppl, ent, a, b)
        r = float(((q == Q2) | (q == Q4)).sum()) / n
        if r < sample_ratio:
            a_lo, b_lo = a, b
        else:
            a_hi, b_hi = a, b
    a, b = (a_lo + a_hi) / 2, (b_lo + b_hi) / 2
    return quadrants(ppl, ent, a, b), a, b


def _minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-12)


def neighbour_score(token_ppl: Tensor, valid: Tensor, lam: float = 0.5) -> Tensor:
    """Eq. 7 per row: (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1}); a missing / invalid neighbour = PPL_i."""
    valid = valid.bool()
    prev = torch.cat([token_ppl[:, :1], token_ppl[:, :-1]], 1)
    nxt = torch.cat([token_ppl[:, 1:], token_ppl[:, -1:]], 1)
    pv = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], 1)
    nv = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, -1:])], 1)
    prev = torch.where(pv, prev, token_ppl)
    nxt = torch.where(nv, nxt, token_ppl)
    return (1 - lam) * token_ppl + lam * (prev + nxt)


class QTuningSelection(TokenSelector):
    """Drop Q1/Q3 samples before the trained forward, keep Q4 whole, token-prune Q2.

    Args:
        sample_ratio: target share of samples kept per batch (r_sample; paper budgets 0.0625-0.5).
        token_ratio: share of answer tokens kept in Q2 samples (r_token; paper 0.5 or 0.7).
        lam: neighbour weight lambda in Eq. 7 (paper default 0.5; 0 = own PPL only).
        max_iter: bisection rounds (paper: < 10 typical).
        scope: "batch" (quantiles over the local micro-batch) or "global" (sample statistics all-gathered
            across ranks; each rank then keeps its own share of the globally triaged samples).
    """

    needs = frozenset({"score_loss", "score_entropy"})

    def __init__(self, sample_ratio: float = 0.25, token_ratio: float = 0.5, lam: float = 0.5,
                 max_iter: int = 10, scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if scope == "sample":
            raise ValueError("QTuningSelection: scope='sample' is meaningless for sample triage; use batch or global")
        for name, v in (("sample_ratio", sample_ratio), ("token_ratio", token_ratio), ("lam", lam)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"QTuningSelection: {name}={v} must lie in [0, 1]")
        self.sample_ratio, self.token_ratio, self.lam, self.max_iter = sample_ratio, token_ratio, lam, max_iter
        self.last_score: Tensor | None = None
        self.last_quadrants: Tensor | None = None

    @staticmethod
    def sample_stats(stats: TokenStats) -> tuple[Tensor, Tensor, Tensor]:
        """(PPL [B], mean entropy [B], has-answer [B]) from the scoring pass."""
        v = stats.valid.float()
        n = v.sum(1)
        mean_loss = (stats.score_loss.float() * v).sum(1) / n.clamp_min(1)
        ent = (stats.score_entropy.float() * v).sum(1) / n.clamp_min(1)
        return torch.exp(mean_loss.clamp(max=80)), ent, n > 0

    def assign(self, ppl: Tensor, ent: Tensor) -> tuple[Tensor, Tensor]:
        """(quadrant ids, keep [B] bool) for one ranking group, with the top-up rule."""
        n = ppl.numel()
        if n == 0:
            return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool)
        q, _, _ = bisect_quadrants(ppl, ent, self.sample_ratio, self.max_iter)
        keep = (q == Q2) | (q == Q4)
        need = math.ceil(self.sample_ratio * n - 1e-9) - int(keep.sum())
        if need > 0:
            supp = torch.maximum(_minmax(ppl) - _minmax(ent), _minmax(ent) - _minmax(ppl))
            first = ((q == Q1) | (q == Q3)).double() * 10.0  # Q1 u Q3 before the unassigned middle
            cand = (supp.double() + first).masked_fill(keep, float("-inf"))
            order = torch.sort(cand, descending=True, stable=True).indices[:need]
            keep[order] = True
        return q, keep

    def triage(self, stats: TokenStats) -> Triage:
        ppl, ent, has = self.sample_stats(stats)
        dev = stats.valid.device
        if self.scope == "global":
            all_p, all_has, off = _gather_global(ppl.double(), has)
            all_e, _, _ = _gather_global(ent.double(), has)
            idx = all_has.nonzero().squeeze(1)
            q_all = torch.zeros(all_p.numel(), dtype=torch.long, device=dev)
            k_all = torch.zeros(all_p.numel(), dtype=torch.bool, device=dev)
            qg, kg = self.assign(all_p[idx].cpu(), all_e[idx].cpu())
            q_all[idx], k_all[idx] = qg.to(dev), kg.to(dev)
            q, keep = q_all[off: off + ppl.numel()], k_all[off: off + ppl.numel()]
        else:
            idx = has.nonzero().squeeze(1)
            q = torch.zeros(ppl.numel(), dtype=torch.long, device=dev)
            keep = torch.zeros(ppl.numel(), dtype=torch.bool, device=dev)
            ql, kl = self.assign(ppl[idx].cpu(), ent[idx].cpu())
            q[idx], keep[idx] = ql.to(dev), kl.to(dev)
        valid = stats.valid.bool()
        token_ppl = torch.exp(stats.score_loss.float().clamp(max=80)) * valid
        s = neighbour_score(token_ppl, valid, self.lam)
        w = valid.float() * keep[:, None].float()
        for b in (keep & (q == Q2)).nonzero().squeeze(1).tolist():  # Q2: keep the lowest-s r_token share
            n_b = int(valid[b].sum())
            k = max(1, int(math.floor(self.token_ratio * n_b + 1e-9)))
            order = torch.sort(s[b].masked_fill(~valid[b], float("inf")), stable=True).indices[:k]
            row = torch.zeros_like(w[b])
            row[order] = 1.0
            w[b] = row
        self.last_quadrants = q
        self.last_score = s.detach()
        self._keep = keep
        return Triage(keep_samples=keep, token_weights=w,
                      info={"quadrants": q, "ppl": ppl, "entropy": ent})

    def select(self, stats: TokenStats) -> Tensor:
        """After triage the prior weights carry the decision; every surviving valid token passes here."""
        keep = getattr(self, "_keep", None)
        if self.last_score is not None and keep is not None and self.last_score.shape[0] == keep.shape[0]:
            self.last_score = self.last_score[keep]  # align the report's score with the kept rows
        return stats.valid.float()
