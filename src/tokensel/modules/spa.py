"""SPA, Select and Pack Attention (Zhang, Li, Seo, Cao; arXiv 2410.23608; ICLR 2026 version "Enhancing
Vision Transformers for Object Detection via Context-Aware Token Selection and Packing").

A cheap gate scores the patch tokens of a block; the selected tokens of all images are packed into
dense rows of fixed length with a per-image block-diagonal attention mask, the whole block (attention,
MLP, adapter) runs on the packed rows, and the results are unpacked to their positions. Unselected
tokens skip the block unchanged. The gate is trained by the task loss (through the soft gate) and by
selection labels: BCE against a binary map of "tokens worth computing" (object boxes/masks in the paper;
here any mask from the dataset, e.g. the patches of a digit that contain ink).

Per SPA block, x: `[B, T = 1 + N, C]`::

    f   = Linear_C->1(x[:, 1:])                    # [B, N] the gate's own logits
    s   = max(f, resize(f_prev)) if the token grid changed since the previous SPA gate, else f
    x_g = sigmoid(s) * x                           # soft gate r_g = sigma(s) * r (CLS unscaled)
    m   = GumbelSoftmax(s) (train) | threshold or top-k (eval)   # hard 0/1, CLS always 1
    out = x;  out[m] = Block(pack(x_g[m]), block-diagonal mask)  # unpacked after
    L_select = alpha * sum_blocks mean_tokens BCE_with_logits(f, y)   # on each gate's own logits

No official code exists; what the notes could not pin down we chose and say so:
* The paper's backbone is a 4-stage Swin; we gate plain-ViT blocks from `start` on (the paper selects only
  in deeper stages: stages 3-4 of Swin-T are its last 8 of 12 blocks, hence default `start = depth // 3`).
* Max-fusion is the paper's multi-scale fusion with the previous *stage's* resized score map: it applies
  only where the token grid changes between two SPA gates, and it reads the previous gate's *own* logits
  `f_prev` (never an already-fused map, which would let scores only rise with depth). A plain ViT keeps
  its grid, so in our models the fusion never fires: every gate selects on its own logits. The switch
  (`fuse_previous`) is kept for backbones whose grid changes; `upsample_scores` does the resizing.
* Soft gate and keep threshold: `r_g = sigmoid(s) * r` is kept literally (it is how the task loss reaches
  the gate). In threshold mode a token is kept when `sigmoid(s) > threshold`, so a kept token is scaled by
  at least `threshold`; the gate bias starts at `logit(threshold)`, so at init about half the tokens are
  kept and each kept token enters the block scaled by ~`threshold`. With the default 0.9 a frozen
  pretrained backbone sees its tokens nearly unchanged (a 0.5 threshold with a zero bias would halve every
  kept token, and so the residual stream, in every SPA block). Gating only the block's update
  (`x + sigmoid(s) * (Block(x) - x)`) was the alternative; we kept the paper's form, which scales the token.
* Binary Gumbel-softmax over {keep, drop} with logits (s, 0) is a logistic perturbation of s: training keeps
  when `s + logistic > logit(threshold)` (so P(keep) = sigmoid(s - logit(threshold)) and the inference rule
  `s > logit(threshold)` is its median), with the straight-through gradient of
  `sigmoid((s + logistic - logit(threshold)) / tau)`. The paper lowers the Gumbel threshold to keep more
  (value not published): `threshold` is configurable. `selection="topk"` keeps a fixed fraction instead
  (Gumbel-perturbed top-k in training), which is what a keep-rate-controlled comparison needs.
* Unselected tokens pass through unchanged; the straight-through mask multiplies the block's update of the
  selected tokens, so the gate also gets a straight-through gradient.
* `L_select` sums the BCE over SPA blocks (paper) and averages over tokens (the paper's sum over tokens
  would only rescale alpha by N); alpha = 0.01 comes from one second-hand note and is unverified.
* Without labels (alpha = 0), threshold selection has no pull toward sparsity (the task loss favours
  keeping, and dropped tokens get no task gradient because packing never computes them): `keep_rate_loss`
  (Dynamic Tuning's `w * (mean keep - r)^2`, not in the SPA paper) supplies one.
* SPA's Swin containers may split an image across rows; we never do, so packed attention equals per-image
  attention over the selected tokens exactly (tested).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .dynamic_tuning import dense_block

try:
    from tokensel.kernels.pack import gather_rows, pack_tokens, scatter_rows
except ImportError:  # an exported copy run with trust_remote_code where tokensel is not installed: torch path
    from .pack import gather_rows, pack_tokens, scatter_rows

SELECTIONS = ("threshold", "topk")
SPA_MODES = ("train", "skip", "mask")
GATE_BIAS_INIT = 2.2  # logit of 0.9: the top-k gate's soft scale at init


def upsample_scores(prev: Tensor, n: int) -> Tensor:
    """Resize `[B, N']` scores on a square grid to `[B, n]` (nearest); identity when `N' == n`."""
    if prev.shape[1] == n:
        return prev
    side, prev_side = math.isqrt(n), math.isqrt(prev.shape[1])
    grid = prev.view(prev.shape[0], 1, prev_side, prev_side)
    return F.interpolate(grid, size=(side, side), mode="nearest").flatten(1)


def topk_keep(scores: Tensor, keep_rate: float) -> Tensor:
    """`[B, N]` bool keeping the `ceil(keep_rate * N)` (at least 1) highest scores of each row."""
    k = max(1, min(scores.shape[1], math.ceil(keep_rate * scores.shape[1] - 1e-9)))
    idx = scores.topk(k, dim=1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(1, idx, True)


class SpaGate(nn.Module):
    """Linear token gate with Gumbel selection in training and hard top-k / threshold at inference.

    Args:
        dim: token width C.
        selection: "threshold" (keep `sigmoid(s) > threshold`; variable counts per image) or "topk"
            (keep `ceil(keep_rate * N)` per image).
        keep_rate: fraction kept in "topk" mode.
        threshold: "threshold" mode keeps `sigmoid(s) > threshold` (in training `s` carries logistic noise);
            the bias starts at `logit(threshold)`, so this is also the soft-gate scale of a token at init.
        tau: Gumbel temperature (scales the straight-through gradient only).
        fuse_previous: max-fuse with the previous SPA gate's own (resized) logits where the token grid
            changes between the two gates (the paper's stage-to-stage fusion). A plain ViT never changes
            its grid, so there the switch has no effect.
        num_prefix: leading tokens always kept (CLS).
    """

    def __init__(self, dim: int, selection: str = "threshold", keep_rate: float = 0.5, threshold: float = 0.9,
                 tau: float = 1.0, fuse_previous: bool = True, num_prefix: int = 1) -> None:
        super().__init__()
        if selection not in SELECTIONS:
            raise ValueError(f"SpaGate: selection={selection!r} must be one of {SELECTIONS}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"SpaGate: threshold={threshold} must lie in (0, 1)")
        self.proj = nn.Linear(dim, 1)
        self.selection, self.keep_rate, self.threshold = selection, float(keep_rate), float(threshold)
        self.tau, self.fuse_previous, self.num_prefix = float(tau), bool(fuse_previous), int(num_prefix)
        self.reset_parameters()

    @property
    def cut(self) -> float:
        """The logit `logit(threshold)` above which "threshold" mode keeps a token."""
        return math.log(self.threshold / (1.0 - self.threshold))

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        # top-k selects by rank, so the bias only sets the soft gate's scale: sigmoid(2.2) = 0.9. With a
        # threshold the bias starts at the cut: about half kept, each kept token scaled by ~threshold.
        nn.init.constant_(self.proj.bias, GATE_BIAS_INIT if self.selection == "topk" else self.cut)

    def logits(self, x: Tensor) -> Tensor:
        """The gate's own logits `[B, N]` of the patch tokens of `x [B, T, C]` (no fusion)."""
        return self.proj(x[:, self.num_prefix:]).squeeze(-1)

    def fuse(self, own: Tensor, prev: Tensor | None = None) -> Tensor:
        """`max(own, resize(prev))` when fusing and the previous gate's grid differs from this one's; else `own`."""
        if self.fuse_previous and prev is not None and prev.shape[1] != own.shape[1]:
            return torch.maximum(own, upsample_scores(prev, own.shape[1]))
        return own

    def scores(self, x: Tensor, prev: Tensor | None = None) -> Tensor:
        """Selection scores `[B, N]`: the own logits of `x`, fused with `prev` (a previous gate's own logits)."""
        return self.fuse(self.logits(x), prev)

    def forward(self, x: Tensor, prev: Tensor | None = None, stochastic: bool = False
                ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (keep `[B, T]` 0/1 with CLS on, straight-through when stochastic; selection scores `[B, N]`;
        own logits `[B, N]`)."""
        own = self.logits(x)
        s = self.fuse(own, prev)
        if stochastic:
            u = torch.rand_like(s, dtype=torch.float32).clamp(1e-6, 1 - 1e-6)
            noisy = s + (torch.log(u) - torch.log1p(-u)).to(s.dtype)
            if self.selection == "topk":
                soft, hard = torch.sigmoid(noisy / self.tau), topk_keep(noisy, self.keep_rate)
            else:
                soft, hard = torch.sigmoid((noisy - self.cut) / self.tau), noisy > self.cut
            m = hard.to(s.dtype) - soft.detach() + soft
        elif self.selection == "topk":
            m = topk_keep(s, self.keep_rate).to(s.dtype)
        else:
            m = (s > self.cut).to(s.dtype)
        return torch.cat([m.new_ones(m.shape[0], self.num_prefix), m], dim=1), s, own


def default_row_len(tokens: int, keep_rate: float, selection: str) -> int:
    """Container length L: for top-k every image keeps the same count `c`, so `L = c * floor(T / c)`
    packs whole images with no padding; for threshold selection, `T` (any image fits)."""
    if selection != "topk":
        return tokens
    c = 1 + max(1, math.ceil(keep_rate * (tokens - 1) - 1e-9))
    return c * max(1, tokens // c)


def spa_block(layer: nn.Module, x: Tensor, gate: SpaGate, adapter: nn.Module | None = None,
              prev: Tensor | None = None, mode: str = "skip", row_len: int | None = None, soft_gate: bool = True,
              backend: str | None = None) -> tuple[Tensor, Tensor, Tensor, int]:
    """One SPA block on `x [B, T, C]`.

    Modes:
        "train": Gumbel selection (straight-through), packed computation.
        "skip": hard selection, packed computation (inference; really skips the unselected tokens).
        "mask": hard selection, dense computation with a per-image key mask (the reference the packed
            path is tested against; costs the full block).
    `prev`: the previous SPA gate's own logits (fused only where the grid changes, see `SpaGate.fuse`).
    The soft gate scales each selected token by `sigmoid(s)` of its (fused) selection score.
    Returns:
        (out `[B, T, C]`, keep `[B, T]`, the gate's own logits `[B, N]` (what the label loss and the next
        gate read), packed rows R (0 in "mask")).
    """
    if mode not in SPA_MODES:
        raise ValueError(f"spa_block: mode={mode!r} must be one of {SPA_MODES}")
    m, s, own = gate(x, prev, stochastic=mode == "train")
    keep = m > 0.5
    xin = x
    if soft_gate:
        xin = x * torch.cat([s.new_ones(s.shape[0], gate.num_prefix), torch.sigmoid(s)], 1)[..., None]
    if mode == "mask":
        eye = torch.eye(x.shape[1], dtype=torch.bool, device=x.device)
        attn_mask = (keep[:, None, :, None] & keep[:, None, None, :]) | eye  # selected attend to selected
        y = dense_block(layer, xin, adapter, attn_mask)
        return torch.where(keep[..., None], y, x), m, own, 0
    packed, layout = pack_tokens(xin, keep, row_len, backend)
    single = layout.rows == layout.batch and bool((layout.counts == layout.row_len).all())
    y = dense_block(layer, packed, adapter, None if single else layout.attention_mask())
    flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
    if mode == "train":  # straight-through: d out / d m = (y - x) on the selected tokens
        x_sel = gather_rows(flat_x, layout.index, backend)
        m_sel = gather_rows(m.reshape(-1, 1), layout.index, backend)
        flat_y = x_sel + m_sel * (flat_y - x_sel)
    return scatter_rows(flat_x, flat_y, layout.index, backend).view_as(x), m, own, layout.rows


def patch_labels(mask: Tensor, patch_size: int) -> Tensor:
    """Selection labels `[B, N]` (0/1 float) from a pixel map `[B, 1, H, W]`: 1 where a patch has any positive pixel."""
    return (F.max_pool2d(mask.float(), patch_size) > 0).flatten(1).float()


def selection_label_loss(scores: list[Tensor], labels: Tensor, weight: float = 0.01) -> Tensor:
    """`alpha * sum_blocks mean_tokens BCE(sigmoid(f), y)` over each SPA gate's own logits `f [B, N]`
    (labels `[B, N]`, shared by the blocks of one grid)."""
    if not scores:
        return labels.new_zeros(())
    total = sum(F.binary_cross_entropy_with_logits(s.float(), labels.float()) for s in scores)
    return weight * total


def keep_rate_loss(masks: list[Tensor], target: float = 0.5, weight: float = 2.0) -> Tensor:
    """`weight * (mean keep - target)^2`, one scalar over batch, SPA blocks and patch tokens.

    `masks` are the blocks' straight-through keep masks `[B, T]` (CLS first, dropped here): the forward
    value is the measured keep rate, the gradient reaches the gates. Dynamic Tuning's activation-rate loss,
    used for threshold selection without labels (not in the SPA paper); under top-k it is identically 0.
    It sets the *training* keep rate, whose expectation is `mean sigmoid(s - logit(threshold))`; the hard
    inference rule `s > logit(threshold)` can keep less when the logits bunch just below the cut (a gates-only
    run on random inputs: 0.2 in training, 0.04 at inference), the mismatch Dynamic Tuning's `calibrate` fixes.
    """
    if not masks:
        return torch.zeros(())
    kept = torch.cat([m[:, 1:].float().reshape(-1) for m in masks])
    return weight * (kept.mean() - target) ** 2


__all__ = ["SpaGate", "spa_block", "patch_labels", "selection_label_loss", "keep_rate_loss", "upsample_scores",
           "topk_keep", "default_row_len"]
