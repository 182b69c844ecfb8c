"""Q-Tuning: quadrant-based sample triage + neighbour-smoothed token pruning (Wang et al., arXiv 2509.23873).

Two readings of the method, chosen by `rule`:

* `rule: "code"` (default) follows the authors' released code, Q-tuning/Q-tuning @ dd6eba5,
  LLaMA-Factory/src/llamafactory/train/sft/trainer.py, the `plug == "wisely"` branch of `compute_loss`
  with `token_method: wise` (line numbers below are that file's).
* `rule: "paper"` is our earlier reading of the paper text (Alg. 1, Eq. 2-7), kept for comparison.

Positions follow the spine: position t holds the prediction of token t (so t = 0 never counts).

Shared by both (paper and code agree): scores of the *current* model (Alg. 1 line 4; here a no-grad
scoring pass, see (c)) give each sample PPL(x) = exp(mean answer-token CE) (Eq. 4; code 202-220); the Error-Uncertainty
quadrants Q1 high PPL / high Ent (dropped), Q2 high PPL / low Ent (kept, token-pruned), Q3 low / low
(dropped), Q4 low PPL / high Ent (kept whole); thresholds ppl_hi = Q_{1-alpha}(PPL), ppl_lo = Q_alpha(PPL),
ent_lo = Q_beta(Ent), ent_hi = Q_{1-beta}(Ent) (linear-interpolated quantiles, as np.quantile), found by
a joint bisection of alpha and beta over [0, 0.49] towards r = |Q2 u Q4| / B = sample_ratio (r too small
relaxes, else tightens; code 291-337); Eq. 7 token score s_i = (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1})
with the two neighbours *summed*, lam = 0.5 (code 729-742, data_args.py 135); the highest-s tokens are the
ones removed; dropped samples leave the batch before the trained forward (no forward/backward cost).

From the code (rule "code"):
1. Strict inequalities (code 321-322): Q2 = PPL > ppl_hi and Ent <= ent_lo; Q4 = PPL <= ppl_lo and
   Ent > ent_hi. (Q1 / Q3 are not used by the code; `info["quadrants"]` labels them PPL > ppl_hi,
   Ent > ent_hi / PPL <= ppl_lo, Ent <= ent_lo for the report only.) Every row takes part, also one with
   no answer token (its PPL is exp(0) = 1, as the code's clamped mean).
2. Bisection stops as soon as |r - sample_ratio| < 0.01 and returns the split it last *evaluated*
   (code 325-337); at most `max_iter` = 10 rounds (code 292).
3. Top-up (code 598-631): K = min(B, max(1, round(B * sample_ratio))) (Python's round); if
   |Q2 u Q4| < K, the K - |Q2 u Q4| remaining samples (any quadrant or none) with the highest
   |PPL^ - Ent^| (min-max normalised in the batch; a constant axis normalises to 0) are added.
   A bisection overshoot is not trimmed (as the code).
4. Which kept samples are token-pruned (code 684-706): the Q2 samples plus the topped-up samples that are
   "Q2-like", PPL^ - Ent^ >= Ent^ - PPL^.
5. Token budget at batch level (code 656-669, 777-797): N = all non-pad positions t >= 1 of the batch (the
   code's attention_mask[:, 1:], prompt included; here `sample_ids >= 0`); keep round(N * sample_ratio *
   token_ratio). The tokens of dropped samples count towards the removal; only the remainder
   max(0, N - round(N r_s r_t) - dropped) is removed, by one flat ranking of the answer tokens of all
   pruned samples (highest s first), at most all of them; nothing is pruned when token_ratio == 1
   (code 683).
6. Eq. 7 neighbours (code 735-742): a neighbour on padding or outside the row contributes 0; a prompt
   neighbour (non-pad, unlabelled) contributes exp(0) = 1, because the code's PPL_i = exp(CE) with CE = 0
   at ignored labels. So the first answer token's left neighbour is 1 and the EOS's right neighbour 0.
7. Sample entropy (code 222-227): the code averages over all non-pad positions t >= 1 (prompt included);
   see deviation (a).

From the paper text (rule "paper"): >= / <= quadrant tests; `max_iter` rounds always, then the split is
re-drawn at the final midpoints (Fig. 2), a split that was never evaluated; top-up to ceil(B * r) by the
same |PPL^ - Ent^| from Q1 u Q3 first, then the unassigned samples (Alg. lines 18-20; the second pool is
ours, so the budget is always met); only Q2 samples are pruned, each to its lowest-s
max(1, floor(token_ratio * L)) answer tokens (Eq. 2), so there is no batch-level token budget and Q4 makes
the realised token ratio exceed token_ratio; a missing neighbour (first / last answer token) is replaced
by the token's own PPL_i (boundary not given in the paper); entropy over answer tokens (Eq. 5).

Both rules, project-wide: every top-k (top-up, token ranking) breaks ties at random from
`stats.generator(seed, shared=scope == "global")`, never by position (the code's np.argsort /
torch.topk break them arbitrarily). Packed batches are refused: triage drops whole rows, and a packed
row holds several samples.

Deviations from the code that remain under rule "code":
(a) Entropy span: none left under the spine. Ent(x) is the mean over every non-pad position from 1 on,
    prompt included, as the code: the selector declares `score_span = "all"`, so the spine's scoring pass
    runs the LM head on prompt positions too and passes `stats.extras["score_entropy_mask"]` (`[B, T]`
    bool). Without that mask (hand-built stats) the mean is over the answer tokens (the paper's Eq. 5).
(b) Without `stats.sample_ids` (not from the spine) the token budget counts and the neighbours see the
    answer tokens only (prompt = padding).
(c) Scoring forward: a separate no-grad pass, then a forward on the kept samples only; the code runs one
    forward with grad over the whole batch and reuses its logits for the scores and the loss (code 583-586,
    670-675): same model state and the same gradient, other cost; dropout (if any) draws differ.
(d) Loss normaliser: the code divides by the kept non-pad positions, prompt included (code 810-813,
    `effective_mask` starts from the attention mask); here the spine's `normaliser` applies (e.g.
    "selected" = kept answer tokens).
(e) Ties at random (above) and float64 quantiles (the code: float32 numpy).
(f) `scope: "global"` (all-gathered statistics, budget and ranking over the global batch) is ours; the
    code triages each device's micro-batch alone (= `scope: "batch"`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from tokensel.modules.base import TokenSelector, TokenStats, Triage, _gather_global, order_random_ties

Q1, Q2, Q3, Q4, NONE = 1, 2, 3, 4, 0
RULES = ("code", "paper")
CODE_TOL = 0.01  # the code's bisection tolerance on |r - sample_ratio|


def quadrants(ppl: Tensor, ent: Tensor, alpha: float, beta: float, rule: str = "code") -> Tensor:
    """Quadrant id per sample (0 = none) at quantile levels alpha (PPL) and beta (Ent).
    rule "code": PPL > Q_{1-alpha}, Ent > Q_{1-beta} are "high"; rule "paper": >=."""
    ppl, ent = ppl.double(), ent.double()
    ppl_hi, ppl_lo = torch.quantile(ppl, 1 - alpha), torch.quantile(ppl, alpha)
    ent_hi, ent_lo = torch.quantile(ent, 1 - beta), torch.quantile(ent, beta)
    q = torch.zeros_like(ppl, dtype=torch.long)
    if rule == "code":
        hi_p, hi_e = ppl > ppl_hi, ent > ent_hi
    else:
        hi_p, hi_e = ppl >= ppl_hi, ent >= ent_hi
    lo_p, lo_e = ppl <= ppl_lo, ent <= ent_lo
    q[lo_p & hi_e] = Q4
    q[lo_p & lo_e] = Q3
    q[hi_p & lo_e] = Q2
    q[hi_p & hi_e] = Q1
    return q


def bisect_quadrants(ppl: Tensor, ent: Tensor, sample_ratio: float, max_iter: int = 10, rule: str = "code"
                     ) -> tuple[Tensor, float, float]:
    """Alg. 1 stage 1: bisection on (alpha, beta) towards |Q2 u Q4| / B = sample_ratio.
    rule "code": stop once |r - sample_ratio| < 0.01 and return the last evaluated split;
    rule "paper": `max_iter` rounds, then the split at the final midpoints. Returns (quadrant ids, alpha, beta)."""
    a_lo, a_hi, b_lo, b_hi = 0.0, 0.49, 0.0, 0.49
    n = ppl.numel()
    last = None
    for _ in range(max_iter):
        a, b = (a_lo + a_hi) / 2, (b_lo + b_hi) / 2
        q = quadrants(ppl, ent, a, b, rule)
        r = float(((q == Q2) | (q == Q4)).sum()) / max(1, n)
        last = (q, a, b)
        if rule == "code" and abs(r - sample_ratio) < CODE_TOL:
            break
        if r < sample_ratio:
            a_lo, b_lo = a, b
        else:
            a_hi, b_hi = a, b
    if rule == "code" and last is not None:
        return last
    a, b = (a_lo + a_hi) / 2, (b_lo + b_hi) / 2
    return quadrants(ppl, ent, a, b, rule), a, b


def _minmax(x: Tensor) -> Tensor:
    return (x - x.min()) / (x.max() - x.min() + 1e-12)


def _minmax_code(x: Tensor) -> Tensor:
    """The code's normalisation: (x - min) / (max - min), all zeros when max - min < 1e-12."""
    span = float(x.max() - x.min())
    return torch.zeros_like(x) if span < 1e-12 else (x - x.min()) / span


