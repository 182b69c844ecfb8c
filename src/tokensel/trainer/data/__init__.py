"""Text DataModules: SFT (prompt/response or chat messages) and pretraining text, built on `datasets`.

Every batch carries `input_ids`, `labels` (-100 where no loss: prompt, padding), `attention_mask`
(2-D padding mask), `position_ids` (reset per sample), packed batches also `attention_mask_4d` (bool
block-diagonal causal mask; `model_attention_mask` turns it into the form the model's attention reads), and
`sample_index` / `token_index` `[B, T]` (dataset row and position within it, -1 on padding) so cached
per-token statistics (reference / history losses) can be looked up whatever the batching.

Malformed rows stop the run with the file, line and problem (`on_bad_row: error`), or are skipped and
counted (`on_bad_row: skip`).

The package: `sources` (reading rows with their locations), `formats` (SFT formats, chat templates, labels),
`packing` (collates and the packed attention mask), `sampler` (resumable sampling), `modules` (the shared
DataModule and SFT), `pretrain` (pretraining text).
"""

from tokensel.trainer.data.formats import (
                                           _WARNED,
                                           IGNORE,
                                           ROLES,
                                           SFT_FORMATS,
                                           SHAREGPT_ROLES,
                                           TRAIN_ON,
                                           parse_sft_row,
                                           tokenize_chat,
)
from tokensel.trainer.data.modules import SFTDataModule, TextDataModule, TokenizedDataset
from tokensel.trainer.data.packing import (
                                           PACKED_ATTENTION,
                                           PackedDataset,
                                           model_attention_mask,
                                           pack_samples,
                                           packed_collate,
                                           pad_collate,
)
from tokensel.trainer.data.pretrain import PretrainDataModule
from tokensel.trainer.data.sampler import ResumableSampler
from tokensel.trainer.data.sources import _collect, _read_rows

__all__ = ["IGNORE", "PACKED_ATTENTION", "ROLES", "SFT_FORMATS", "SHAREGPT_ROLES", "TRAIN_ON", "_WARNED", "_collect",
           "_read_rows", "PackedDataset", "PretrainDataModule", "ResumableSampler", "SFTDataModule", "TextDataModule",
           "TokenizedDataset", "model_attention_mask", "pack_samples", "packed_collate", "pad_collate",
           "parse_sft_row", "tokenize_chat"]
