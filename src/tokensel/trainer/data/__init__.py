"""Text DataModules: SFT (prompt/response or chat messages) and pretraining text, built on `datasets`.

Every batch carries `input_ids`, `labels` (-100 where no loss: prompt, padding), `attention_mask`
(2-D padding mask), `position_ids` (reset per sample), packed batches also `attention_mask_4d` (bool
block-diagonal causal mask; `model_attention_mask` turns it into the form the model's attention reads), and
`sample_index` / `token_index` `[B, T]` (dataset row and position within it, -1 on padding) so cached
per-token statistics (reference / history losses) can be looked up whatever the batching.

Malformed rows stop the run with the file, line and problem (`on_bad_row: error`), or are skipped and
counted (`on_bad_row: skip`).

The package: `sources` (reading rows with their locations), `formats` (SFT formats, chat templates, labels),
`packing` (collates and the packed attention mask), `sampler` (resumable and mixture sampling), `cache`
(tokenise once), `shards` (memory-mapped token shards), `modules` (the shared DataModule), `sft` and `pretrain`.
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
from tokensel.trainer.data.modules import SampleView, TextDataModule, TokenizedDataset
from tokensel.trainer.data.packing import (
                                           PACKED_ATTENTION,
                                           PackedDataset,
                                           model_attention_mask,
                                           pack_samples,
                                           packed_collate,
                                           pad_collate,
)
from tokensel.trainer.data.pretrain import PretrainDataModule
from tokensel.trainer.data.sampler import MixtureSampler, ResumableSampler
from tokensel.trainer.data.sft import SFTDataModule
from tokensel.trainer.data.sources import Source, iter_rows, parse_source, parse_sources

__all__ = ["IGNORE", "MixtureSampler", "PACKED_ATTENTION", "PackedDataset", "PretrainDataModule", "ROLES",
           "ResumableSampler", "SFTDataModule", "SFT_FORMATS", "SHAREGPT_ROLES", "SampleView", "Source", "TRAIN_ON",
           "TextDataModule", "TokenizedDataset", "_WARNED", "iter_rows", "model_attention_mask",
           "pack_samples", "packed_collate", "pad_collate", "parse_sft_row", "parse_source", "parse_sources",
           "tokenize_chat"]
