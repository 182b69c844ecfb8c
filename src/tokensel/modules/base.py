"""The selector interface every loss-side method implements.

A selector maps per-token evidence (`TokenStats`) to weights `w [B, T]` (0/1 or soft). The spine
(`tokensel.trainer.lm.SelectiveLM`) gathers exactly the statistics a selector declares in `needs`,
calls it, and trains on `sum(w * loss) / normaliser`. A selector can act in two places:

* `triage(stats)` runs *before* the trained forward on the no-grad scoring pass (`score_loss`,
  `score_entropy`, `ref_loss`, `his_loss`); it may drop whole samples (they then cost no training
  compute) and give prior token weights. Only selectors that override it trigger a scoring pass of
  the current model.
* `select(stats)` runs *after* the trained forward on its own per-token statistics.

Scope of ranking (`scope`): "batch" ranks all valid tokens of the micro-batch together, "sample"
ranks within each row, "global" all-gathers scores across data-parallel ranks first (same result
as one process holding the whole global batch).
"""

from __future__ import annotations

import abc
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import ClassVar

import torch
from torch import Tensor, nn

# Statistics a selector can ask for. The spine computes only the ones some selector needs.
KNOWN_STATS = frozenset({
    "loss",            # per-token CE of the trained forward [B, T] (detached copy)
    "entropy",         # predictive entropy of the trained forward [B, T]
    "ref_loss",        # per-token CE of a frozen reference model (Rho-1) or precomputed
    "base_loss",       # per-token CE of the base model, precomputed once (static Rho-1)
    "his_loss",        # per-token CE of the history model (ssToken): base with LoRA off, EMA adapter, or cached
    "score_loss",      # per-token CE of the current model in a no-grad pass before the trained forward (Q-Tuning)
    "score_entropy",   # entropy from the same pass
    "attn_prompt",     # attention mass each token puts on the prompt at one layer, head-averaged (ssToken)
    "teacher_logits",  # reserved for distillation selectors (ESLM-KD)
})


@dataclass
class TokenStats:
    """Per-token evidence for one micro-batch. All tensors are `[B, T]` and aligned with `labels`.

    `valid` marks positions that carry a label (response tokens in SFT; not padding, not prompt).
    Statistics at invalid positions are 0 and must never be selected.
    """

    valid: Tensor
    loss: Tensor | None = None
    entropy: Tensor | None = None
    ref_loss: Tensor | None = None
    base_loss: Tensor | None = None
    his_loss: Tensor | None = None
    score_loss: Tensor | None = None
    score_entropy: Tensor | None = None
    attn_prompt: Tensor | None = None
    sample_ids: Tensor | None = None  # [B, T] dataset index of each position (-1 = padding); packed rows hold several
    step: int = 0    # optimizer step (global_step)
    total_steps: int = 0  # optimizer steps of the whole run (0 = unknown)
    micro: int = 0   # micro-batch index within the optimizer step (gradient accumulation)
    rank: int = 0    # data-parallel rank
    extras: dict = field(default_factory=dict)

    def generator(self, seed: int = 0, shared: bool = False) -> torch.Generator:
        """A CPU generator for this micro-batch: independent streams per (seed, step, micro-batch, rank);
        `shared=True` leaves the rank out (every rank draws the same stream: global-scope decisions)."""
        return selection_generator(seed, self.step, self.micro, 0 if shared else self.rank)

    def groups(self) -> Tensor | None:
        """`[B, T]` per-position sample ids when some row holds several samples (packing), else None."""
        ids = self.sample_ids
        if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.shape != self.valid.shape:
            return None
        real = ids.masked_fill(~self.valid.bool(), -1)
        lo = real.masked_fill(real < 0, torch.iinfo(real.dtype).max).amin(1)
        hi = real.amax(1)
        return ids if bool(((hi >= 0) & (lo != hi)).any()) else None

    def subset(self, rows: Tensor) -> TokenStats:
        """The same statistics restricted to the kept rows (after sample triage)."""
        def pick(v):
            return v[rows] if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == self.valid.shape[0] else v
        return replace(self, **{k: pick(getattr(self, k)) for k in self.__dataclass_fields__ if k != "extras"})


@dataclass
class Triage:
    """Output of `TokenSelector.triage`: which samples enter the trained forward, with prior weights."""

    keep_samples: Tensor             # [B] bool
    token_weights: Tensor | None = None  # [B, T] prior weights for the kept *and* dropped rows, or None = all ones
    info: dict = field(default_factory=dict)


