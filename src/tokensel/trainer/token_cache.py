"""Cached per-token statistics (reference / history losses) keyed by (sample index, token position).

File format (safetensors): `values` float32 [total tokens], `offsets` int64 [samples + 1]; sample s
owns `values[offsets[s]:offsets[s+1]]`, where entry t is the loss of predicting token t (entry 0 = 0),
the same alignment as `SelectiveLM.token_stats`. Written by `TokenStatsWriter` during `trainer predict`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

from tokensel.errors import ConfigError


class TokenStatsCache:
    def __init__(self, values: Tensor, offsets: Tensor) -> None:
        self.values, self.offsets = values, offsets

    @classmethod
    def load(cls, path: str) -> TokenStatsCache:
        if not Path(path).is_file():
            raise ConfigError(f"token statistics cache {path}: no such file; write one with "
                              "`trainer predict ... --trainer.callbacks+=TokenStatsWriter`")
        from safetensors.torch import load_file

        d = load_file(path)
        return cls(d["values"], d["offsets"])

    @staticmethod
    def save(path: str, per_sample: dict[int, list[float]]) -> None:
        from safetensors.torch import save_file

        n = max(per_sample) + 1
        lengths = torch.tensor([len(per_sample.get(s, [])) for s in range(n)])
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        values = torch.tensor([v for s in range(n) for v in per_sample.get(s, [])], dtype=torch.float32)
        tmp = str(path) + ".tmp"
        save_file({"values": values, "offsets": offsets}, tmp)
        Path(tmp).replace(path)

    def lookup(self, sample_index: Tensor, token_index: Tensor) -> Tensor:
        """`[B, T]` cached values; 0 on padding (index -1) and past the cached length."""
        si, ti = sample_index.cpu(), token_index.cpu()
        ok = (si >= 0) & (si < len(self.offsets) - 1)
        start = torch.where(ok, self.offsets[si.clamp(0, len(self.offsets) - 2)], 0)
        length = torch.where(ok, self.offsets[si.clamp(0, len(self.offsets) - 2) + 1] - start, 0)
        ok &= (ti >= 0) & (ti < length)
        flat = torch.where(ok, start + ti, 0)
        return torch.where(ok, self.values[flat], torch.zeros(()))


class TokenStatsWriter(BasePredictionWriter):
    """`trainer predict` callback: gather `SelectiveLM.predict_step` outputs into a `TokenStatsCache` file.

    Args:
        out: destination `.safetensors` path.
    """

    def __init__(self, out: str = "token_losses.safetensors") -> None:
        super().__init__(write_interval="epoch")
        self.out = out

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        per_sample: dict[int, list[float]] = {}
        for batch_out in predictions:
            for s, vals in batch_out:
                per_sample[s] = vals
        TokenStatsCache.save(self.out, per_sample)
        print(f"tokensel: wrote per-token losses of {len(per_sample)} samples to {self.out}")
