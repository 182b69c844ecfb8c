"""The Hugging Face model of a ViT with compute-side token selection: dense, Dynamic Tuning, SPA.

`TokenselViTForImageClassification` (+ `TokenselViTConfig`) is a transformers `PreTrainedModel` around a
`ViTModel` backbone with per-layer adapters, Dynamic Tuning dispatchers or SPA gates. The same class
trains (Gumbel decisions) and serves (hard decisions that skip compute: gathered MLP tokens for
Dynamic Tuning, packed rows for SPA).

This file, `dynamic_tuning.py`, `spa.py`, `kernels/pack.py` and `errors.py` are what an exported folder
carries as its model code (`auto_map`): they import only torch and transformers, and tokensel only under
`try/except ImportError` with a fallback to the bundled sibling files. So
`AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)` runs the pruned model
where tokensel is not installed (tests/integration/test_remote_code.py proves it). Keep it that way.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import Tensor, nn
from transformers import ViTConfig, ViTModel
from transformers.modeling_outputs import ImageClassifierOutput
from transformers.models.vit.modeling_vit import ViTPreTrainedModel

from .dynamic_tuning import DynamicTuningDispatcher, dense_block, dynamic_tuning_block, make_adapter
from .spa import SpaGate, default_row_len, spa_block

try:
    from tokensel.errors import ConfigError
except ImportError:  # an exported copy run with trust_remote_code where tokensel is not installed
    from .errors import ConfigError

METHODS = ("dense", "dynamic_tuning", "spa")


@strict
class TokenselViTConfig(ViTConfig):
    """`ViTConfig` plus the selector settings (`selector`: dense | dynamic_tuning | spa)."""

    model_type = "tokensel_vit"

    selector: str = "dense"
    adapter_bottleneck: int = 0            # 0 = no adapter
    adapter_scale: float | int = 1.0
    adapter_dropout: float | int = 0.1
    adapter_experts: int = 1               # > 1: MoE adapter (Dynamic Tuning)
    dispatcher_tau: float | int = 5.0
    dispatcher_threshold: float | int = 0.5
    dispatcher_calibrate: bool = False     # track the offset matching inference keep to training keep
    spa_layers: list[int] | None = None    # None: layers depth // 3 .. depth - 1
    spa_selection: str = "threshold"       # threshold | topk
    spa_keep_rate: float | int = 0.5      # topk: kept fraction (threshold: the rate loss's target, in training)
    spa_threshold: float | int = 0.9      # threshold: keep sigmoid(score) > it; gate bias starts at its logit
    spa_tau: float | int = 1.0
    spa_fuse_previous: bool = True        # max-fuse with the previous gate's own logits where the token grid
                                          # changes (paper: across stages); never fires in a plain ViT
    spa_soft_gate: bool = True            # selected tokens enter the block scaled by sigmoid(score)
    spa_row_len: int | None = None         # None: T (threshold) or whole images without padding (topk)
    inference_mode: str = "skip"           # eval path: skip (real skipping) | mask (masked dense reference)
    kernels: str | None = None             # SPA pack/unpack back-end: auto | triton | torch


@dataclass
class TokenselImageClassifierOutput(ImageClassifierOutput):
    """`ImageClassifierOutput` plus, per selective layer: keep masks `[B, T]` (straight-through in training),
    selector logits `[B, N]` (dispatcher logits / each SPA gate's own, unfused logits) and packed rows (SPA)."""

    keep_masks: tuple[Tensor, ...] | None = None
    selector_logits: tuple[Tensor, ...] | None = None
    packed_rows: tuple[int, ...] | None = None
    selective_layers: tuple[int, ...] | None = None


def spa_layer_ids(config: ViTConfig, layers: list[int] | None) -> list[int]:
    """SPA layers: as given, else the deeper two thirds (the paper selects only in deeper stages)."""
    depth = config.num_hidden_layers
    return sorted(layers) if layers is not None else list(range(depth // 3, depth))


class TokenselViTForImageClassification(ViTPreTrainedModel):
    """ViT classifier whose blocks may carry adapters, Dynamic Tuning dispatchers or SPA gates.

    `forward(pixel_values [B, C, H, W], labels=None, mode=None)`; `mode` defaults to "train" in training
    and `config.inference_mode` ("skip") in eval. Modes: "train", "mask", "skip", "complete" (Dynamic
    Tuning teacher: every token runs the MLP). Parameter names of the backbone and head equal
    `ViTForImageClassification`'s.
    """

    config_class = TokenselViTConfig
    config: TokenselViTConfig

    def __init__(self, config: TokenselViTConfig) -> None:
        super().__init__(config)
        if config.selector not in METHODS:
            raise ConfigError(f"selector={config.selector!r} is not one of {METHODS}")
        dim, depth = config.hidden_size, config.num_hidden_layers
        self.vit = ViTModel(config, add_pooling_layer=False)
        self.classifier = nn.Linear(dim, config.num_labels)
        self.adapters = None
        if config.adapter_bottleneck > 0:
            self.adapters = nn.ModuleList([
                make_adapter(dim, config.adapter_bottleneck, config.adapter_scale, config.adapter_dropout,
                             config.adapter_experts) for _ in range(depth)])
        self.dispatchers = self.gates = None
        if config.selector == "dynamic_tuning":
            self.dispatchers = nn.ModuleList([
                DynamicTuningDispatcher(dim, config.dispatcher_tau, config.dispatcher_threshold,
                                        calibrate=config.dispatcher_calibrate) for _ in range(depth)])
        elif config.selector == "spa":
            self.gates = nn.ModuleDict({str(i): SpaGate(
                dim, config.spa_selection, config.spa_keep_rate, config.spa_threshold, config.spa_tau,
                config.spa_fuse_previous) for i in spa_layer_ids(config, config.spa_layers)})
        self.post_init()
        self.reset_selector_parameters()

    def reset_selector_parameters(self) -> None:
        """Re-apply the selectors' own inits (zero adapter up-projection...), which HF's generic
        `_init_weights` in `post_init` overwrites with its Linear init."""
        for group in (self.adapters, self.dispatchers, self.gates):
            for m in (group.modules() if group is not None else ()):
                if m is not group and hasattr(m, "reset_parameters") and not isinstance(m, nn.Linear):
                    m.reset_parameters()

    def _init_weights(self, module: nn.Module) -> None:
        """HF's init, plus a zero keep offset for dispatchers: `from_pretrained` of a folder written before the
        offset existed would otherwise leave that buffer uninitialised (the paper's rule is offset 0)."""
        super()._init_weights(module)
        if isinstance(module, DynamicTuningDispatcher):
            module.offset.zero_()

    @property
    def num_tokens(self) -> int:
        return self.vit.embeddings.patch_embeddings.num_patches + 1

    def forward(self, pixel_values: Tensor, labels: Tensor | None = None, mode: str | None = None,
                interpolate_pos_encoding: bool | None = None, **kwargs) -> TokenselImageClassifierOutput:
        cfg = self.config
        mode = mode or ("train" if self.training else cfg.inference_mode)
        dtype = self.vit.embeddings.patch_embeddings.projection.weight.dtype
        x = self.vit.embeddings(pixel_values.to(dtype), interpolate_pos_encoding=bool(interpolate_pos_encoding))
        row_len = cfg.spa_row_len or default_row_len(x.shape[1], cfg.spa_keep_rate, cfg.spa_selection)
        masks, logits, rows, ids, prev = [], [], [], [], None
        for i, layer in enumerate(self.vit.layers):
            adapter = self.adapters[i] if self.adapters is not None else None
            if self.dispatchers is not None:
                x, m, lg = dynamic_tuning_block(layer, x, self.dispatchers[i], adapter, mode)
                r = 0
            elif self.gates is not None and str(i) in self.gates:
                if mode == "complete":
                    raise ValueError("mode='complete' is a Dynamic Tuning mode; SPA has no complete-model pass")
                x, m, lg, r = spa_block(layer, x, self.gates[str(i)], adapter, prev, mode, row_len,
                                        cfg.spa_soft_gate, cfg.kernels)
                prev = lg  # this gate's own (unfused) logits: the next gate fuses them only across a grid change
            else:
                x = dense_block(layer, x, adapter)
                continue
            masks.append(m)
            logits.append(lg)
            rows.append(r)
            ids.append(i)
        out = self.classifier(self.vit.layernorm(x)[:, 0])
        loss = F.cross_entropy(out, labels) if labels is not None else None
        return TokenselImageClassifierOutput(loss=loss, logits=out, keep_masks=tuple(masks),
                                             selector_logits=tuple(logits), packed_rows=tuple(rows),
                                             selective_layers=tuple(ids))


__all__ = ["TokenselViTConfig", "TokenselViTForImageClassification", "TokenselImageClassifierOutput",
           "spa_layer_ids", "METHODS"]
