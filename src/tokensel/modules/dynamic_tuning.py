"""Dynamic Tuning (Zhao et al., "Dynamic Tuning Towards Parameter and Inference Efficiency for ViT
Adaptation", NeurIPS 2024, arXiv 2403.11808): a token dispatcher per block decides which tokens run the
block's MLP; an adapter sees every token. Named in full on purpose: "DyT" also means Dynamic Tanh.

One block (the paper's best "MLP dispatch" variant), x: `[B, T = 1 + N, C]`::

    h = x + Attn(LN1(x))                      # attention on all tokens
    m = GumbelSigmoid(Linear_C->1(h[:, 1:]))  # [B, N] hard 0/1, straight-through; CLS forced to 1
    out = h + Adapter(h) + m * MLP(LN2(h))    # dropped tokens skip only the MLP

Training computes the MLP on every token and multiplies by `m` (the straight-through gradient of a
dropped token needs its MLP output). Inference thresholds `sigmoid(logit) > 0.5` and runs the MLP on the
gathered kept tokens only, scattering the results back (`mode="skip"`); `mode="mask"` is the masked
dense computation the paper's training model uses in eval, and gives the same values.

Defaults follow the official code where it and the paper agree: tau = 5 (constant in the code; the
paper also ablates a 5 -> 0.1 schedule, available here as `tau_end` in the Lightning module), threshold
0.5, dispatcher init trunc-normal(0.02) with zero bias, rate-loss weight 2.0 and target r = 0.5,
adapter zero-initialised up-projection (outputs exactly 0 at init), ReLU, dropout 0.1, scale 1.

The MoE adapter is not in the released code (its issue #3 asks for it). We follow the paper's
description: a routing layer produces weights alpha over N adapter experts and the output is their
alpha-weighted combination. We route per image (from mean-pooled tokens) and merge the experts in
weight space, so the cost stays that of one adapter; the per-image routing is our reading, not verified
against released code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODES = ("train", "mask", "skip", "complete")


# ---------------------------------------------------------------- ViT layer helpers -------------------
# They read the weights of a transformers 5 `ViTLayer` (q/k/v/o_proj, mlp.fc1/fc2, layernorm_before/
# after) so the same code runs dense, on gathered tokens, and on packed rows with a block mask.


def vit_attention(layer: nn.Module, h: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """Multi-head self-attention of a ViT layer on `h [R, L, C]`; `attn_mask [R, 1, L, L]` bool (True = attend)."""
    att = layer.attention
    r, n, _ = h.shape
    heads, hd = att.num_attention_heads, att.head_dim
    q, k, v = (p(h).view(r, n, heads, hd).transpose(1, 2) for p in (att.q_proj, att.k_proj, att.v_proj))
    drop = att.attention_dropout if att.training else 0.0
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop, scale=att.scaling)
    return att.o_proj(o.transpose(1, 2).reshape(r, n, heads * hd))


def attention_residual(layer: nn.Module, x: Tensor, attn_mask: Tensor | None = None) -> Tensor:
    """`x + Attn(LN1(x))`, the first half of a pre-norm ViT block, `[R, L, C]`."""
    return x + layer.dropout(vit_attention(layer, layer.layernorm_before(x), attn_mask))


def vit_mlp(layer: nn.Module, h: Tensor) -> Tensor:
    """`MLP(LN2(h))` of a ViT layer on any `[..., C]` (token-wise, so gathered rows work)."""
    return layer.dropout(layer.mlp(layer.layernorm_after(h)))


def dense_block(layer: nn.Module, x: Tensor, adapter: nn.Module | None = None,
                attn_mask: Tensor | None = None) -> Tensor:
    """A plain ViT block plus an optional parallel adapter: `h + Adapter(h) + MLP(LN2(h))`, `[R, L, C]`."""
    h = attention_residual(layer, x, attn_mask)
    out = h + vit_mlp(layer, h)
    return out + adapter(h) if adapter is not None else out


# ---------------------------------------------------------------- dispatcher --------------------------


def gumbel_sigmoid(logits: Tensor, tau: float = 5.0, threshold: float = 0.5, hard: bool = True,
                   generator: torch.Generator | None = None) -> Tensor:
    """Binary Gumbel-softmax: `sigmoid((logits + g1 - g2) / tau)` with g1, g2 ~ Gumbel(0, 1).

    The difference of two Gumbels is logistic noise `log u - log(1 - u)`. With `hard`, the forward value
    is `1[y > threshold]` and the gradient is that of `y` (straight-through). Returns the shape of `logits`.
    """
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    u = u.clamp(1e-6, 1 - 1e-6)
    noise = (torch.log(u) - torch.log1p(-u)).to(logits.dtype)
    y = torch.sigmoid((logits + noise) / tau)
    if not hard:
        return y
    y_hard = (y > threshold).to(y.dtype)
    return y_hard - y.detach() + y


class DynamicTuningDispatcher(nn.Module):
    """Per-block token dispatcher: `Linear(C -> 1)` on the patch tokens, then a keep decision.

    Args:
        dim: token width C.
        tau: Gumbel-sigmoid temperature (official code: 5, constant); `set_tau` anneals it.
        threshold: keep when the (noisy, in training) sigmoid exceeds it; 0.5 as in the paper.
        num_prefix: leading tokens always kept (CLS).
        calibrate: track, during training, the logit `offset` at which the hard inference rule keeps as
            many tokens as training does (see below); False keeps the paper's rule exactly (offset 0).
        momentum: EMA momentum of that offset (per training step).

    Why calibrate: training keeps a token with probability `sigmoid(logit)` (logistic noise), inference
    when `logit > 0`. The rate loss fixes the *mean* of `sigmoid(logit)`, so a dispatcher that stays
    undecided (logits near +0.5 for every token) keeps ~60% in training but ~90% at inference: we saw
    trained models keep 0.57 at r = 0.5 and 0.76 at r = 0.7 at inference. With `calibrate`, the offset is an
    EMA over training batches of the `1 - mean(sigmoid(logit))` quantile of the logits, and inference keeps
    `logit > offset`;
    the per-token decisions stay data-dependent thresholds. It is a buffer, so checkpoints and exported
    models carry it. Not in the paper.
    """

    def __init__(self, dim: int, tau: float = 5.0, threshold: float = 0.5, num_prefix: int = 1,
                 calibrate: bool = False, momentum: float = 0.9) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        self.tau, self.threshold, self.num_prefix = float(tau), float(threshold), int(num_prefix)
        self.calibrate, self.momentum = bool(calibrate), float(momentum)
        self.register_buffer("offset", torch.zeros(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)
        self.offset.zero_()

    def set_tau(self, tau: float) -> None:
        self.tau = float(tau)

    @torch.no_grad()
    def _track_offset(self, logits: Tensor) -> None:
        lg = logits.detach().float().flatten()
        rate = torch.sigmoid(lg).mean()
        quantile = torch.quantile(lg, (1 - rate).clamp(0, 1))
        self.offset.lerp_(quantile.to(self.offset.dtype), 1 - self.momentum)

    def forward(self, x: Tensor, stochastic: bool) -> tuple[Tensor, Tensor]:
        """`x [B, T, C]` -> (mask `[B, T]` 0/1 with prefix forced on, straight-through when stochastic;
        logits `[B, T - num_prefix]`)."""
        logits = self.proj(x[:, self.num_prefix:]).squeeze(-1)
        if stochastic:
            m = gumbel_sigmoid(logits, self.tau, self.threshold)
            if self.calibrate and self.training:
                self._track_offset(logits)
        else:
            m = (torch.sigmoid(logits - self.offset) > self.threshold).to(x.dtype)
        ones = m.new_ones(m.shape[0], self.num_prefix)
        return torch.cat([ones, m], dim=1), logits


# ---------------------------------------------------------------- adapters ----------------------------


class BottleneckAdapter(nn.Module):
    """AdaptFormer-style parallel adapter `s * Up(Dropout(ReLU(Down(x))))`, zero output at init.

    Args:
        dim: token width C.
        bottleneck: hidden width d (paper: 16 on VTAB-1K, 64 on full datasets).
        scale: output scale s.
        dropout: on the bottleneck activations (paper: 0.1).
    """

    def __init__(self, dim: int, bottleneck: int = 16, scale: float = 1.0, dropout: float = 0.1) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck)
        self.up = nn.Linear(bottleneck, dim)
        self.drop = nn.Dropout(dropout)
        self.scale = float(scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)  # the adapted model starts exactly at the backbone
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.up(self.drop(F.relu(self.down(x)))) * self.scale


class MoEAdapter(nn.Module):
    """Mixture-of-experts adapter: per-image routing over `num_experts` bottleneck adapters, merged in
    weight space (`W = sum_e alpha_e W_e`) so the token cost is one adapter's.

    Args:
        dim, bottleneck, scale, dropout: as `BottleneckAdapter`.
        num_experts: N (paper: 4 for dense prediction and video).
    Forward: `x [B, T, C]` (whole images; routing pools over T) -> `[B, T, C]`.
    """

    def __init__(self, dim: int, bottleneck: int = 16, num_experts: int = 4, scale: float = 1.0,
                 dropout: float = 0.1) -> None:
        super().__init__()
        self.router = nn.Linear(dim, num_experts)
        self.down_weight = nn.Parameter(torch.empty(num_experts, bottleneck, dim))
        self.down_bias = nn.Parameter(torch.zeros(num_experts, bottleneck))
        self.up_weight = nn.Parameter(torch.zeros(num_experts, dim, bottleneck))
        self.up_bias = nn.Parameter(torch.zeros(num_experts, dim))
        self.drop = nn.Dropout(dropout)
        self.scale = float(scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for w in self.down_weight:
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))
        for p in (self.down_bias, self.up_weight, self.up_bias):
            nn.init.zeros_(p)
        nn.init.zeros_(self.router.weight)  # uniform routing at init
        nn.init.zeros_(self.router.bias)

    def forward(self, x: Tensor) -> Tensor:
        alpha = torch.softmax(self.router(x.mean(1)), dim=-1)              # [B, E]
        wd = torch.einsum("be,erc->brc", alpha, self.down_weight)          # [B, d, C]
        wu = torch.einsum("be,ecr->bcr", alpha, self.up_weight)            # [B, C, d]
        h = F.relu(torch.bmm(x, wd.transpose(1, 2)) + (alpha @ self.down_bias)[:, None])
        out = torch.bmm(self.drop(h), wu.transpose(1, 2)) + (alpha @ self.up_bias)[:, None]
        return out * self.scale


def make_adapter(dim: int, bottleneck: int, scale: float = 1.0, dropout: float = 0.1, experts: int = 1
                 ) -> nn.Module | None:
    """A `BottleneckAdapter`, a `MoEAdapter` when `experts > 1`, or None when `bottleneck == 0`."""
    if bottleneck <= 0:
        return None
    if experts > 1:
        return MoEAdapter(dim, bottleneck, experts, scale, dropout)
    return BottleneckAdapter(dim, bottleneck, scale, dropout)


# ---------------------------------------------------------------- block -------------------------------


def dynamic_tuning_block(layer: nn.Module, x: Tensor, dispatcher: DynamicTuningDispatcher,
                         adapter: nn.Module | None = None, mode: str = "mask"
                         ) -> tuple[Tensor, Tensor, Tensor | None]:
    """One Dynamic Tuning block on `x [B, T, C]`.

    Modes:
        "train": Gumbel-sigmoid straight-through mask, MLP on all tokens times the mask.
        "mask": hard mask, MLP on all tokens times the mask (the paper's eval path).
        "skip": hard mask, MLP on the gathered kept tokens only, scattered back (real skipping).
        "complete": every token runs the MLP (the self-distillation teacher).
    Returns:
        (out `[B, T, C]`, mask `[B, T]` (ones in "complete"), dispatcher logits `[B, N]` or None).
    """
    if mode not in MODES:
        raise ValueError(f"dynamic_tuning_block: mode={mode!r} must be one of {MODES}")
    h = attention_residual(layer, x)
    base = h + adapter(h) if adapter is not None else h
    if mode == "complete":
        return base + vit_mlp(layer, h), h.new_ones(h.shape[:2]), None
    m, logits = dispatcher(h, stochastic=mode == "train")
    if mode == "skip":
        return skip_mlp(layer, h, base, m > 0.5), m, logits
    return base + m[..., None] * vit_mlp(layer, h), m, logits


def skip_mlp(layer: nn.Module, h: Tensor, base: Tensor, keep: Tensor) -> Tensor:
    """`base + keep * MLP(LN2(h))` computing the MLP only on kept tokens (gather -> MLP -> add back).

    Tokens of all images are flattened together: the MLP is token-wise, so no attention mask is needed.
    Every index is valid here (no padding slots, unlike SPA's packed rows), so torch's native
    `index_select` / `index_add` do it on CPU and CUDA alike; without autograd the add goes in place into
    `base` (a fresh tensor made by the block), which saves a copy of the whole activation per block.
    """
    c = h.shape[-1]
    idx = keep.reshape(-1).nonzero().squeeze(1)
    flat_base = base.reshape(-1, c)
    upd = vit_mlp(layer, h.reshape(-1, c).index_select(0, idx)).to(base.dtype)
    if torch.is_grad_enabled() and (base.requires_grad or upd.requires_grad):
        return flat_base.index_add(0, idx, upd).view_as(base)
    return flat_base.index_add_(0, idx, upd).view_as(base)


# ---------------------------------------------------------------- losses ------------------------------


def activation_rate_loss(masks: Tensor, target: float = 0.5, weight: float = 2.0) -> Tensor:
    """`weight * (mean(masks) - target)^2`: one scalar rate over batch, layers and patch tokens.

    `masks` are the straight-through dispatcher masks without CLS, any shape (e.g. `[B, L, N]`), so the
    forward value is the measured keep rate and the gradient reaches the dispatchers.
    """
    return weight * (masks.float().mean() - target) ** 2


def self_distillation_loss(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """`KL(softmax(teacher.detach()) || softmax(student))`, batch mean (the complete model teaches the dynamic one)."""
    return F.kl_div(F.log_softmax(student_logits.float(), -1), F.log_softmax(teacher_logits.detach().float(), -1),
                    log_target=True, reduction="batchmean")


__all__ = [
    "DynamicTuningDispatcher", "BottleneckAdapter", "MoEAdapter", "make_adapter", "gumbel_sigmoid",
    "dynamic_tuning_block", "skip_mlp", "dense_block", "attention_residual", "vit_attention", "vit_mlp",
    "activation_rate_loss", "self_distillation_loss",
]
