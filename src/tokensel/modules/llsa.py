"""LLSA self-attention layer (Log-linear Sparse Attention, Zhou et al., arXiv 2512.16615).

`LLSAttention` is a multi-head self-attention block (qkv projection, optional RMS qk-norm, output
projection) whose attention is hierarchical top-K sparse attention with KV enrichment:

* keys and values are mean-pooled `levels` times by `block_size`;
* the coarsest level is scored densely and keeps `top_k[-1]` blocks per pooled query; each finer
  level keeps `top_k[l-1]` among the children of the blocks kept above (hard top-K, no gradient);
* each query attends to the fine keys of its selected blocks plus the pooled keys of every level met
  during selection, a pooled key's logit raised by `log(block size)` (KV reweighting).

The selection adds no parameters, so `DenseAttention` (same parameters, full SDPA) and
`LLSAttention` load each other's weights: train dense and switch, or compare at equal steps.
Non-causal by default (the paper's setting); with `causal=True` no output reads a later token, neither
through the keys (a pooled key only once its whole block is past) nor through the block selection (a
block is chosen with the pooled query of the block before it; see `tokensel.kernels.llsa_reference`). Any
sequence length works (padding is masked, see `tokensel.kernels.llsa_reference`). The kernel
back-end follows `kernels=` / `TOKENSEL_KERNELS` (Triton on CUDA, PyTorch elsewhere).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

try:
    from tokensel.errors import ConfigError
    from tokensel.kernels.llsa import llsa_attention
    from tokensel.kernels.llsa_reference import validate_llsa_args
except ImportError:  # an exported copy run with trust_remote_code where tokensel is not installed: torch path
    from .errors import ConfigError
    from .llsa_reference import llsa_reference, validate_llsa_args

    def llsa_attention(q, k, v, levels=2, block_size=16, top_k=8, causal=False, enrich=True, reweight=True,
                       scale=None, backend=None):
        return llsa_reference(q, k, v, levels, block_size, top_k, causal, enrich, reweight, scale)


class LLSAttention(nn.Module):
    """Multi-head self-attention with LLSA.

    Args:
        dim: model width C (a multiple of `num_heads`).
        num_heads: attention heads H.
        levels: pooling levels L, 1 to 3 (paper: 1 below 16k tokens, 2 above).
        block_size: tokens per block B, a power of two (paper: 16).
        top_k: blocks kept per level; one int for all levels or a list, finest level first (paper: 8).
        causal: mask future tokens (not in the paper).
        enrich: hierarchical KV enrichment (pooled keys of every level); False = plain top-K blocks.
        reweight: add log(block size) to pooled-key logits (the paper's KV reweighting).
        qk_norm: RMS-normalise q and k per head (as the paper's RopeDiT).
        kernels: "auto" | "triton" | "torch" (None = auto; env TOKENSEL_KERNELS overrides).
    """

    def __init__(self, dim: int, num_heads: int = 4, levels: int = 2, block_size: int = 16,
                 top_k: int | list[int] = 8, causal: bool = False, enrich: bool = True, reweight: bool = True,
                 qk_norm: bool = True, kernels: str | None = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ConfigError(f"dim={dim} is not divisible by num_heads={num_heads}; pick a width that is")
        self.top_k = list(validate_llsa_args(levels, block_size, top_k))
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.levels, self.block_size = levels, block_size
        self.causal, self.enrich, self.reweight, self.kernels = causal, enrich, reweight, kernels
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """`q, k, v [B, H, N, Dh]` -> `[B, H, N, Dh]`."""
        return llsa_attention(q, k, v, levels=self.levels, block_size=self.block_size, top_k=self.top_k,
                              causal=self.causal, enrich=self.enrich, reweight=self.reweight, backend=self.kernels)

    def forward(self, x: Tensor) -> Tensor:
        """`x [B, N, C]` -> `[B, N, C]`."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        o = self.attend(self.q_norm(q), self.k_norm(k), v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, heads={self.num_heads}, levels={self.levels}, block_size={self.block_size}, "
                f"top_k={self.top_k}, causal={self.causal}, enrich={self.enrich}, reweight={self.reweight}")


class DenseAttention(LLSAttention):
    """The same layer with full attention (SDPA): the baseline, weight-compatible with `LLSAttention`."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.num_heads}, dense, causal={self.causal}"


__all__ = ["LLSAttention", "DenseAttention"]