class TokenSelector(nn.Module, abc.ABC):
    """Base class: map `TokenStats` to per-token weights `[B, T]`.

    Subclasses set `needs` and implement `select`; sample-level methods also override `triage`.
    The spine multiplies the returned weights with `valid`, so a selector cannot train on prompt
    or padding tokens even by mistake.
    """

    needs: ClassVar[frozenset[str]] = frozenset({"loss"})

    def __init__(self, scope: str = "batch") -> None:
        super().__init__()
        if scope not in ("batch", "sample", "global"):
            raise ValueError(f"{type(self).__name__}: scope={scope!r} must be one of 'batch', 'sample', 'global'")
        self.scope = scope

    @property
    def uses_triage(self) -> bool:
        return type(self).triage is not TokenSelector.triage

    def triage(self, stats: TokenStats) -> Triage:  # noqa: D401 - default: keep every sample
        return Triage(keep_samples=torch.ones(stats.valid.shape[0], dtype=torch.bool, device=stats.valid.device))

    @abc.abstractmethod
    def select(self, stats: TokenStats) -> Tensor:
        """Per-token weights `[B, T]` (0 = not trained on) from the batch's statistics."""

    def forward(self, stats: TokenStats) -> Tensor:
        missing = [k for k in self.needs if k in KNOWN_STATS and getattr(stats, k) is None]
        if missing:
            raise RuntimeError(f"{type(self).__name__} needs {missing} but the step did not provide them; "
                               "check the model's reference/history settings")
        w = self.select(stats)
        return w * stats.valid.to(w.dtype)

    # ---- shared ranking helpers -------------------------------------------------------------

    def topk_mask(self, score: Tensor, valid: Tensor, ratio: float, largest: bool = True,
                  stats: TokenStats | None = None) -> Tensor:
        """0/1 weights keeping the `ceil(ratio * n)` best-scored valid tokens, per `self.scope`.

        Ties break at random, never by position: the order among equal scores comes from `stats.generator`
        (seeded by step, micro-batch and rank, so a resumed run draws the same masks). "sample" scope ranks
        per original sample, also inside packed rows (`stats.groups()`).
        """
        gen = None
        if stats is not None:
            gen = stats.generator(getattr(self, "tie_seed", 0), shared=self.scope == "global")
        groups = stats.groups() if stats is not None and self.scope == "sample" else None
        return topk_mask(score, valid, ratio, scope=self.scope, largest=largest, generator=gen, groups=groups)


def sample_parts(valid: Tensor, groups: Tensor):
    """(row, `[T]` bool mask) for every original sample of a packed batch: its valid positions in that row."""
    for b in range(valid.shape[0]):
        for g in groups[b][valid[b]].unique().tolist():
            yield b, valid[b] & (groups[b] == g)


def selection_generator(seed: int, step: int = 0, micro: int = 0, rank: int = 0) -> torch.Generator:
    """CPU generator seeded by a hash of (seed, step, micro-batch, rank). A hash, not `seed + step`: seeds s
    and s + 1 must give unrelated streams, not one stream shifted by a step."""
    key = hashlib.blake2b(f"tokensel:{seed}:{step}:{micro}:{rank}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(key, "little") & ((1 << 63) - 1))


def order_random_ties(score: Tensor, descending: bool, generator: torch.Generator | None = None) -> Tensor:
    """1-D indices that sort `score`; equal scores come in a random (seeded) order, never in position order.
    `generator=None` uses a fixed seed (deterministic, still not positional)."""
    flat = score.reshape(-1)
    gen = generator if generator is not None else selection_generator(0)
    perm = torch.randperm(flat.numel(), generator=gen).to(flat.device)
    return perm[torch.sort(flat[perm], descending=descending, stable=True).indices]


def _gather_global(score: Tensor, valid: Tensor) -> tuple[Tensor, Tensor, int]:
    """All-gather flattened scores/validity across ranks; returns them plus this rank's offset."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return score.reshape(-1), valid.reshape(-1), 0
    n = torch.tensor([score.numel()], device=score.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    width = int(max(s.item() for s in sizes))
    pad_s = torch.full((width,), float("-inf"), device=score.device, dtype=score.dtype)
    pad_v = torch.zeros(width, device=score.device, dtype=torch.bool)
    pad_s[: score.numel()], pad_v[: score.numel()] = score.reshape(-1), valid.reshape(-1)
    all_s = [torch.empty_like(pad_s) for _ in sizes]
    all_v = [torch.empty_like(pad_v) for _ in sizes]
    dist.all_gather(all_s, pad_s)
    dist.all_gather(all_v, pad_v)
    rank = dist.get_rank()
    chunks_s = [s[: int(k.item())] for s, k in zip(all_s, sizes)]
    chunks_v = [v[: int(k.item())] for v, k in zip(all_v, sizes)]
    offset = sum(int(k.item()) for k in sizes[:rank])
    return torch.cat(chunks_s), torch.cat(chunks_v), offset


def _keep_top(score: Tensor, valid: Tensor, ratio: float, largest: bool,
              generator: torch.Generator | None = None) -> Tensor:
    """1-D: bool mask of the ceil(ratio * #valid) highest (or lowest) valid scores; random tie-break."""
    n_valid = int(valid.sum())
    k = min(n_valid, math.ceil(ratio * n_valid - 1e-9))
    keep = torch.zeros_like(valid)
    if k <= 0:
        return keep
    s = score.float().masked_fill(~valid, float("-inf") if largest else float("inf"))
    keep[order_random_ties(s, largest, generator)[:k]] = True
    return keep


def topk_mask(score: Tensor, valid: Tensor, ratio: float, scope: str = "batch", largest: bool = True,
              generator: torch.Generator | None = None, groups: Tensor | None = None) -> Tensor:
    """Functional form of `TokenSelector.topk_mask`: `[B, T]` float 0/1 weights.

    `groups` (`[B, T]` sample ids, scope "sample" only): rank within each (row, sample id) group, so a
    packed row's samples each keep their own share."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"keep ratio {ratio} must lie in [0, 1]")
    valid = valid.bool()
    if scope == "sample" and groups is not None:
        keep = torch.zeros_like(valid)
        for b, part in sample_parts(valid, groups):
            keep[b] |= _keep_top(score[b], part, ratio, largest, generator)
    elif scope == "sample":
        keep = torch.stack([_keep_top(score[b], valid[b], ratio, largest, generator) for b in range(score.shape[0])])
    elif scope == "global":
        all_s, all_v, off = _gather_global(score, valid)
        keep = _keep_top(all_s, all_v, ratio, largest, generator)[off: off + score.numel()].view_as(valid)
    else:
        keep = _keep_top(score.reshape(-1), valid.reshape(-1), ratio, largest, generator).view_as(valid)
    return keep.to(score.dtype if score.is_floating_point() else torch.float32)
