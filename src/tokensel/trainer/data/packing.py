"""Batching: padding, packing several samples per row, and the attention mask a model reads for them."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from tokensel.errors import ConfigError
from tokensel.trainer.data.formats import IGNORE


def pad_collate(pad_id: int):
    """Right-pad a list of samples to the longest one."""
    def collate(items: list[dict]) -> dict:
        T = max(len(x["input_ids"]) for x in items)
        B = len(items)
        batch = {"input_ids": torch.full((B, T), pad_id), "labels": torch.full((B, T), IGNORE),
                 "attention_mask": torch.zeros(B, T, dtype=torch.long),
                 "position_ids": torch.zeros(B, T, dtype=torch.long),
                 "sample_index": torch.full((B, T), -1), "token_index": torch.full((B, T), -1),
                 "source_index": torch.full((B, T), -1)}
        for b, x in enumerate(items):
            n = len(x["input_ids"])
            batch["input_ids"][b, :n] = torch.tensor(x["input_ids"])
            batch["labels"][b, :n] = torch.tensor(x["labels"])
            batch["attention_mask"][b, :n] = 1
            batch["position_ids"][b, :n] = torch.arange(n)
            batch["sample_index"][b, :n] = x["sample_index"]
            batch["token_index"][b, :n] = torch.arange(n)
            batch["source_index"][b, :n] = x.get("source_index", 0)
        return batch
    return collate


def pack_samples(samples: list[dict], max_length: int) -> list[list[int]]:
    """Greedy first-fit of whole samples into rows of at most `max_length` tokens (indices per row)."""
    return pack_lengths([len(s["input_ids"]) for s in samples], max_length)


def pack_lengths(lengths, max_length: int) -> list[list[int]]:
    """`pack_samples` on the samples' lengths."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i, n in enumerate(int(x) for x in lengths):
        for r, left in enumerate(room):
            if n <= left:
                rows[r].append(i)
                room[r] -= n
                break
        else:
            rows.append([i])
            room.append(max_length - n)
    return rows


class PackedDataset(Dataset):
    """Rows of several whole samples; the collate builds a block-diagonal causal mask so samples never see
    each other, and resets positions per sample. Samples of different sources (`base.source_of()`) are packed
    into different rows, so a row has one source and a mixture can draw rows by source."""

    def __init__(self, base: Dataset, max_length: int):
        import numpy as np

        self.base = base
        lengths = np.asarray(base.lengths() if hasattr(base, "lengths")
                             else [len(base[i]["input_ids"]) for i in range(len(base))])
        src = np.asarray(base.source_of()) if hasattr(base, "source_of") else np.zeros(len(lengths), np.int64)
        self.rows, row_source = [], []
        for s in np.unique(src):
            pos = np.flatnonzero(src == s)
            for r in pack_lengths(lengths[pos], max_length):
                self.rows.append([int(pos[i]) for i in r])
                row_source.append(int(s))
        self.row_source = np.asarray(row_source, dtype=np.int64)

    def source_of(self):
        """The source of each row."""
        return self.row_source

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> list[dict]:
        return [self.base[j] for j in self.rows[i]]


def packed_collate(pad_id: int, max_length: int):
    """Rows of several samples: `attention_mask_4d` `[B, 1, T, T]` bool (True = may attend) is causal within
    each sample and blocks every other sample; padding positions attend only to themselves (no empty row, so
    no NaN). It is the kernel-independent layout: pass it to a model through `model_attention_mask`."""
    def collate(rows: list[list[dict]]) -> dict:
        B, T = len(rows), max(sum(len(s["input_ids"]) for s in r) for r in rows)
        batch = pad_collate(pad_id)([{"input_ids": [pad_id] * T, "labels": [IGNORE] * T, "sample_index": -1}
                                     for _ in rows])
        mask = torch.zeros(B, 1, T, T, dtype=torch.bool)
        batch["attention_mask"] = torch.zeros(B, T, dtype=torch.long)
        batch["sample_index"].fill_(-1)
        batch["token_index"].fill_(-1)
        batch["source_index"].fill_(-1)
        for b, r in enumerate(rows):
            at = 0
            for s in r:
                n = len(s["input_ids"])
                sl = slice(at, at + n)
                batch["input_ids"][b, sl] = torch.tensor(s["input_ids"])
                batch["labels"][b, sl] = torch.tensor(s["labels"])
                batch["attention_mask"][b, sl] = 1
                batch["position_ids"][b, sl] = torch.arange(n)
                batch["sample_index"][b, sl] = s["sample_index"]
                batch["token_index"][b, sl] = torch.arange(n)
                batch["source_index"][b, sl] = s.get("source_index", 0)
                mask[b, 0, sl, sl] = torch.tril(torch.ones(n, n, dtype=torch.bool))
                at += n
            mask[b, 0, at:, at:] = torch.eye(T - at, dtype=torch.bool)  # padding attends to itself: no NaN rows
        batch["attention_mask_4d"] = mask
        return batch
    return collate


# attention implementations that can keep packed samples apart through a 4-D mask
PACKED_ATTENTION = ("sdpa", "eager", "flex_attention")


def model_attention_mask(batch: dict, backbone):
    """The `attention_mask` to give `backbone` (a transformers decoder) for `batch`.

    A padded batch: its 2-D padding mask (the model builds its causal mask). A packed batch: its bool
    `attention_mask_4d`, in the form the backbone's attention implementation reads as a mask. transformers
    hands a 4-D mask to the kernel unchanged, and only SDPA treats a bool tensor as a mask; eager attention
    and flex attention *add* a tensor mask to the scores (a bool True is +1: no mask at all, future tokens
    and other samples visible). So: sdpa gets the bool mask; eager gets an additive mask in the model's
    dtype (0 where allowed, the dtype's min where blocked: never -inf, so no NaN); flex_attention gets a
    BlockMask of the same pattern. Other implementations (flash attention, paged, hub kernels) take no 4-D
    mask, so packing is refused with them."""
    mask = batch.get("attention_mask_4d")
    if mask is None:
        return batch.get("attention_mask")
    impl = getattr(backbone.config, "_attn_implementation", None)
    if impl == "sdpa":
        return mask
    if impl == "eager":
        dtype = backbone.get_input_embeddings().weight.dtype
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    if impl == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        B, _, T, S = mask.shape
        return create_block_mask(lambda b, h, q, kv: mask[b, 0, q, kv], B, None, T, S, device=mask.device)
    raise ConfigError(f"data.init_args.packing=true: model.init_args.attn_implementation={impl!r} takes no 4-D mask, "
                      f"so packed samples would see each other; use one of {', '.join(PACKED_ATTENTION)}, or set "
                      "data.init_args.packing=false")

