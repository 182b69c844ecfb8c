"""Seeded, resumable, rank-sharded sampling; each rank's share of an evaluation set."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset, Sampler

from tokensel.trainer.data.formats import IGNORE


class ResumableSampler(Sampler[int]):
    """Seeded per-epoch permutation that can start mid-epoch, sharded across data-parallel ranks.

    The module stores (epoch, batches done) in its checkpoints and calls `fast_forward` on resume, so a
    resumed run sees exactly the batches an uninterrupted run would have seen.

    With `world_size` W > 1 every rank draws the same permutation and cuts it into global batches of
    `batch_size * W`; rank r takes the r-th `batch_size` slice of each. So W processes with batch size B see
    exactly the global batches of one process with batch size W * B (the 1-process run's batch g is the
    concatenation of the ranks' batches g). The permutation is padded by wrapping around to a whole number
    of global batches, so every rank runs the same number of steps (no rank waits forever in a collective).
    """

    def __init__(self, n: int, shuffle: bool, seed: int, batch_size: int, rank: int = 0, world_size: int = 1):
        self.n, self.shuffle, self.seed, self.batch_size = n, shuffle, seed, batch_size
        self.rank, self.world_size = rank, max(1, world_size)
        self.epoch, self.skip_batches = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def fast_forward(self, epoch: int, batches_done: int) -> None:
        self.epoch, self.skip_batches = epoch, batches_done

    def _base_order(self) -> list[int]:
        """This epoch's order of sample positions, before sharding across ranks."""
        return (torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
                if self.shuffle else list(range(self.n)))

    def _order(self) -> list[int]:
        order = self._base_order()
        if self.world_size == 1:
            return order
        gb = self.batch_size * self.world_size
        total = -(-self.n // gb) * gb
        order = (order * (-(-total // max(1, len(order)))))[:total]  # wrap around: equal steps on every rank
        mine = []
        for g in range(0, total, gb):
            mine += order[g + self.rank * self.batch_size: g + (self.rank + 1) * self.batch_size]
        return mine

    def __iter__(self):
        order = self._order()
        start, self.skip_batches = self.skip_batches * self.batch_size, 0
        return iter(order[start:])

    def __len__(self) -> int:
        if self.world_size == 1:
            return self.n
        return -(-self.n // (self.batch_size * self.world_size)) * self.batch_size



class MixtureSampler(ResumableSampler):
    """Draws from several sources in given proportions: each of an epoch's `n` draws picks a source with
    probability `weights[s]` (normalised), then that source's next sample in its own seeded permutation; a
    source drawn more often than it has samples starts a fresh permutation (oversampled), one drawn less is
    only partly seen (undersampled). Everything is seeded by (seed, epoch), so the order is a pure function
    of the epoch and the resume / rank sharding of `ResumableSampler` apply unchanged.

    `groups[s]`: the dataset positions of source s.
    """

    def __init__(self, groups: list[list[int]], weights: list[float], seed: int, batch_size: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None):
        super().__init__(num_samples if num_samples is not None else sum(map(len, groups)), True, seed, batch_size,
                         rank, world_size)
        if len(groups) != len(weights) or any(not g for g in groups):
            raise ValueError("MixtureSampler: one non-empty group per weight")
        self.groups, self.weights = groups, torch.tensor(weights, dtype=torch.float64) / sum(weights)

    def _base_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        picks = torch.multinomial(self.weights, self.n, replacement=True, generator=g).tolist()
        queues: list[list[int]] = [[] for _ in self.groups]
        out = []
        for s in picks:
            if not queues[s]:
                queues[s] = [self.groups[s][i] for i in torch.randperm(len(self.groups[s]), generator=g).tolist()]
                queues[s].reverse()  # pop() from the end = the permutation's order
            out.append(queues[s].pop())
        return out


def rank_sampler(trainer, dataset, shuffle: bool, seed: int, drop_last: bool = False):
    """A `DistributedSampler` giving this data-parallel rank its own share of `dataset` when the run has several
    ranks (else None, for a plain loader). The image and diffusion data modules use it: the trainer leaves
    Lightning's sampler wrapping off (the text modules shard their own resumable sampler), so without it every
    GPU would train on the same batches."""
    world = getattr(trainer, "world_size", 1) if trainer is not None else 1
    if world <= 1:
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, num_replicas=world, rank=trainer.global_rank, shuffle=shuffle, seed=seed,
                              drop_last=drop_last)


class EvalShard(Dataset):
    """Rank `rank` of `world`'s share of an evaluation set: items rank, rank + world, rank + 2 world, ...

    Every item is scored by exactly one rank (validation costs 1/world of the set per rank instead of the whole
    set on each), and the weighted means, reduced over ranks (`tokensel.trainer.metrics`), equal one process's.
    The shares are padded to ceil(n / world) items with copies that count for nothing, so every rank runs the
    same number of batches: ZeRO-3 gathers weights collectively in each forward, and a rank with one batch fewer
    would leave the others waiting. A pad is a text sample whose labels are all ignored (it adds no token to any
    mean), or, with `weighted`, an item with `eval_weight` 0 (every item then carries `eval_weight`, 1 for a real
    one: images have no per-token labels to ignore)."""

    def __init__(self, base, rank: int, world: int, weighted: bool = False):
        self.base, self.rank, self.world, self.weighted = base, rank, max(1, world), weighted
        self.n = len(base)
        self.per_rank = -(-self.n // self.world)

    def __len__(self) -> int:
        return self.per_rank

    def __getitem__(self, i: int):
        if not 0 <= i < self.per_rank:
            raise IndexError(i)
        j = self.rank + i * self.world
        item = self.base[j % self.n]
        if self.weighted:
            return {**item, "eval_weight": float(j < self.n)}
        return item if j < self.n else _ignored(item)


def eval_share(trainer, dataset, weighted: bool = False):
    """`dataset` for one process; this rank's `EvalShard` of it under data parallelism."""
    rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
    return dataset if world == 1 or dataset is None else EvalShard(dataset, rank, world, weighted)


def _ignored(item):
    """A copy of a sample (or of a packed row's samples) with no labelled token."""
    if isinstance(item, list):
        return [_ignored(s) for s in item]
    return {**item, "labels": [IGNORE] * len(item["labels"])}
