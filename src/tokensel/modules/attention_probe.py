"""One layer's attention, recomputed without grad, so every layer keeps SDPA / flash attention (ssToken).

`AttentionProbe` registers a forward pre-hook on one decoder layer that captures the layer's input hidden
states and its keyword inputs (position embeddings, the mask the model built). After the forward, the
probe recomputes that layer's `input_layernorm -> q/k projections (+ q/k norms) -> rotary ->
softmax(QK^T * scale + mask)` under `torch.no_grad()` and reduces it to the attention *mass each query row
puts on prompt positions*, averaged over heads (GQA: k heads repeated). The model's own attention
implementation is never switched; only the probed rows' `[B, H, T, T]` map of this one layer is built.
The mask is read in whatever form reached the layer: bool (SDPA: True = attend), additive float (eager:
0 / the dtype's min), a flex `BlockMask` (made dense), or none (SDPA without padding: plain causal).

Supported: Llama-family decoders (`layer.self_attn.{q_proj,k_proj}`, `layer.input_layernorm`, rotary
`position_embeddings`): Llama, Mistral, Qwen2/3, SmolLM, Gemma-style layers with q/k norms. Anything else
raises a clear error naming what is missing.

Prompt positions (per segment; a segment = one sample, several in a row when packed, taken from
`sample_index` when the batch has it): labelled -100, inside the attention mask, and *before* the
segment's first labelled token. A query only attends within its own segment (block-diagonal mask), so
summing a row over all prompt keys gives the mass on its own prompt.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

IGNORE = -100


def decoder_layers(model) -> nn.ModuleList:
    """The decoder-layer list of a (peft-wrapped) transformers causal LM."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(base, base.base_model_prefix, base)
    for name in ("layers", "h", "blocks"):
        layers = getattr(backbone, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    raise ValueError(f"AttentionProbe: cannot find the decoder layers of {type(base).__name__} "
                     "(looked for .layers, .h, .blocks on the backbone)")


def prompt_positions(labels: Tensor, attention_mask: Tensor | None = None,
                     sample_index: Tensor | None = None) -> Tensor:
    """`[B, T]` bool: prompt tokens = unlabelled, not padding, before the first labelled token of their
    segment (segments from `sample_index`, -1 = padding; else one segment per row)."""
    lab = labels != IGNORE
    real = torch.ones_like(lab) if attention_mask is None or attention_mask.dim() != 2 else attention_mask.bool()
    seg = torch.zeros_like(labels) if sample_index is None else sample_index
    if sample_index is not None:
        real = real & (sample_index >= 0)
    out = torch.zeros_like(lab)
    for b in range(labels.shape[0]):
        for s in seg[b][real[b]].unique():
            pos = (seg[b] == s) & real[b]
            first = lab[b] & pos
            first_t = int(first.nonzero()[0, 0]) if first.any() else labels.shape[1]
            idx = torch.arange(labels.shape[1], device=labels.device)
            out[b] |= pos & ~lab[b] & (idx < first_t)
    return out


class AttentionProbe:
    """Context manager: capture one decoder layer's inputs during a forward, recompute its attention.

    Args:
        model: the causal LM (peft-wrapped or not).
        layer: index into the decoder layers (-1 = last, the ssToken default).
    """

    def __init__(self, model, layer: int = -1) -> None:
        self.layers = decoder_layers(model)
        self.layer = self.layers[layer]
        attn = getattr(self.layer, "self_attn", None)
        missing = [n for n in ("q_proj", "k_proj") if attn is None or not hasattr(attn, n)]
        if missing or not hasattr(self.layer, "input_layernorm"):
            raise ValueError(f"AttentionProbe: layer {type(self.layer).__name__} is not a Llama-family decoder "
                             f"layer (needs self_attn.q_proj/k_proj and input_layernorm); missing {missing}")
        self.attn = attn
        self.captured: tuple | None = None
        self._handle = None

    def _hook(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.captured = (hidden.detach(), kwargs.get("attention_mask"), kwargs.get("position_embeddings"))

    def __enter__(self) -> AttentionProbe:
        self.captured = None
        self._handle = self.layer.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    @torch.no_grad()
    def attention(self) -> Tensor:
        """`[B, H, T, T]` softmax attention of the captured forward (fp32)."""
        if self.captured is None:
            raise RuntimeError("AttentionProbe: no forward ran through the probed layer inside the context")
        hidden, mask, pos_emb = self.captured
        attn = self.attn
        x = self.layer.input_layernorm(hidden)
        bsz, t, _ = x.shape
        hd = attn.head_dim
        q = attn.q_proj(x).view(bsz, t, -1, hd).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, t, -1, hd).transpose(1, 2)
        if hasattr(attn, "q_norm"):
            q, k = attn.q_norm(q), attn.k_norm(k)
        if pos_emb is not None:
            rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
            if rope is None:
                raise ValueError(f"AttentionProbe: {type(attn).__module__} has no apply_rotary_pos_emb")
            q, k = rope(q, k, *pos_emb)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * float(getattr(attn, "scaling", hd ** -0.5))
        if type(mask).__name__ == "BlockMask":  # flex attention: the same pattern as a dense bool mask
            from torch.nn.attention.flex_attention import create_mask

            mask = create_mask(mask.mask_mod, bsz, 1, t, t, device=x.device)
        if isinstance(mask, Tensor) and mask.dim() == 4:
            m = mask[..., :t, :t]
            scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
        else:  # SDPA without padding passes no mask: plain causal
            causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        return torch.softmax(scores, dim=-1).nan_to_num(0.0)

    @torch.no_grad()
    def prompt_mass_rows(self, labels: Tensor, attention_mask: Tensor | None = None,
                         sample_index: Tensor | None = None) -> Tensor:
        """`[B, T]`: head-averaged attention mass query row i puts on its segment's prompt positions."""
        a = self.attention().mean(1)  # [B, T, T]
        keys = prompt_positions(labels, attention_mask, sample_index).to(a.dtype)
        return (a * keys[:, None, :]).sum(-1)

    @torch.no_grad()
    def prompt_mass(self, labels: Tensor, attention_mask: Tensor | None = None,
                    sample_index: Tensor | None = None, row: str = "t") -> Tensor:
        """`[B, T]` aligned with the per-token loss (position t = the loss of predicting token t).

        row "t" (ssToken's Eq. 5 and official code): position t gets the row of query t, token t's own
        position. row "t-1": the row of query t-1, the position whose hidden state predicts token t
        (position 0 gets 0)."""
        rows = self.prompt_mass_rows(labels, attention_mask, sample_index)
        if row == "t":
            return rows
        if row != "t-1":
            raise ValueError(f"AttentionProbe.prompt_mass: row={row!r} must be 't' or 't-1'")
        out = torch.zeros_like(rows)
        out[:, 1:] = rows[:, :-1]
        return out
