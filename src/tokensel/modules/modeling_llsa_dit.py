"""The Hugging Face model of the pixel-space DiT with LLSA or dense attention (`LLSADiTModel`).

`PixelDiT`: patch size 1, so a 32x32 image is 1,024 pixel tokens; fixed 2-D sin-cos position
embedding; AdaLN-zero blocks conditioned on the timestep (and the class label, if `num_classes`);
RMS qk-norm; attention `LLSAttention` or `DenseAttention` (same parameters). Tokens are put in
Z-order (`token_order: zorder`) so every run of 4^k consecutive tokens is a 2^k x 2^k square and a
block of B tokens pools a compact patch (the paper's 2-D reordering); outputs are put back in raster
order. Training (flow matching), data and sampling grids live in `tokensel.trainer.dit`.

This file, `llsa.py`, `kernels/llsa_reference.py` and `errors.py` are what an exported folder carries as
its model code (`auto_map`): they import only torch and transformers, and tokensel only under
`try/except ImportError` with a fallback to the bundled siblings (the PyTorch LLSA path). So
`AutoModel.from_pretrained(DIR, trust_remote_code=True)` runs the model where tokensel is not installed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from transformers import PretrainedConfig, PreTrainedModel

from .llsa import DenseAttention, LLSAttention

try:
    from tokensel.errors import ConfigError, DataError
except ImportError:  # an exported copy run with trust_remote_code where tokensel is not installed
    from .errors import ConfigError, DataError

ATTENTIONS = ("llsa", "dense")
TOKEN_ORDERS = ("zorder", "raster")

# ----------------------------------------------------------------------------------------------------
# Network
# ----------------------------------------------------------------------------------------------------


def sincos_2d(dim: int, size: int) -> Tensor:
    """Fixed 2-D sin-cos position embedding in raster order: `[size * size, dim]` (dim % 4 == 0)."""
    quarter = dim // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))
    ys, xs = torch.meshgrid(torch.arange(size, dtype=torch.float64), torch.arange(size, dtype=torch.float64),
                            indexing="ij")
    parts = []
    for coord in (ys.flatten(), xs.flatten()):
        ang = coord[:, None] * freqs[None, :]
        parts += [ang.sin(), ang.cos()]
    return torch.cat(parts, dim=1).float()


def zorder_permutation(size: int) -> Tensor:
    """Raster index of the token at each Z-order (Morton) position: `[size * size]` int64."""
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    code = torch.zeros_like(ys)
    for bit in range(max(1, math.ceil(math.log2(size)))):
        code |= ((xs >> bit) & 1) << (2 * bit) | ((ys >> bit) & 1) << (2 * bit + 1)
    return torch.argsort(code, stable=True)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of `t [B]` (scaled by 1000 so t in [0, 1] spans the usual DDPM range) -> `[B, dim]`."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    ang = (t.float() * 1000.0)[:, None] * freqs[None, :]
    return torch.cat([ang.cos(), ang.sin()], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """AdaLN modulation of `x [B, N, C]` by per-sample `shift, scale [B, C]`."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm transformer block with AdaLN-zero (attention and MLP gated per sample)."""

    def __init__(self, width: int, attn: nn.Module, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(width * mlp_ratio)
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = attn
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))
        nn.init.zeros_(self.ada[1].weight)  # AdaLN-zero: every block starts as the identity
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        """`x [B, N, C]`, conditioning `c [B, C]` -> `[B, N, C]`."""
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        x = x + g1[:, None] * self.attn(modulate(self.norm1(x), s1, sc1))
        return x + g2[:, None] * self.mlp(modulate(self.norm2(x), s2, sc2))


