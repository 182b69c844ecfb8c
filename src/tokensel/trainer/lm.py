"""`SelectiveLM`: causal-LM fine-tuning / pretraining where a selector decides which tokens train.

One step (see DESIGN.md):
    scoring pass (no grad; only for the statistics the selector `needs`)
 -> sample triage (selectors that override `triage` drop whole samples before the trained forward)
 -> trained forward -> last hidden states -> per-token (loss, entropy) through one linear-CE op
 -> selector(TokenStats) -> weights w -> loss = sum(w * loss) / normaliser -> backward
The LM head never materialises `[tokens, vocab]` logits: the op works on chunks of rows, and only the
labelled rows are sent to it.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from lightning.pytorch import LightningModule
from torch import Tensor

from tokensel.errors import ConfigError
from tokensel.kernels import linear_cross_entropy
from tokensel.losses import NORMALISERS, weighted_token_loss
from tokensel.losses.distill import Distill, token_kl
from tokensel.modules.attention_probe import AttentionProbe
from tokensel.modules.base import TokenSelector, TokenStats
from tokensel.modules.basic import FullSelection
from tokensel.offline import TINY_TOKENIZER, resolve_model, resolve_tokenizer
from tokensel.trainer.export import save_hf
from tokensel.trainer.metrics import compute_eval_metrics, eval_metrics, update_mean
from tokensel.trainer.report import SelectionReport
from tokensel.trainer.strategies import call_in_module
from tokensel.trainer.token_cache import TokenStatsCache

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass
class LoRA:
    """LoRA adapters through peft.

    Attributes:
        r: rank. alpha: scaling numerator (scale = alpha / r). dropout: on the adapter input.
        target_modules: module names, or "all-linear".
    """

    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | str = field(default="all-linear")


def load_tokenizer(name: str | None):
    """A tokenizer from a folder / hub id (resolved offline like models); None = the shipped tiny one."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_tokenizer(name) if name else TINY_TOKENIZER)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def _looks_like_path(name: str) -> bool:
    """A local path rather than a hub id (`org/name`): absolute, relative, or deeper than one slash."""
    return name.startswith(("/", ".", "~")) or name.count("/") >= 2 or "\\" in name


