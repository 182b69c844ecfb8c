"""ViT classification with compute-side token selection: dense, Dynamic Tuning, SPA.

Two layers:

* `TokenselViTForImageClassification` (+ `TokenselViTConfig`, in `tokensel.modules.modeling_vit`): the
  transformers model. Registered with `AutoConfig` / `AutoModelForImageClassification` here (`import
  tokensel` does), and exported with its code and an `auto_map`, so an exported folder loads with
  `AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)` without tokensel, or
  without `trust_remote_code` after `import tokensel`.
* `ViTClassifier`: the LightningModule the recipes name. It builds the model from a backbone (a folder,
  a hub id, or `cache:<name>` in the tokensel cache; the small Fashion-MNIST ViT is pretrained on first
  use if missing), freezes what the fine-tuning mode says, adds each method's losses, logs `val/loss`,
  draws which patches every block keeps, and exports (`trainer export`).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor
from transformers import AutoConfig, AutoModelForImageClassification, ViTConfig, ViTForImageClassification

from tokensel.errors import ConfigError
from tokensel.modules.dynamic_tuning import activation_rate_loss, self_distillation_loss
from tokensel.modules.modeling_vit import (
    METHODS,
    TokenselViTConfig,
    TokenselViTForImageClassification,
    spa_layer_ids,
)
from tokensel.modules.spa import keep_rate_loss, patch_labels, selection_label_loss
from tokensel.trainer.export import save_hf
from tokensel.trainer.metrics import compute_eval_metrics, eval_metrics, update_mean
from tokensel.trainer.vision_data import image_processor_kwargs

log = logging.getLogger(__name__)
FINETUNE = ("full", "adapter", "head")
ARCH_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
             "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "layer_norm_eps",
             "image_size", "patch_size", "num_channels", "qkv_bias", "encoder_stride")
DEFAULT_BACKBONE = "cache:vit-tiny-fmnist"


# ---------------------------------------------------------------- HF registration ---------------------

AutoConfig.register(TokenselViTConfig.model_type, TokenselViTConfig, exist_ok=True)
AutoModelForImageClassification.register(TokenselViTConfig, TokenselViTForImageClassification, exist_ok=True)


def to_plain_vit(model: TokenselViTForImageClassification) -> ViTForImageClassification:
    """The same weights as a stock `ViTForImageClassification` (only valid without adapters/selectors)."""
    if model.adapters is not None or model.dispatchers is not None or model.gates is not None:
        raise ConfigError("only a dense model without adapters converts to a plain ViTForImageClassification")
    cfg = ViTConfig(**{k: getattr(model.config, k) for k in ARCH_KEYS}, id2label=dict(model.config.id2label))
    plain = ViTForImageClassification(cfg)
    plain.load_state_dict(model.state_dict(), strict=True)
    return plain.eval()


# ---------------------------------------------------------------- backbones and the cache ------------


def cache_dir() -> Path:
    """`$TOKENSEL_CACHE` or `~/.cache/tokensel` (the same rule as `tokensel.offline`)."""
    return Path(os.environ.get("TOKENSEL_CACHE", Path.home() / ".cache" / "tokensel"))


def resolve_backbone_path(spec: str) -> Path:
    """`cache:<name>` -> `<cache>/vit/<name>`; anything else is a path (or hub id) as given."""
    return cache_dir() / "vit" / spec.split(":", 1)[1] if spec.startswith("cache:") else Path(spec)


# The small ViT that stands in for an ImageNet checkpoint (no pretrained ViT is available offline):
# ViT-Tiny's width (192, 3 heads, MLP 768) at depth 4 on native 28x28 images, 4x4 patches (49 + CLS).
# Why this shape: with 50 tokens the MLP is ~64% of a block's multiply-adds, as in ViT-B/16 at 224^2
# (the setting of the Dynamic Tuning paper); an earlier width-128 model on 56x56 upsampled images (197
# tokens) spent most of its time in attention, which MLP skipping cannot touch.
# recipes/vit_pretrain.yaml uses exactly these settings; keep them in sync.
SMALL_VIT = dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3, intermediate_size=768,
                 image_size=28, patch_size=4, num_channels=1, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, layer_norm_eps=1e-6)
PRETRAIN_DATA = dict(dataset="fashion_mnist", image_size=28, batch_size=64, train_size=16000, val_size=2000,
                     mask_source="none")
# The schedule is `WarmupDecay` with warmup_overlap (the shape this backbone was first pretrained with): the cached
# backbone reproduces bit for bit (tests/unit/test_schedules.py checks the per-step lr against the former formula).
PRETRAIN_OPT = dict(lr=1e-3, weight_decay=0.05, epochs=4, warmup_steps=50, decay="cosine", warmup_overlap=True)


def load_backbone(spec: str | None, overrides: dict | None, pretrain_if_missing: bool, quiet: bool
                  ) -> tuple[ViTConfig, dict | None]:
    """(ViT config, backbone+head state dict or None) for `model.init_args.backbone`."""
    overrides = dict(overrides or {})
    if spec is None:
        if not quiet:
            log.warning("tokensel vit: backbone is null, starting from random init (fine for tiny tests; "
                        "adaptation results need a pretrained backbone, e.g. %s)", DEFAULT_BACKBONE)
        return ViTConfig(**{**SMALL_VIT, **overrides}), None
    path = resolve_backbone_path(spec)
    if spec.startswith("cache:") and not (path / "config.json").exists():
        if not pretrain_if_missing:
            log.warning("tokensel vit: %s not in the cache (%s) and pretrain_if_missing is false; random init",
                        spec, path)
            return ViTConfig(**{**SMALL_VIT, **overrides}), None
        log.warning("tokensel vit: %s not found in %s; pretraining it now on Fashion-MNIST, once (same settings "
                    "as recipes/vit_pretrain.yaml; ~5 min on 2 CPU cores)", spec, path)
        pretrain_backbone(path)
    try:
        src = ViTForImageClassification.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.init_args.backbone={spec}: cannot load a ViT from it ({str(e).splitlines()[0]}); "
                          f"give a local folder, a reachable hub id, or {DEFAULT_BACKBONE}") from None
    cfg = src.config
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg, src.state_dict()


def pretrain_backbone(out_dir: str | Path, max_steps: int = -1) -> Path:
    """Pretrain the small ViT on Fashion-MNIST (the `vit_pretrain` recipe's settings) into `out_dir`."""
    from lightning.pytorch import Trainer, seed_everything

    from tokensel.trainer.vision_data import ImageClassificationData

    seed_everything(0)  # as the recipe's seed_everything: 0
    model = _SelfOptimizingViT(method="dense", backbone=None, vit_config=SMALL_VIT, finetune="full",
                               adapter_bottleneck=0, pictures=0, save_backbone_to=str(out_dir))
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(max_epochs=PRETRAIN_OPT["epochs"], max_steps=max_steps, logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp,
                          limit_val_batches=4)
        trainer.fit(model, ImageClassificationData(**PRETRAIN_DATA))
    return Path(out_dir)


# ---------------------------------------------------------------- pictures ----------------------------


def save_keep_pictures(images: Tensor, masks: list[Tensor], layers: list[int], path: Path) -> Path | None:
    """PNG grid: one row per image, the input then each selective layer with dropped patches tinted blue.

    Args:
        images: `[K, C, H, W]` normalised inputs.
        masks: per selective layer, `[K, T]` keep masks (CLS first).
        layers: block index of each mask.
    """
    from tokensel._optional import MATPLOTLIB_AVAILABLE

    if not MATPLOTLIB_AVAILABLE:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k, _, h, w = images.shape
    img = images.float().mean(1)
    img = (img - img.amin((1, 2), keepdim=True)) / (img.amax((1, 2), keepdim=True) - img.amin((1, 2), keepdim=True)
                                                     + 1e-6)
    side = math.isqrt(masks[0].shape[1] - 1)
    fig, axes = plt.subplots(k, len(masks) + 1, figsize=(1.3 * (len(masks) + 1), 1.3 * k), squeeze=False)
    for r in range(k):
        axes[r, 0].imshow(img[r], cmap="gray", vmin=0, vmax=1)
        for c, (m, layer) in enumerate(zip(masks, layers), start=1):
            keep = m[r, 1:].float().view(1, 1, side, side)
            keep = F.interpolate(keep, size=(h, w), mode="nearest")[0, 0, ..., None]
            gray = img[r, ..., None].expand(h, w, 3)
            dropped = 0.4 * gray + 0.6 * torch.tensor([0.15, 0.3, 0.85])  # dropped patches tinted blue
            axes[r, c].imshow((keep * gray + (1 - keep) * dropped).clamp(0, 1).numpy())
            if r == 0:
                axes[r, c].set_title(f"block {layer}\n{100 * float(m[:, 1:].float().mean()):.0f}% kept", fontsize=7)
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- LightningModule ---------------------


class ViTClassifier(LightningModule):
    """Image classification with a transformers ViT backbone: dense, Dynamic Tuning or SPA.

    Args:
        method: "dense" (full fine-tune or the dense-adapter PEFT baseline), "dynamic_tuning", "spa".
        backbone: a folder with a ViT (`ViTForImageClassification`/`ViTModel`), a hub id, `cache:<name>`
            (`$TOKENSEL_CACHE/vit/<name>`; `cache:vit-tiny-fmnist` is pretrained on first use when
            `pretrain_if_missing`), or null for random init (tiny tests, pretraining from scratch).
        vit_config: ViTConfig fields; with a backbone only non-architectural ones make sense (dropout).
        num_labels: classes of the task (the head is new unless `reinit_head` is false and sizes match).
        finetune: "full" (everything trains), "adapter" (backbone frozen: adapters, selectors and head
            train), "head" (head and selectors only).
        adapter_bottleneck / adapter_scale / adapter_dropout / adapter_experts: parallel adapter in every
            block (0 = none); experts > 1 gives the MoE adapter.
        keep_rate: Dynamic Tuning's target activation rate r; SPA's top-k keep fraction, and in threshold
            mode without labels the target of SPA's rate loss.
        rate_weight: Dynamic Tuning's weight of `(mean keep - r)^2` (paper code: 2.0).
        tau / tau_end: Gumbel-sigmoid temperature of the dispatchers, annealed exponentially to `tau_end`
            over training when set (paper code: 5, constant).
        threshold: dispatcher keep threshold (0.5).
        calibrate_keep: Dynamic Tuning: learn, during training, per-block logit offsets so the hard inference
            rule keeps as many tokens as training does (`DynamicTuningDispatcher`; not in the paper, whose
            fixed threshold kept 0.76 at r = 0.7 in our benchmark). False: the paper's rule.
        complete_model_loss: add CE of the complete-model pass (the paper's L'_cls); costs a second forward.
        distill_weight: weight of KL(complete || dynamic) (paper: 1; 0 disables).
        spa_layers: SPA block indices (None: the deeper two thirds).
        spa_selection / spa_threshold / spa_tau / spa_fuse_previous / spa_soft_gate / spa_row_len: see
            `tokensel.modules.spa`. `spa_threshold` (threshold mode) keeps `sigmoid(score) > it` and is the
            soft-gate scale of a token at init (the gate bias starts at its logit). `spa_fuse_previous`
            max-fuses a gate's logits with the previous gate's own logits only where the token grid changes
            (the paper's stage-to-stage fusion): a plain ViT never changes it, so there every gate selects
            on its own logits.
        label_weight: alpha of the selection-label BCE on each SPA gate's own logits (needs `mask` in
            batches; 0 = no labels).
        spa_rate_weight: SPA without labels (`label_weight: 0`): weight of `(mean keep - keep_rate)^2` over
            batch, SPA blocks and patch tokens (Dynamic Tuning's rate loss; not in the SPA paper, whose
            sparsity comes from the labels). Unused when labels are on; identically 0 under top-k.
        kernels: SPA's pack/unpack back-end (auto | triton | torch); Dynamic Tuning uses torch index ops.
        pictures: sample images drawn at each validation end (0 = none).
        save_backbone_to: after fit, write the model as a plain ViT folder here (`cache:<name>` allowed):
            how the pretraining recipe fills the cache.
        pretrain_if_missing: pretrain `cache:vit-tiny-fmnist` when it is missing (else random init). A frozen
            backbone (finetune adapter / head) is not in checkpoints: resuming or exporting rebuilds it from
            `backbone` and refuses one whose fingerprint differs; with finetune full or a random-init backbone
            the checkpoint holds every weight.
    """

    def __init__(self, method: str = "dense", backbone: str | None = DEFAULT_BACKBONE, vit_config: dict | None = None,
                 num_labels: int = 10, finetune: str = "adapter", reinit_head: bool = True,
                 adapter_bottleneck: int = 16, adapter_scale: float = 1.0, adapter_dropout: float = 0.1,
                 adapter_experts: int = 1, keep_rate: float = 0.5, rate_weight: float = 2.0, tau: float = 5.0,
                 tau_end: float | None = None, threshold: float = 0.5, calibrate_keep: bool = False,
                 complete_model_loss: bool = True,
                 distill_weight: float = 1.0, spa_layers: list[int] | None = None, spa_selection: str = "threshold",
                 spa_threshold: float = 0.9, spa_tau: float = 1.0, spa_fuse_previous: bool = True,
                 spa_soft_gate: bool = True, spa_row_len: int | None = None, label_weight: float = 0.01,
                 spa_rate_weight: float = 2.0,
                 kernels: str | None = None, pictures: int = 8, save_backbone_to: str | None = None,
                 pretrain_if_missing: bool = True) -> None:
        super().__init__()
        self._validate(method, finetune, keep_rate, spa_selection, adapter_experts, spa_threshold)
        self.save_hyperparameters()
        base, state = load_backbone(backbone, vit_config, pretrain_if_missing, quiet=finetune == "full")
        cfg = TokenselViTConfig(
            **{k: getattr(base, k) for k in ARCH_KEYS}, num_labels=num_labels, selector=method,
            adapter_bottleneck=adapter_bottleneck, adapter_scale=adapter_scale, adapter_dropout=adapter_dropout,
            adapter_experts=adapter_experts, dispatcher_tau=tau, dispatcher_threshold=threshold,
            dispatcher_calibrate=calibrate_keep,
            spa_layers=spa_layer_ids(base, spa_layers), spa_selection=spa_selection, spa_keep_rate=keep_rate,
            spa_threshold=spa_threshold, spa_tau=spa_tau, spa_fuse_previous=spa_fuse_previous,
            spa_soft_gate=spa_soft_gate, spa_row_len=spa_row_len, kernels=kernels)
        self.model = TokenselViTForImageClassification(cfg)
        if state is not None:
            self._load_backbone_state(state, reinit_head)
        self._freeze(finetune)
        self._picture_batch: tuple[Tensor, list[Tensor], list[int]] | None = None

    @staticmethod
    def _validate(method, finetune, keep_rate, spa_selection, experts, spa_threshold=0.9) -> None:
        if method not in METHODS:
            raise ConfigError(f"model.init_args.method={method!r} is not one of {METHODS}")
        if finetune not in FINETUNE:
            raise ConfigError(f"model.init_args.finetune={finetune!r} is not one of {FINETUNE}")
        if not 0.0 < keep_rate <= 1.0:
            raise ConfigError(f"model.init_args.keep_rate={keep_rate} must lie in (0, 1]")
        if spa_selection not in ("threshold", "topk"):
            raise ConfigError(f"model.init_args.spa_selection={spa_selection!r} must be 'threshold' or 'topk'")
        if not 0.0 < spa_threshold < 1.0:
            raise ConfigError(f"model.init_args.spa_threshold={spa_threshold} must lie in (0, 1) (keep when "
                              "sigmoid(score) exceeds it)")
        if method == "spa" and experts > 1:
            raise ConfigError("model.init_args.adapter_experts > 1 (MoE adapter) routes per image and is a Dynamic "
                              "Tuning option; SPA packs tokens of several images per row: set adapter_experts: 1")

    def _load_backbone_state(self, state: dict, reinit_head: bool) -> None:
        head_ok = state.get("classifier.weight") is not None and \
            state["classifier.weight"].shape == self.model.classifier.weight.shape
        keep = {k: v for k, v in state.items() if k.startswith("vit.") or (k.startswith("classifier.") and head_ok
                                                                          and not reinit_head)}
        missing, unexpected = self.model.load_state_dict(keep, strict=False)
        bad = [k for k in missing if k.startswith("vit.")] + list(unexpected)
        if bad:
            raise ConfigError(f"model.init_args.backbone={self.hparams.backbone}: weights do not fit the ViT "
                              f"(e.g. {bad[:3]}); vit_config may only change non-architectural fields")

    def _freeze(self, finetune: str) -> None:
        """Freeze what the fine-tuning mode keeps fixed (the backbone, and for "head" the adapters too)."""
        self.model.requires_grad_(True)
        if finetune in ("adapter", "head"):
            self.model.vit.requires_grad_(False)
        if finetune == "head" and self.model.adapters is not None:
            self.model.adapters.requires_grad_(False)

    # ---- forward / steps ----

    @property
    def method(self) -> str:
        return self.hparams.method

    @property
    def eval_mode(self) -> str:
        # Dynamic Tuning evaluates like the paper's training model (hard mask x dense MLP); the exported
        # model skips for real and the round-trip test proves the logits agree. SPA always packs.
        return "mask" if self.method == "dynamic_tuning" else "skip"

    def forward(self, pixel_values: Tensor) -> Tensor:
        """Logits `[B, num_labels]` (training decisions in train mode, hard ones in eval)."""
        return self.model(pixel_values, mode=None if self.training else self.eval_mode).logits

    def _frozen_base_source(self) -> str:
        return f"backbone {self.hparams.backbone}"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """A frozen backbone (finetune adapter / head) loaded from `backbone` stays out of the checkpoint; its
        fingerprint stays in. A random-init backbone (null, or a cache entry that is missing) is kept: the
        config alone cannot rebuild it."""
        from tokensel.trainer.lean import strip_frozen

        spec = self.hparams.backbone
        if spec is None or (spec.startswith("cache:") and not (resolve_backbone_path(spec) / "config.json").exists()):
            return
        strip_frozen(self, checkpoint, self._frozen_base_source())

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A lean checkpoint gets the backbone this config built (after its fingerprint matches); checkpoints
        written before dispatchers had a keep offset load with offset 0 (the paper's rule)."""
        from tokensel.trainer.lean import restore_frozen

        restore_frozen(self, checkpoint, self._frozen_base_source())
        state = checkpoint.get("state_dict", {})
        for key, value in self.state_dict().items():
            if key.endswith(".offset") and key not in state:
                state[key] = torch.zeros_like(value)

    def _check_batch(self, batch: dict) -> None:
        size = self.model.config.image_size
        got = tuple(batch["pixel_values"].shape[-2:])
        if got != (size, size):
            raise ConfigError(f"model image_size={size} (backbone / vit_config.image_size) but "
                              f"data.init_args.image_size gives {got[0]}x{got[1]} images; make them equal")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if batch_idx == 0:
            self._check_batch(batch)
        self._anneal_tau()
        x, y = batch["pixel_values"], batch["labels"]
        out = self.model(x, mode="train")
        ce = F.cross_entropy(out.logits, y)
        loss, logs = ce, {"train/ce": ce, "train/acc": (out.logits.argmax(-1) == y).float().mean()}
        if self.method == "dynamic_tuning":
            loss = loss + self._dynamic_tuning_losses(x, y, out, logs)
        elif self.method == "spa":
            loss = loss + self._spa_losses(batch, out, logs)
        logs["train/loss"] = loss
        self.log_dict(logs, prog_bar=False, batch_size=y.shape[0])
        return loss

    def _dynamic_tuning_losses(self, x: Tensor, y: Tensor, out, logs: dict) -> Tensor:
        hp = self.hparams
        masks = torch.stack([m[:, 1:] for m in out.keep_masks], 1)  # [B, L, N], CLS dropped
        extra = activation_rate_loss(masks, hp.keep_rate, hp.rate_weight)
        logs["train/rate_loss"], logs["train/keep_rate"] = extra, masks.detach().mean()
        if hp.complete_model_loss or hp.distill_weight > 0:
            with torch.set_grad_enabled(hp.complete_model_loss):
                teacher = self.model(x, mode="complete").logits
            if hp.complete_model_loss:
                logs["train/complete_ce"] = F.cross_entropy(teacher, y)
                extra = extra + logs["train/complete_ce"]
            if hp.distill_weight > 0:
                logs["train/distill"] = self_distillation_loss(out.logits, teacher)
                extra = extra + hp.distill_weight * logs["train/distill"]
        return extra

    def _spa_losses(self, batch: dict, out, logs: dict) -> Tensor:
        """Labels on: alpha * BCE of each gate's own logits against the patch labels (the paper). Labels off:
        the keep-rate loss toward `keep_rate` (`spa_rate_weight`), the only sparsity pull threshold mode has."""
        hp = self.hparams
        logs["train/keep_rate"] = torch.stack([m[:, 1:].detach().float().mean() for m in out.keep_masks]).mean()
        if hp.label_weight <= 0:
            if hp.spa_rate_weight <= 0:
                return out.logits.new_zeros(())
            loss = keep_rate_loss(list(out.keep_masks), hp.keep_rate, hp.spa_rate_weight)
            logs["train/rate_loss"] = loss
            return loss
        if "mask" not in batch:
            raise ConfigError("model.init_args.label_weight > 0 needs selection masks in batches; set "
                              "data.init_args.mask_source (ink / column / boxes) or label_weight: 0")
        labels = patch_labels(batch["mask"], self.model.config.patch_size)
        loss = selection_label_loss(list(out.selector_logits), labels, self.hparams.label_weight)
        logs["train/label_loss"] = loss
        return loss

    def _anneal_tau(self) -> None:
        hp = self.hparams
        if hp.tau_end is None or self.model.dispatchers is None or self._trainer is None:
            return
        total = max(1, int(self.trainer.estimated_stepping_batches))
        tau = hp.tau * (hp.tau_end / hp.tau) ** min(1.0, self.global_step / total)
        for d in self.model.dispatchers:
            d.set_tau(tau)

    def _eval_step(self, batch: dict, batch_idx: int, prefix: str) -> Tensor:
        if batch_idx == 0:
            self._check_batch(batch)
        x, y = batch["pixel_values"], batch["labels"]
        out = self.model(x, mode=self.eval_mode)
        loss = F.cross_entropy(out.logits, y, reduction="none")
        # means over every image of the set and all ranks (padding copies of a rank's share weigh 0)
        values = {"loss": loss, "acc": (out.logits.argmax(-1) == y).float()}
        if out.keep_masks:  # each image's patch keep rate, averaged over the selective layers
            values["keep_rate"] = torch.stack([m[:, 1:].float().mean(1) for m in out.keep_masks]).mean(0)
        weight = batch.get("eval_weight")
        metrics = eval_metrics(self, prefix, list(values), sums=("images",))
        for k, v in values.items():
            update_mean(metrics[k], v, weight)
        update_mean(metrics["images"], weight.sum() if weight is not None else torch.tensor(float(y.numel())))
        if batch_idx == 0 and prefix == "val" and out.keep_masks and self.hparams.pictures > 0:
            k = self.hparams.pictures
            self._picture_batch = (x[:k].detach().cpu(), [m[:k].detach().cpu() for m in out.keep_masks],
                                   list(out.selective_layers))
        return loss.mean()

    def _log_eval(self, stage: str) -> None:
        for k, v in compute_eval_metrics(self, stage).items():  # already reduced over ranks
            self.log(f"{stage}/{k}", v, prog_bar=stage == "val", sync_dist=True)

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def validation_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self._eval_step(batch, batch_idx, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        return self(batch["pixel_values"]).argmax(-1)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")
        if self._picture_batch is None or self.trainer.sanity_checking:
            return
        images, masks, layers = self._picture_batch
        self._picture_batch = None
        # on every rank: under DDP `log_dir` is a broadcast, and rank 0 alone asking for it waited forever
        root = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        save_keep_pictures(images, masks, layers, root / "pictures" / f"keep_step{self.global_step:06d}.png")

    def on_fit_end(self) -> None:
        target = self.hparams.save_backbone_to
        if target and self.trainer.is_global_zero:
            path = resolve_backbone_path(target)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            to_plain_vit(self.model).save_pretrained(str(tmp))
            if path.exists():
                import shutil

                shutil.rmtree(path)
            os.replace(tmp, path)
            log.warning("tokensel vit: saved the trained backbone to %s", path)

    # ---- export ----

    def export_hf(self, out_dir: str, adapter_only: bool = False, datamodule=None, dtype: str | None = None) -> str:
        """Write config.json + model.safetensors + preprocessor_config.json (+ the model code).

        Dense models without adapters export as a stock `ViTForImageClassification`; everything else as
        `TokenselViTForImageClassification` (model_type `tokensel_vit`) with its code and an `auto_map`, so
        `AutoModelForImageClassification.from_pretrained(DIR, trust_remote_code=True)` runs the hard,
        compute-skipping path without tokensel. The image processor is transformers' `ViTImageProcessor`.
        """
        from transformers import ViTImageProcessor

        if adapter_only:
            raise ConfigError("export --adapter_only: ViT adapters are parallel modules with no PEFT adapter "
                              "format; export the full model (drop --adapter_only)")
        model = self.model.eval()
        if self.method == "dense" and model.adapters is None:
            save_hf(to_plain_vit(model), out_dir, dtype)
        else:
            save_hf(model, out_dir, dtype, remote_code="vit")
        if datamodule is not None and hasattr(datamodule, "image_processor_kwargs"):
            kwargs = datamodule.image_processor_kwargs()
        else:
            c = model.config.num_channels
            kwargs = image_processor_kwargs(model.config.image_size, [0.5] * c, [0.5] * c)
        ViTImageProcessor(**kwargs).save_pretrained(out_dir)
        return out_dir


class _SelfOptimizingViT(ViTClassifier):
    """ViTClassifier with its own optimizer and schedule (the pretraining helper runs without the CLI): AdamW and
    `WarmupDecay` as in `recipes/vit_pretrain.yaml`, stepped per optimizer step."""

    def configure_optimizers(self):
        from tokensel.trainer.schedules import WarmupDecay

        opt = torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=PRETRAIN_OPT["lr"],
                                weight_decay=PRETRAIN_OPT["weight_decay"])
        sched = WarmupDecay(opt, warmup_steps=PRETRAIN_OPT["warmup_steps"], decay=PRETRAIN_OPT["decay"],
                            warmup_overlap=PRETRAIN_OPT["warmup_overlap"],
                            total_steps=max(1, int(self.trainer.estimated_stepping_batches)))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


__all__ = ["ViTClassifier", "TokenselViTConfig", "TokenselViTForImageClassification", "spa_layer_ids", "to_plain_vit"]