def neighbour_score(token_ppl: Tensor, valid: Tensor, lam: float = 0.5, rule: str = "code",
                    context: Tensor | None = None) -> Tensor:
    """Eq. 7 per row: (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1}).
    rule "code": a neighbour on a `context` position (non-pad, unlabelled: the prompt) counts exp(0) = 1,
    one on padding or outside the row counts 0. rule "paper": a neighbour that is not `valid` is replaced
    by the token's own PPL_i."""
    valid = valid.bool()
    if rule == "code":
        ctx = torch.zeros_like(valid) if context is None else context.bool() & ~valid
        nb = torch.where(valid, token_ppl, ctx.to(token_ppl.dtype))
        zero = torch.zeros_like(nb[:, :1])
        prev = torch.cat([zero, nb[:, :-1]], 1)
        nxt = torch.cat([nb[:, 1:], zero], 1)
        return (1 - lam) * token_ppl + lam * (prev + nxt)
    prev = torch.cat([token_ppl[:, :1], token_ppl[:, :-1]], 1)
    nxt = torch.cat([token_ppl[:, 1:], token_ppl[:, -1:]], 1)
    pv = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, :-1]], 1)
    nv = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, -1:])], 1)
    prev = torch.where(pv, prev, token_ppl)
    nxt = torch.where(nv, nxt, token_ppl)
    return (1 - lam) * token_ppl + lam * (prev + nxt)