def _unwrap(model):
    """The transformers model under a peft wrapper, if any."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def backbone_and_head(model):
    """(decoder backbone returning last hidden states, LM-head weight [V, H], bias or None, softcap)."""
    base = _unwrap(model)
    backbone = getattr(base, base.base_model_prefix)
    head = base.get_output_embeddings()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    return backbone, head.weight, getattr(head, "bias", None), softcap


class SelectiveLM(LightningModule):
    """Causal LM trained on the tokens a selector picks.

    Args:
        model: hub id or local folder (`HuggingFaceTB/SmolLM2-135M-Instruct` resolves to the offline copy
            when the hub is unreachable). Ignored when `model_config` is given.
        model_config: build a fresh model from a config dict instead (e.g. `{model_type: llama,
            hidden_size: 32, ...}`): tiny test models and pretraining from scratch.
        tokenizer: tokenizer folder / id; default the model's own (the shipped tiny tokenizer with `model_config`).
        selector: which tokens train (`FullSelection`, `RandomSelection`, `Rho1Selection`, ...).
        normaliser: "selected" (mean over selected tokens), "valid" or "global_selected" (across ranks).
        lora: LoRA settings, or null for full fine-tuning.
        gradient_checkpointing: recompute activations in backward (less memory, ~30% more time).
        reference_model: frozen reference model for `ref_loss` (Rho-1), loaded like `model`; "initial" =
            a frozen copy of the starting weights.
        reference_losses: or a cache of per-token reference losses (`TokenStatsCache` file).
        base_losses: a cache of per-token base-model losses (static Rho-1: `StaticRho1Selection`).
        history: source of `his_loss` (ssToken): "base" = the model with LoRA disabled, "ema" = an EMA copy of
            the trainable weights (updated after each optimizer step), "cached" = `history_losses`.
        ema_decay: decay of the EMA history (`history: ema`): his <- decay * his + (1 - decay) * theta.
        history_losses: cache file for `history: cached`. Caches are read when training starts, so
            `trainer predict` can write them with the same recipe.
        distill: knowledge distillation (ESLM-KD): the per-token loss trained (and seen by the selector as
            `loss`) becomes alpha * KL(teacher || student) + (1 - alpha) * CE; null = plain CE.
        report: a `SelectionReport` callback (HTML of kept tokens + keep-ratio / score plots), attached
            through `configure_callbacks`; null = none.
        kernels: LM-head backend, "auto" | "triton" | "torch" (env TOKENSEL_KERNELS overrides).
        chunk_size: rows per chunk in the torch LM-head op (memory vs. speed).
        dtype: model weights dtype ("float32", "bfloat16", ...).
        attn_implementation: "sdpa" (default), "eager" or "flex_attention" (each gets the packed block mask in
            the form it reads); kernels without 4-D masks (flash_attention_2, ...) refuse `packing: true`.
    """

    def __init__(self, model: str = "HuggingFaceTB/SmolLM2-135M-Instruct", model_config: dict | None = None,
                 tokenizer: str | None = None, selector: TokenSelector | None = None,
                 normaliser: Literal["selected", "valid", "global_selected"] = "selected",
                 lora: LoRA | None = None, gradient_checkpointing: bool = False,
                 reference_model: str | None = None, reference_losses: str | None = None,
                 history: Literal["none", "base", "ema", "cached"] = "none", history_losses: str | None = None,
                 base_losses: str | None = None,
                 ema_decay: float = 0.999, distill: Distill | None = None,
                 report: SelectionReport | None = None,
                 kernels: Literal["auto", "triton", "torch"] = "auto", chunk_size: int = 2048,
                 dtype: str = "float32", attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if normaliser not in NORMALISERS:
            raise ConfigError(f"model.normaliser={normaliser!r}: use one of {NORMALISERS}")
        self.save_hyperparameters(ignore=["selector", "report"])
        self.report = report
        self.selector = selector if selector is not None else FullSelection()
        from tokensel.trainer.base_trainer import log_hparams, selector_hparams

        log_hparams(self, selector_hparams(self.selector))  # hparams.yaml and every logger name the selector
        self.model_name, self.model_config = model, model_config
        self.normaliser, self.kernels, self.chunk_size = normaliser, kernels, chunk_size
        self.dtype_name, self.attn_implementation = dtype, attn_implementation
        self.lora, self.history = lora, history
        self.model = self._build_model()
        self.tokenizer = load_tokenizer(tokenizer or (None if model_config else self._resolved_model))
        if reference_model == "initial" and selector is not None and "ref_loss" in selector.needs:
            raise ConfigError(
                f"model.reference_model=initial: {type(selector).__name__} needs a trained reference model; a "
                "copy of the start weights makes the excess loss 0 at step 0 and then keeps the tokens whose "
                "loss went up. Train one with `trainer fit --config recipes/rho1_reference.yaml` and set "
                "model.reference_model to its export folder")
        self.reference = (self._load_reference(reference_model, "model.reference_model")
                          if reference_model else None)
        # cache files, opened at their first use (fit start): `trainer predict` writes them with this recipe
        self.cache_paths = {"reference_losses": reference_losses, "history_losses": history_losses,
                            "base_losses": base_losses}
        self._caches: dict[str, TokenStatsCache] = {}
        if not 0.0 <= ema_decay < 1.0:
            raise ConfigError(f"model.ema_decay={ema_decay} must lie in [0, 1)")
        self.ema_decay, self.distill = ema_decay, distill
        self._ema: dict[str, Tensor] | None = None
        self._window_selected = 0.0  # selected weight of the current optimizer step (global_selected)
        self._ema_step = 0
        self._micro = 0  # micro-batch index within the optimizer step (set by training_step)
        self.total_steps = 0  # run length for schedules inside selectors; 0 = from the trainer
        self.manual_step = 0  # the optimizer step when a script steps the module without a Trainer
        self.teacher = self._load_reference(distill.teacher, "model.distill.teacher") if distill is not None else None
        self._check_selector_inputs()
        # Frozen reference weights are rebuilt from the config on load, never stored in checkpoints.
        self.checkpoint_skip_prefixes = ("reference.", "teacher.")
        self.strict_loading = False
        if gradient_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if lora is not None:
                self.model.enable_input_require_grads()

    # ------------------------------------------------------------------ building

    def _torch_dtype(self):
        try:
            return getattr(torch, self.dtype_name)
        except AttributeError:
            raise ConfigError(f"model.dtype={self.dtype_name!r}: use float32, bfloat16 or float16") from None

    def _build_model(self):
        from transformers import AutoConfig, AutoModelForCausalLM

        if self.model_config is not None:
            cfg = dict(self.model_config)
            kind = cfg.pop("model_type", None)
            if kind is None:
                raise ConfigError("model.model_config needs a model_type (e.g. llama, gpt2)")
            config = AutoConfig.for_model(kind, **cfg)
            config._attn_implementation = self.attn_implementation
            torch.manual_seed(cfg.get("seed", 0))  # same init whatever came before: resumable, comparable
            model = AutoModelForCausalLM.from_config(config, dtype=self._torch_dtype())
            self._resolved_model = None
        else:
            self._resolved_model = resolve_model(self.model_name)
            model = AutoModelForCausalLM.from_pretrained(self._resolved_model, dtype=self._torch_dtype(),
                                                         attn_implementation=self.attn_implementation)
        if self.lora is not None:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=self.lora.r, lora_alpha=self.lora.alpha, lora_dropout=self.lora.dropout,
                             target_modules=self.lora.target_modules, task_type="CAUSAL_LM")
            model = get_peft_model(model, cfg)
        return model

    def _load_reference(self, name: str, key: str = "model.reference_model"):
        """A frozen model for reference / teacher losses; "initial" = a snapshot of the starting weights."""
        from transformers import AutoModelForCausalLM

        if name == "initial":  # a frozen snapshot of the starting weights (base model before fine-tuning)
            ref = copy.deepcopy(_unwrap(self.model))
            if self.lora is not None:
                ref = copy.deepcopy(self.model).merge_and_unload()
        else:
            if _looks_like_path(name) and not Path(name).expanduser().is_dir():
                how = ("`trainer fit --config recipes/rho1_reference.yaml` (trains the reference model on its "
                       "curated split and exports it there)" if key == "model.reference_model"
                       else "`trainer export --config RECIPE --ckpt_path last --out DIR`")
                raise ConfigError(f"{key}={name}: no such folder; make it first with {how}")
            ref = AutoModelForCausalLM.from_pretrained(resolve_model(name), dtype=self._torch_dtype())
            self._check_same_vocabulary(ref, name, key)
        ref.requires_grad_(False).eval()
        return ref

    def _check_same_vocabulary(self, ref, name: str, key: str) -> None:
        """Reference / teacher losses are compared token by token: the vocabularies must be the same."""
        mine = _unwrap(self.model).get_output_embeddings().weight.shape[0]
        theirs = ref.get_output_embeddings().weight.shape[0]
        if mine != theirs:
            raise ConfigError(f"{key}={name}: its vocabulary has {theirs} rows, the model's {mine}; the "
                              "reference must use the model's tokenizer")
        folder = resolve_model(name)
        try:
            from transformers import AutoTokenizer

            ref_tok = AutoTokenizer.from_pretrained(folder)
        except (OSError, ValueError):  # a folder without tokenizer files: the row count is all we can check
            return
        if ref_tok.get_vocab() != self.tokenizer.get_vocab():
            diff = len(set(ref_tok.get_vocab().items()) ^ set(self.tokenizer.get_vocab().items()))
            raise ConfigError(f"{key}={name}: its tokenizer differs from the model's ({diff} vocabulary entries "
                              "differ); per-token losses would not line up. Train the reference with the "
                              "model's tokenizer")

    def _check_selector_inputs(self) -> None:
        needs = self.selector.needs
        sel = type(self.selector).__name__
        if "ref_loss" in needs and self.reference is None and self.cache_paths["reference_losses"] is None:
            raise ConfigError(f"{sel} needs reference losses: set model.reference_model (a model folder / id) "
                              "or model.reference_losses (a cached per-token loss file)")
        if "base_loss" in needs and self.cache_paths["base_losses"] is None:
            raise ConfigError(f"{sel} needs cached base-model losses: set model.base_losses (written by "
                              "`trainer predict` with the TokenStatsWriter callback)")
        if "his_loss" in needs:
            if self.history == "base" and self.lora is None:
                raise ConfigError(f"{sel}: model.history=base uses the model with LoRA disabled, so model.lora "
                                  "must be set (or use history: cached with model.history_losses)")
            if self.history == "cached" and self.cache_paths["history_losses"] is None:
                raise ConfigError(f"{sel}: model.history=cached needs model.history_losses (a cache file)")
            if self.history == "none":
                raise ConfigError(f"{sel} needs history losses: set model.history to base, ema or cached")

    def configure_callbacks(self):
        return [self.report] if self.report is not None else []

    def configure_optimizers(self):
        """Default AdamW on trainable parameters; recipes normally set `optimizer:` in the CLI instead."""
        return torch.optim.AdamW([p for p in self.parameters() if p.requires_grad], lr=1e-4)

    # ------------------------------------------------------------------ per-token statistics

    def token_stats(self, model, batch: dict, grad: bool, rows_out: dict | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
        """Per-token (loss, entropy, valid) `[B, T]` of `model` on `batch`; position t holds the loss of
        predicting token t (so position 0 is never valid). Only labelled rows reach the LM head.
        `rows_out`, if given, receives the labelled rows' hidden states and their (b, t) indices."""
        labels = batch["labels"]
        valid = labels != IGNORE
        valid[:, 0] = False
        backbone, weight, bias, softcap = backbone_and_head(model)
        from tokensel.trainer.data import model_attention_mask  # packed: the mask form this attention reads

        mask = model_attention_mask(batch, backbone)
        with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
            hidden = backbone(input_ids=batch["input_ids"], attention_mask=mask,
                              position_ids=batch.get("position_ids")).last_hidden_state
            b, t = valid.nonzero(as_tuple=True)
            # ZeRO-3: run the fused op inside the head module's call, so DeepSpeed gathers the sharded head
            # weight for it and again for its backward (a no-op wrapper otherwise)
            loss_r, ent_r, _ = call_in_module(_unwrap(model).get_output_embeddings(), linear_cross_entropy,
                                              hidden[b, t - 1], weight, labels[b, t], bias=bias,
                                              softcap=softcap, backend=self.kernels, chunk_size=self.chunk_size)
            if rows_out is not None:
                rows_out.update(hidden=hidden[b, t - 1], b=b, t=t)
        zeros = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
        loss = zeros.index_put((b, t), loss_r)
        entropy = zeros.index_put((b, t), ent_r.detach())
        return loss, entropy, valid

    def cache(self, key: str) -> TokenStatsCache | None:
        """The cache named by `model.<key>` (reference_losses, history_losses, base_losses), opened once."""
        path = self.cache_paths[key]
        if path is None:
            return None
        if key not in self._caches:
            self._caches[key] = TokenStatsCache.load(path, role=f"model.{key}")
        return self._caches[key]

    @property
    def reference_cache(self) -> TokenStatsCache | None:
        return self.cache("reference_losses")

    @property
    def history_cache(self) -> TokenStatsCache | None:
        return self.cache("history_losses")

    def setup(self, stage: str) -> None:
        """Open the caches the selector reads before the first step, so a missing one stops the run at once
        (`trainer predict`, which writes them, does not need them)."""
        if stage == "fit":
            needs = self.selector.needs
            for key, stat in (("reference_losses", "ref_loss"), ("base_losses", "base_loss"),
                              ("history_losses", "his_loss")):
                if stat in needs:
                    self.cache(key)

    def _cached(self, cache: TokenStatsCache, batch: dict) -> Tensor:
        """Cached per-token values `[B, T]` for `batch`. The first use compares the cache's fingerprint with
        this run's (tokenizer, data files and settings; for history losses also the model: a reference-loss
        cache comes from another model by design); every use checks each sample's token hash, and a labelled
        token the cache lacks is an error naming the cache and the sample, never a silent 0."""
        if not cache.checked:
            from tokensel.trainer.token_cache import run_fingerprint

            trainer = self._trainer
            dm = getattr(trainer, "datamodule", None) if trainer is not None else None
            cache.check_fingerprint(run_fingerprint(self, dm, trainer, content=False),
                                    compare_model=cache.role in ("model.history_losses", "model.base_losses"))
        return cache.lookup_batch(batch).to(batch["labels"].device)

    def pre_stats(self, batch: dict, needs: frozenset[str]) -> dict[str, Tensor]:
        """No-grad statistics the selector needs before / beside the trained forward."""
        out: dict[str, Tensor] = {}
        with torch.no_grad():
            if "ref_loss" in needs:
                out["ref_loss"] = (self._cached(self.reference_cache, batch) if self.reference_cache is not None
                                   else self.token_stats(self.reference, batch, grad=False)[0])
            if "base_loss" in needs:
                out["base_loss"] = self._cached(self.cache("base_losses"), batch)
            if "his_loss" in needs:
                if self.history == "cached":
                    out["his_loss"] = self._cached(self.history_cache, batch)
                elif self.history == "ema":
                    with self._ema_weights():
                        out["his_loss"] = self.token_stats(self.model, batch, grad=False)[0]
                else:
                    with self.model.disable_adapter():
                        out["his_loss"] = self.token_stats(self.model, batch, grad=False)[0]
            if needs & {"score_loss", "score_entropy"}:
                if getattr(self.selector, "score_span", "answer") == "all":
                    out.update(self._score_all_positions(batch))
                else:
                    out["score_loss"], out["score_entropy"], _ = self.token_stats(self.model, batch, grad=False)
        return out

    def _score_all_positions(self, batch: dict) -> dict:
        """Scoring pass whose entropy covers every non-pad position from 1 on (prompt included), for selectors
        with `score_span = "all"` (Q-Tuning's released code); the loss stays on the labelled positions."""
        real = batch["sample_index"] >= 0 if "sample_index" in batch else batch["attention_mask"].bool()
        span = real.clone()
        span[:, 0] = False
        if "sample_index" in batch:  # a packed row's next sample does not predict from the previous one
            span[:, 1:] &= batch["sample_index"][:, 1:] == batch["sample_index"][:, :-1]
        labelled = batch["labels"] != IGNORE
        loss, entropy, _ = self.token_stats(self.model, {**batch, "labels": batch["input_ids"].masked_fill(
            ~span, IGNORE)}, grad=False)
        labelled[:, 0] = False
        return {"score_loss": loss * labelled, "score_entropy": entropy * span,
                "extras": {"score_entropy_mask": span}}

    # ------------------------------------------------------------------ the step

    def selective_step(self, batch: dict) -> dict:
        """Scoring pass -> triage -> trained forward -> selection -> weighted loss. Returns loss and logs."""
        sel = self.selector
        valid0 = batch["labels"] != IGNORE
        valid0[:, 0] = False
        step = int(self.global_step) if self._trainer is not None else int(self.manual_step)
        pre = self.pre_stats(batch, sel.needs | ({"score_loss", "score_entropy"} if sel.uses_triage else frozenset()))
        stats = TokenStats(valid=valid0, sample_ids=batch.get("sample_index"), step=step,
                           micro=self._micro, rank=int(self.global_rank), total_steps=self.run_steps(),
                           **pre)
        prior = None
        n_samples = batch["labels"].shape[0]
        if sel.uses_triage:
            tri = sel.triage(stats)
            keep = tri.keep_samples.nonzero().squeeze(1)
            batch = {k: v[keep] for k, v in batch.items()}
            stats = stats.subset(keep)
            prior = tri.token_weights[keep] if tri.token_weights is not None else None
        if batch["labels"].shape[0] == 0:
            # Every sample triaged away. The peers still run the forward (ZeRO-3 parameter gathers), the
            # normaliser's all_reduce and the gradient reduction, so this rank takes the same path on one
            # dummy row (token 0, one label at position 1) with prior weight 0: it adds 0 to the loss, to the
            # selected count, to keep_ratio and to samples_kept.
            from dataclasses import replace

            T = batch["labels"].shape[1]
            dummy = {}
            for k, v in batch.items():
                if not isinstance(v, Tensor) or v.dim() == 0:
                    dummy[k] = v
                elif k == "attention_mask_4d":
                    dummy[k] = torch.tril(torch.ones(T, T, device=v.device)).to(v.dtype)[None, None]
                elif k in ("position_ids", "token_index"):
                    dummy[k] = torch.arange(T, device=v.device, dtype=v.dtype)[None]
                elif k in ("attention_mask", "sample_index", "labels"):
                    dummy[k] = v.new_full((1, *v.shape[1:]), {"attention_mask": 1, "sample_index": -1}.get(k, IGNORE))
                else:
                    dummy[k] = v.new_zeros((1, *v.shape[1:]))
            dummy["labels"][0, min(1, T - 1)] = 0
            batch = dummy
            stats = replace(stats, **{f: getattr(stats, f).new_zeros((1, *getattr(stats, f).shape[1:]))
                                      for f in stats.__dataclass_fields__
                                      if isinstance(getattr(stats, f), Tensor) and getattr(stats, f).dim() >= 1
                                      and getattr(stats, f).shape[0] == 0})
            if "sample_index" in batch and isinstance(stats.sample_ids, Tensor):
                stats.sample_ids = batch["sample_index"]
            prior = torch.zeros(batch["labels"].shape, device=batch["labels"].device)
            n_samples = float("inf")  # samples_kept = 1 / inf = 0: the dummy row is no sample
        probe = AttentionProbe(self.model, getattr(sel, "attn_layer", -1)) if "attn_prompt" in sel.needs else None
        rows: dict | None = {} if self.distill is not None else None
        with probe if probe is not None else contextlib.nullcontext():
            loss_tok, entropy, valid = self.token_stats(self.model, batch, grad=True, rows_out=rows)
        if probe is not None:  # one layer's attention recomputed without grad; the forward kept SDPA
            stats.attn_prompt = probe.prompt_mass(batch["labels"], batch.get("attention_mask"),
                                                  batch.get("sample_index"), row=getattr(sel, "attn_row", "t"))
        if self.distill is not None:
            loss_tok = self._distill_token_loss(batch, loss_tok, rows)
        stats.loss, stats.entropy, stats.valid = loss_tok.detach(), entropy, valid
        w = sel(stats)
        if prior is not None:
            w = w * prior
        score = getattr(sel, "last_score", None)
        if not (isinstance(score, Tensor) and score.shape == w.shape):
            score = stats.loss
        self.last_selection = {"input_ids": batch["input_ids"], "valid": valid, "weights": w.detach(),
                               "score": score.detach()}
        if self._step_normalised():
            # divided by the optimizer step's selected total in on_before_optimizer_step (unknown until then)
            loss, denom = (w * loss_tok).sum(), w.sum().detach()
            self._window_selected += float(denom)
            # shown: this micro-batch normalised by its count over ranks (mean over ranks = the global loss)
            shown = weighted_token_loss(loss_tok.detach(), w.detach(), valid, "global_selected")[0]
        else:
            loss, denom = weighted_token_loss(loss_tok, w, valid, self.normaliser)
            shown = loss.detach()
        n_valid = valid0.sum().clamp_min(1)
        return {"loss": loss, "shown_loss": shown, "keep_ratio": float((w > 0).sum() / n_valid),
                "selected": float(denom),
                "samples_kept": batch["labels"].shape[0] / n_samples,
                "full_loss": float(loss_tok.detach().sum() / valid.sum().clamp_min(1)),
                "forward_tokens": int(batch["labels"].numel()),
                "trained_tokens": int(((w != 0) & valid).sum())}

    def run_steps(self) -> int:
        """Optimizer steps of the whole run (0 = unknown): `total_steps` when set by hand (scripts that step
        the module themselves), else the trainer's max_steps, else its estimate from the epochs."""
        if self.total_steps:
            return int(self.total_steps)
        trainer = self._trainer
        if trainer is None:
            return 0
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        try:
            est = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no loaders yet, or an infinite run
            return 0
        return int(est) if est != float("inf") else 0

    def _step_normalised(self) -> bool:
        """normaliser global_selected divides by the selected weight of the whole optimizer step: every
        data-parallel rank and every accumulated micro-batch. That count is only known after the last
        micro-batch, so each micro-batch backpropagates its raw sum and `on_before_optimizer_step` scales
        the gradients (exact: the gradient is linear in the loss). DeepSpeed owns its gradient buffers, so
        there `weighted_token_loss` divides per micro-batch by the count across ranks instead."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        trainer = self._trainer
        return (self.normaliser == "global_selected" and trainer is not None
                and not isinstance(trainer.strategy, DeepSpeedStrategy))

    def on_before_optimizer_step(self, optimizer) -> None:
        """Scale gradients to sum(w * loss) / (selected weight over all ranks and micro-batches).

        Lightning divided each micro-batch loss by `accumulate_grad_batches` (A) and DDP averaged over the
        world size (W), so the gradients hold sum(w * loss) / (A * W); multiply by A * W / total. Runs
        before gradient clipping, so clipping sees the true gradient."""
        if not self._step_normalised():
            return
        total = torch.tensor(self._window_selected, dtype=torch.float64, device=self.device)
        self._window_selected = 0.0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(total)
        scale = (self.trainer.accumulate_grad_batches * self.trainer.world_size / float(total)
                 if float(total) > 0 else 0.0)
        for p in self.parameters():
            if p.grad is not None:
                p.grad.mul_(scale)

    def _distill_token_loss(self, batch: dict, ce: Tensor, rows: dict) -> Tensor:
        """alpha * KL(teacher || student) + (1 - alpha) * CE per labelled token `[B, T]` (differentiable)."""
        d = self.distill
        b, t = rows["b"], rows["t"]
        _, weight, bias, _ = backbone_and_head(self.model)
        t_backbone, t_weight, t_bias, _ = backbone_and_head(self.teacher)
        from tokensel.trainer.data import model_attention_mask  # the teacher's own attention implementation

        mask = model_attention_mask(batch, t_backbone)
        with torch.no_grad():
            t_hidden = t_backbone(input_ids=batch["input_ids"], attention_mask=mask,
                                  position_ids=batch.get("position_ids")).last_hidden_state[b, t - 1]
        # ZeRO-3: both heads' weights are sharded; run the KL as the student head's and then the teacher head's
        # forward, so DeepSpeed gathers each (and the student's again for the backward). Plain calls otherwise.
        s_head, t_head = _unwrap(self.model).get_output_embeddings(), _unwrap(self.teacher).get_output_embeddings()

        def kl(hidden: Tensor, teacher_hidden: Tensor) -> Tensor:
            return call_in_module(t_head, token_kl, hidden, weight, teacher_hidden, t_weight, d.temperature,
                                  d.chunk_size, bias, t_bias)
        kd = call_in_module(s_head, kl, rows["hidden"], t_hidden)
        kd_full = torch.zeros(ce.shape, dtype=kd.dtype, device=ce.device).index_put((b, t), kd)
        return d.alpha * kd_full + (1 - d.alpha) * ce

    # ------------------------------------------------------------------ EMA history (ssToken Eq. 4)

    def _ema_state(self) -> dict[str, Tensor]:
        if self._ema is None:
            self._ema = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        return self._ema

    @contextlib.contextmanager
    def _ema_weights(self):
        """Swap the EMA copy into the trainable weights (no grad), then restore them."""
        ema = self._ema_state()
        params = dict(self.model.named_parameters())
        saved = {}
        with torch.no_grad():
            for n, v in ema.items():
                saved[n] = params[n].detach().clone()
                params[n].copy_(v.to(params[n].device))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, v in saved.items():
                    params[n].copy_(v)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        """After an optimizer step: his <- decay * his + (1 - decay) * theta (history: ema)."""
        if self.history != "ema" or int(self.global_step) == self._ema_step:
            return
        self._ema_step = int(self.global_step)
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, v in self._ema_state().items():
                v.mul_(self.ema_decay).add_(params[n].detach().to(v.device), alpha=1 - self.ema_decay)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        """A lean checkpoint (no frozen base) gets the base this config built, after its fingerprint matches."""
        from tokensel.trainer.lean import restore_frozen

        restore_frozen(self, checkpoint, self.frozen_base_source(), self.checkpoint_skip_prefixes)
        if "ema_history" in checkpoint:
            self._ema = {k: v.clone() for k, v in checkpoint["ema_history"]["weights"].items()}
            self._ema_step = int(checkpoint["ema_history"]["step"])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        # micro-batch index inside the optimizer step: seeds the random control and top-k tie-breaks, so
        # accumulated micro-batches draw independent streams (and a resumed run the same ones)
        self._micro = batch_idx % max(1, int(self.trainer.accumulate_grad_batches)) if self._trainer else 0
        out = self.selective_step(batch)
        # sync_dist: with data parallelism the logged loss is the mean over ranks (the global batch's loss
        # under normaliser global_selected), not rank 0's share
        self.log("train/loss", out["shown_loss"], prog_bar=True, sync_dist=True)
        self.log("train/keep_ratio", out["keep_ratio"], prog_bar=True)
        self.log("train/full_loss", out["full_loss"])
        self.log("train/samples_kept", out["samples_kept"])
        if self.trainer is not None and self.trainer.optimizers:
            self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"])
        self.last_step_info = out
        return out["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Plain mean CE over every labelled token (selector-independent, so runs compare). val/loss, val/ppl and
        val/token_acc are token-weighted over the whole validation set (`_eval_epoch_end`)."""
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        """`trainer test`: as validation, on the data module's test loader (its validation set), logging
        test/loss, test/ppl and test/token_acc."""
        self._eval_step(batch, "test")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def _eval_means(self, stage: str) -> dict:
        """Token-weighted running means of one stage (loss, token accuracy, each source's loss) and the count of
        labelled tokens scored, over the whole set and all ranks (`tokensel.trainer.metrics`)."""
        keys = ["loss", "token_acc"] + [f"loss/{name}" for name in self._val_source_names()]
        return eval_metrics(self, stage, keys, sums=("tokens",))

    def _eval_step(self, batch: dict, stage: str) -> None:
        """One pass of the backbone: per-token losses and, from the same hidden rows, greedy accuracy."""
        rows: dict = {}
        loss_tok, _, valid = self.token_stats(self.model, batch, grad=False, rows_out=rows)
        correct = self._token_accuracy(rows["hidden"], batch["labels"][rows["b"], rows["t"]])
        means = self._eval_means(stage)
        update_mean(means["loss"], loss_tok[rows["b"], rows["t"]])
        update_mean(means["token_acc"], correct)
        update_mean(means["tokens"], torch.tensor(float(correct.numel()), device=correct.device))
        if "source_index" in batch:
            self.update_per_source(means, loss_tok, valid, batch["source_index"], self._val_source_names())

    def _eval_epoch_end(self, stage: str) -> None:
        """loss = sum of token losses / token count over the whole set and all ranks, ppl = exp(loss) (not a
        mean of per-batch exps), token_acc = correct / token count. No labelled token at all gives nan."""
        values = compute_eval_metrics(self, stage)
        if not values:
            return
        # already reduced over ranks; sync_dist only keeps Lightning from warning about epoch-level logging
        self.log(f"{stage}/loss", values["loss"], prog_bar=stage == "val", sync_dist=True)
        self.log(f"{stage}/ppl", torch.exp(values["loss"]), sync_dist=True)
        self.log(f"{stage}/token_acc", values["token_acc"], sync_dist=True)
        self.log(f"{stage}/tokens", values["tokens"], sync_dist=True)
        for k, v in values.items():
            if k.startswith("loss/") and not torch.isnan(v):  # a source with no labelled token logs nothing
                self.log(f"{stage}/{k}", v, sync_dist=True)

    @staticmethod
    def update_per_source(means: dict, loss_tok: Tensor, valid: Tensor, source_index: Tensor,
                          names: list[str]) -> None:
        """Feed each source's labelled token losses to its `loss/<name>` mean (a multi-source run)."""
        for s, name in enumerate(names):
            m = valid & (source_index == s)
            if m.any():
                update_mean(means[f"loss/{name}"], loss_tok[m])

    def _val_source_names(self) -> list[str]:
        """The validation sources' names when there are several (`val/loss/<source>` for each, token-weighted over
        the whole set and all ranks like val/loss): a mixture's sources are judged one by one, not only through
        their blend. One source: none (val/loss is its loss)."""
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(dm, "val_source_names", None) or [])
        return names if len(names) > 1 else []

    def _token_accuracy(self, hidden: Tensor, targets: Tensor, chunk: int = 1024) -> Tensor:
        """Per labelled row, whether the greedy next token is the target (bool `[n]`). Reads the hidden rows of
        the loss pass (`token_stats(rows_out=...)`): no second backbone forward, and the argmax runs chunk by
        chunk (no full logits). Softcapping is monotonic, so it leaves the argmax as it is. Under ZeRO-3 it runs
        as the head module's forward, whose hooks gather the weight: `GatheredParameters` would try to re-partition
        a tied weight the embedding's forward still holds, and fail."""
        _, weight, bias, _ = backbone_and_head(self.model)

        def hits(hidden: Tensor, targets: Tensor) -> Tensor:
            out = []
            for s in range(0, hidden.shape[0], chunk):
                logits = hidden[s:s + chunk] @ weight.t()
                if bias is not None:
                    logits = logits + bias
                out.append(logits.argmax(-1) == targets[s:s + chunk])
            return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool, device=targets.device)
        return call_in_module(_unwrap(self.model).get_output_embeddings(), hits, hidden, targets)

    def predict_step(self, batch: dict, batch_idx: int) -> list[tuple[int, Tensor, int]]:
        """Per sample of a padded or packed batch: (sample id, per-token losses `[n]` indexed by token
        position, hash of its token ids and labels), for `TokenStatsWriter` (cached reference / history
        losses; the hash lets a later run detect a stale cache sample by sample)."""
        from tokensel.trainer.token_cache import sample_hash, sample_positions

        loss = self.token_stats(self.model, batch, grad=False)[0].float().cpu()
        ti = batch["token_index"].cpu()
        out = []
        for b, s, pos in sample_positions(batch):
            vals = torch.zeros(int(ti[b, pos].max()) + 1)
            vals[ti[b, pos]] = loss[b, pos]
            out.append((s, vals, sample_hash(batch["input_ids"][b, pos], batch["labels"][b, pos])))
        return out

    # ------------------------------------------------------------------ checkpoints and export

    def frozen_base_source(self) -> str:
        """Where the frozen base comes from, as a checkpoint's fingerprint names it."""
        if self.model_config is not None:
            cfg = self.model_config
            return f"model_config ({cfg.get('model_type')}, seed {cfg.get('seed', 0)})"
        return str(self.model_name)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Frozen weights (reference / teacher models, the base under LoRA) stay out; the base leaves a
        fingerprint (`tokensel.trainer.lean`). DeepSpeed writes its own folders (state_dict unused there)."""
        from lightning.pytorch.strategies import DeepSpeedStrategy

        from tokensel.trainer.lean import strip_frozen

        sd = checkpoint.get("state_dict", {})
        for k in [k for k in sd if k.startswith(self.checkpoint_skip_prefixes)]:
            del sd[k]
        if not (self._trainer is not None and isinstance(self._trainer.strategy, DeepSpeedStrategy)):
            strip_frozen(self, checkpoint, self.frozen_base_source(), self.checkpoint_skip_prefixes)
        if self._ema is not None:
            checkpoint["ema_history"] = {"weights": {k: v.detach().cpu() for k, v in self._ema.items()},
                                         "step": self._ema_step}

    def export_hf(self, out_dir: str, adapter_only: bool = False, datamodule=None, dtype: str | None = None) -> None:
        """Hugging Face folder: config, safetensors (sharded when large), generation config, tokenizer.
        LoRA is merged unless `adapter_only` (then a PEFT adapter folder). `dtype` casts the written weights."""
        model = self.model
        if adapter_only:
            if self.lora is None:
                raise ConfigError("--adapter_only needs a LoRA model (model.lora is null)")
            if dtype is not None:
                raise ConfigError("export --dtype with --adapter_only: a PEFT adapter keeps its trained dtype; "
                                  "drop one of them")
            model.save_pretrained(out_dir)
        else:
            if self.lora is not None:
                model = copy.deepcopy(model).merge_and_unload()
            save_hf(model, out_dir, dtype, max_shard_size="2GB")
        self.tokenizer.save_pretrained(out_dir)