class PixelDiT(nn.Module):
    """DiT on raw pixels (patch size 1): `forward(x [B, C, S, S], t [B], y [B] | None) -> v [B, C, S, S]`.

    Args:
        image_size: S (tokens = S^2).
        in_channels: image channels.
        width, depth, num_heads, mlp_ratio: transformer size.
        num_classes: class-conditional with this many classes (0 = unconditional); label `num_classes`
            (or `y=None`) is the null class.
        attention: "llsa" or "dense".
        levels, block_size, top_k, enrich, reweight: LLSA settings (see `LLSAttention`).
        token_order: "zorder" (2-D locality for LLSA blocks) or "raster".
        kernels: LLSA back-end ("auto" | "triton" | "torch").
    """

    def __init__(self, image_size: int = 32, in_channels: int = 1, width: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10, attention: str = "llsa",
                 levels: int = 2, block_size: int = 8, top_k: int | list[int] = 4, enrich: bool = True,
                 reweight: bool = True, token_order: str = "zorder", kernels: str | None = None) -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ConfigError(f"model.attention={attention!r} is not one of {ATTENTIONS}")
        if token_order not in TOKEN_ORDERS:
            raise ConfigError(f"model.token_order={token_order!r} is not one of {TOKEN_ORDERS}")
        if width % 4 or width % num_heads:
            raise ConfigError(f"model.width={width} must be a multiple of 4 and of num_heads={num_heads}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        attn_cls = LLSAttention if attention == "llsa" else DenseAttention
        self.x_embed = nn.Linear(in_channels, width)
        self.t_embed = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.y_embed = nn.Embedding(num_classes + 1, width) if num_classes > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(width, attn_cls(width, num_heads, levels=levels, block_size=block_size, top_k=top_k,
                                     enrich=enrich, reweight=reweight, kernels=kernels), mlp_ratio)
            for _ in range(depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.out = nn.Linear(width, in_channels)
        for lin in (self.final_ada[1], self.out):  # zero output at init: v starts at 0
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        self.width, self.token_order = width, token_order
        self._layout_cache: tuple[Tensor, Tensor, Tensor] | None = None

    def layout(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """(position embedding `[S*S, C]`, token order `[S*S]`, its inverse), built on first use per device.

        Not buffers: transformers 5 builds models on the meta device and would leave non-persistent
        buffers uninitialised after `from_pretrained`; these are pure functions of the config.
        """
        if self._layout_cache is None or self._layout_cache[0].device != device:
            size = self.image_size
            perm = zorder_permutation(size) if self.token_order == "zorder" else torch.arange(size ** 2)
            self._layout_cache = (sincos_2d(self.width, size).to(device), perm.to(device),
                                  torch.argsort(perm).to(device))
        return self._layout_cache

    def condition(self, t: Tensor, y: Tensor | None) -> Tensor:
        """Per-sample conditioning vector `[B, C]` from the timestep and (optional) label."""
        c = self.t_embed(timestep_embedding(t, 256).to(self.x_embed.weight.dtype))
        if self.y_embed is not None:
            if y is None:
                y = torch.full((t.shape[0],), self.num_classes, device=t.device, dtype=torch.long)
            c = c + self.y_embed(y)
        return c

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        b, ch, s, _ = x.shape
        if s != self.image_size or ch != self.in_channels:
            raise DataError(f"PixelDiT expects [B, {self.in_channels}, {self.image_size}, {self.image_size}] images, "
                            f"got {list(x.shape)}")
        pos, perm, inv_perm = self.layout(x.device)
        tokens = self.x_embed(x.flatten(2).transpose(1, 2)) + pos.to(x.dtype)   # [B, S*S, C], raster order
        tokens = tokens[:, perm]                                                 # Z-order for LLSA blocks
        c = self.condition(t, y)
        for blk in self.blocks:
            tokens = blk(tokens, c)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.out(modulate(self.final_norm(tokens), shift, scale))[:, inv_perm]
        return out.transpose(1, 2).reshape(b, ch, s, s)

    @torch.no_grad()
    def sample(self, num: int, steps: int = 20, labels: Tensor | None = None, seed: int = 0) -> Tensor:
        """Euler integration of the flow from noise (t = 1) to data (t = 0): `[num, C, S, S]` in [-1, 1]."""
        dev = self.x_embed.weight.device
        gen = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randn(num, self.in_channels, self.image_size, self.image_size, generator=gen).to(dev)
        if labels is None and self.num_classes > 0:
            labels = torch.arange(num) % self.num_classes
        labels = labels.to(dev) if labels is not None else None
        for i in range(steps):
            t = torch.full((num,), 1.0 - i / steps, device=dev)
            x = x - self(x, t, labels) / steps
        return x.clamp(-1, 1)


NET_KEYS = ("image_size", "in_channels", "width", "depth", "num_heads", "mlp_ratio", "num_classes", "attention",
             "levels", "block_size", "top_k", "enrich", "reweight", "token_order")
CONFIG_NAMES = {"top_k": "llsa_top_k"}  # PixelDiT argument -> LLSADiTConfig attribute, where they differ


class LLSADiTConfig(PretrainedConfig):
    """Config of an exported `PixelDiT`: its arguments but the kernel back-end (`top_k` is `llsa_top_k`)."""

    model_type = "tokensel_llsa_dit"

    def __init__(self, image_size: int = 32, in_channels: int = 1, width: int = 128, depth: int = 4,
                 num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int = 10, attention: str = "llsa",
                 levels: int = 2, block_size: int = 8, llsa_top_k: int | list[int] = 4, enrich: bool = True,
                 reweight: bool = True, token_order: str = "zorder", sample_steps: int = 20, **kwargs) -> None:
        self.image_size, self.in_channels, self.width, self.depth = image_size, in_channels, width, depth
        self.num_heads, self.mlp_ratio, self.num_classes, self.attention = num_heads, mlp_ratio, num_classes, attention
        # `top_k` is a generation parameter to transformers (save_pretrained refuses it in a model config)
        self.levels, self.block_size, self.llsa_top_k = levels, block_size, llsa_top_k
        self.enrich, self.reweight, self.token_order = enrich, reweight, token_order
        self.sample_steps = sample_steps
        super().__init__(**kwargs)


class LLSADiTModel(PreTrainedModel):
    """Exported pixel DiT: `forward(x, t, y=None) -> velocity`; `sample(num, steps, labels, seed) -> images`."""

    config_class = LLSADiTConfig
    base_model_prefix = "net"
    main_input_name = "x"

    def __init__(self, config: LLSADiTConfig) -> None:
        super().__init__(config)
        self.net = PixelDiT(**{k: getattr(config, CONFIG_NAMES.get(k, k)) for k in NET_KEYS})
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """PixelDiT initialises itself (AdaLN-zero); loading overwrites every weight anyway."""

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        return self.net(x, t, y)

    @torch.no_grad()
    def sample(self, num: int = 16, steps: int | None = None, labels: Tensor | None = None, seed: int = 0) -> Tensor:
        return self.net.sample(num, steps or self.config.sample_steps, labels, seed)


__all__ = ["PixelDiT", "DiTBlock", "LLSADiTConfig", "LLSADiTModel", "sincos_2d", "zorder_permutation",
           "timestep_embedding", "modulate", "ATTENTIONS", "TOKEN_ORDERS", "NET_KEYS", "CONFIG_NAMES"]