def _gather(x: Tensor, ok: Tensor, scope: str) -> tuple[Tensor, Tensor, int]:
    """Flattened (values, ok, this rank's offset) over the ranking group: local or all ranks."""
    if scope == "global":
        return _gather_global(x, ok)
    return x.reshape(-1), ok.reshape(-1), 0


class QTuningSelection(TokenSelector):
    """Drop Q1/Q3 samples before the trained forward, keep Q4 whole, token-prune Q2 (see the module docstring
    for which rules come from the authors' code, which from the paper text, and what still differs).

    Args:
        sample_ratio: target share of samples kept per batch (r_sample; paper budgets 0.0625-0.5).
        token_ratio: r_token. rule "code": the batch keeps round(non-pad tokens * sample_ratio * token_ratio)
            tokens in all; rule "paper": the share of answer tokens each Q2 sample keeps (paper 0.5 or 0.7).
        lam: neighbour weight lambda in Eq. 7 (paper and code default 0.5; 0 = own PPL only).
        max_iter: bisection rounds at most (code 10; paper: < 10 typical).
        rule: "code" (the authors' released code, default) or "paper" (our reading of the paper text).
        seed: seeds the random tie-break of every top-k (per step, micro-batch and, unless global, rank).
        scope: "batch" (quantiles over the local micro-batch) or "global" (sample statistics all-gathered
            across ranks; each rank then keeps its own share of the globally triaged samples; rule "code"
            also counts and ranks the token budget over the global batch).
    """

    needs = frozenset({"score_loss", "score_entropy"})

    def __init__(self, sample_ratio: float = 0.25, token_ratio: float = 0.5, lam: float = 0.5,
                 max_iter: int = 10, rule: str = "code", seed: int = 0, scope: str = "batch") -> None:
        super().__init__(scope=scope)
        if scope == "sample":
            raise ValueError("QTuningSelection: scope='sample' is meaningless for sample triage; use batch or global")
        if rule not in RULES:
            raise ValueError(f"QTuningSelection: rule={rule!r} must be one of {RULES}")
        for name, v in (("sample_ratio", sample_ratio), ("token_ratio", token_ratio), ("lam", lam)):
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"QTuningSelection: {name}={v} must lie in [0, 1]")
        self.sample_ratio, self.token_ratio, self.lam, self.max_iter = sample_ratio, token_ratio, lam, max_iter
        self.rule, self.seed = rule, seed
        # the code averages the sample entropy over prompt and answer; the paper (Eq. 5) over the answer
        self.score_span = "all" if rule == "code" else "answer"
        self.tie_seed = seed
        self.last_score: Tensor | None = None
        self.last_quadrants: Tensor | None = None

    @staticmethod
    def sample_stats(stats: TokenStats, entropy_mask: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """(PPL [B], mean entropy [B], has-answer [B]) from the scoring pass; the entropy is averaged over
        `entropy_mask` (default: the answer tokens)."""
        v = stats.valid.float()
        n = v.sum(1)
        mean_loss = (stats.score_loss.float() * v).sum(1) / n.clamp_min(1)
        em = v if entropy_mask is None else entropy_mask.float()
        ent = (stats.score_entropy.float() * em).sum(1) / em.sum(1).clamp_min(1)
        return torch.exp(mean_loss.clamp(max=80)), ent, n > 0

    def target_samples(self, n: int) -> int:
        """Samples the triage aims to keep out of n: the code's min(n, max(1, round(n r))), the paper's ceil(n r)."""
        if self.rule == "code":
            return min(n, max(1, int(round(n * self.sample_ratio)))) if n > 0 else 0
        return math.ceil(self.sample_ratio * n - 1e-9)

    def assign(self, ppl: Tensor, ent: Tensor, generator: torch.Generator | None = None
               ) -> tuple[Tensor, Tensor, Tensor]:
        """(quadrant ids, keep [n] bool, prune [n] bool) for one ranking group, with the top-up rule;
        `prune` marks the kept samples whose answer tokens are ranked for removal."""
        n = ppl.numel()
        if n == 0:
            empty = torch.zeros(0, dtype=torch.bool)
            return torch.zeros(0, dtype=torch.long), empty, empty.clone()
        q, _, _ = bisect_quadrants(ppl, ent, self.sample_ratio, self.max_iter, self.rule)
        keep = (q == Q2) | (q == Q4)
        prune = q == Q2
        need = self.target_samples(n) - int(keep.sum())
        if need <= 0:
            return q, keep, prune
        if self.rule == "code":
            pn, en = _minmax_code(ppl.double()), _minmax_code(ent.double())
            supp = torch.maximum(pn - en, en - pn)
            remain = (~keep).nonzero().squeeze(1)
            extra = remain[order_random_ties(supp[remain], True, generator)[:need]]
            keep[extra] = True
            prune[extra] = (pn - en)[extra] >= (en - pn)[extra]  # "Q2-like" top-ups are pruned too
            return q, keep, prune
        supp = torch.maximum(_minmax(ppl) - _minmax(ent), _minmax(ent) - _minmax(ppl))
        first = ((q == Q1) | (q == Q3)).double() * 10.0  # Q1 u Q3 before the unassigned middle
        cand = (supp.double() + first).masked_fill(keep, float("-inf"))
        keep[order_random_ties(cand, True, generator)[:need]] = True
        return q, keep, prune

    def _spans(self, stats: TokenStats) -> tuple[Tensor, Tensor | None]:
        """(non-pad positions t >= 1 [B, T] bool, entropy mask or None) for rule "code"."""
        valid = stats.valid.bool()
        ids = stats.sample_ids
        if isinstance(ids, Tensor) and ids.shape == valid.shape:
            nonpad = (ids >= 0).to(valid.device) | valid
            nonpad[:, 0] = False
        else:
            nonpad = valid
        em = stats.extras.get("score_entropy_mask") if isinstance(stats.extras, dict) else None
        em = em.bool().to(valid.device) if isinstance(em, Tensor) and em.shape == valid.shape else None
        return nonpad, em

    def triage(self, stats: TokenStats) -> Triage:
        if stats.groups() is not None:
            raise ValueError("QTuningSelection: Q-Tuning triage drops whole rows, so it needs unpacked "
                             "batches: set data.init_args.packing: false")
        code = self.rule == "code"
        gen = stats.generator(self.tie_seed, shared=self.scope == "global")
        valid = stats.valid.bool()
        dev = valid.device
        nonpad, ent_mask = self._spans(stats) if code else (valid, None)
        ppl, ent, has = self.sample_stats(stats, ent_mask)
        rows = torch.ones_like(has) if code else has  # the code ranks every row, the paper only answered ones
        all_p, all_ok, off = _gather(ppl.double(), rows, self.scope)
        all_e, _, _ = _gather(ent.double(), rows, self.scope)
        idx = all_ok.nonzero().squeeze(1)
        q_all = torch.zeros(all_p.numel(), dtype=torch.long, device=dev)
        k_all = torch.zeros(all_p.numel(), dtype=torch.bool, device=dev)
        p_all = torch.zeros(all_p.numel(), dtype=torch.bool, device=dev)
        qg, kg, pg = self.assign(all_p[idx].cpu(), all_e[idx].cpu(), gen)
        q_all[idx], k_all[idx], p_all[idx] = qg.to(dev), kg.to(dev), pg.to(dev)
        b = ppl.numel()
        q, keep, prune = q_all[off: off + b], k_all[off: off + b], p_all[off: off + b] & k_all[off: off + b]

        token_ppl = torch.exp(stats.score_loss.float().clamp(max=80)) * valid
        s = neighbour_score(token_ppl, valid, self.lam, self.rule, context=nonpad if code else None)
        w = valid.float() * keep[:, None].float()
        if code:
            self._prune_code(w, s, valid, nonpad, keep, prune, gen)
        else:
            for r in (keep & (q == Q2)).nonzero().squeeze(1).tolist():  # Q2: keep the lowest-s r_token share
                n_b = int(valid[r].sum())
                k = max(1, int(math.floor(self.token_ratio * n_b + 1e-9)))
                order = order_random_ties(s[r].masked_fill(~valid[r], float("inf")), False, gen)[:k]
                row = torch.zeros_like(w[r])
                row[order] = 1.0
                w[r] = row
        self.last_quadrants = q
        self.last_score = s.detach()
        self._keep = keep
        return Triage(keep_samples=keep, token_weights=w,
                      info={"quadrants": q, "ppl": ppl, "entropy": ent, "pruned": prune})

    def _prune_code(self, w: Tensor, s: Tensor, valid: Tensor, nonpad: Tensor, keep: Tensor, prune: Tensor,
                    gen: torch.Generator) -> None:
        """The code's batch-level token budget, in place on `w`: remove what the dropped samples leave of
        N - round(N r_s r_t), by one flat ranking (highest s first) over the pruned samples' answer tokens."""
        n_tok = nonpad.sum(1).double()
        all_n, _, _ = _gather(n_tok, torch.ones_like(keep), self.scope)
        all_keep, _, _ = _gather(keep.double(), torch.ones_like(keep), self.scope)
        total = int(all_n.sum())
        target = int(round(total * float(self.sample_ratio) * float(self.token_ratio)))
        dropped = int((all_n * (1 - all_keep)).sum())
        remaining = max(0, total - target - dropped)
        if remaining <= 0 or self.token_ratio == 1.0:
            return
        cand = valid & (keep & prune)[:, None]
        flat_s, flat_c, off = _gather(s.double(), cand, self.scope)
        n_drop = min(remaining, int(flat_c.sum()))
        if n_drop <= 0:
            return
        order = order_random_ties(flat_s.masked_fill(~flat_c, float("-inf")), True, gen)[:n_drop]
        drop = torch.zeros(flat_s.numel(), dtype=torch.bool, device=flat_s.device)
        drop[order.to(flat_s.device)] = True
        w.masked_fill_(drop[off: off + s.numel()].view_as(w), 0.0)

    def select(self, stats: TokenStats) -> Tensor:
        """After triage the prior weights carry the decision; every surviving valid token passes here."""
        keep = getattr(self, "_keep", None)
        if self.last_score is not None and keep is not None and self.last_score.shape[0] == keep.shape[0]:
            self.last_score = self.last_score[keep]  # align the report's score with the kept rows
        return stats.valid.float()
