"""Data helpers every task shares: the per-rank sampler and the DataLoader factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.common.distributed import World
from tasks.common.reproducibility import derive_seed, seed_worker


class ShardedSampler(Sampler[int]):
    """This rank's share of a dataset: ``order[rank::world_size]``.

    Training (``shuffle=True``): the order is a permutation drawn from ``(seed, epoch)``, identical on every rank,
    and each rank gets the same number of samples (the remainder is dropped, as DDP needs equal iteration counts).
    Evaluation (``shuffle=False``): every sample exactly once over all ranks, shards may differ by one.
    """

    def __init__(self, length: int, world: World, shuffle: bool, seed: int = 0) -> None:
        self.length, self.rank, self.world_size = length, world.rank, world.world_size
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.rank, self.length, self.world_size))
        generator = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch))
        order = torch.randperm(self.length, generator=generator).tolist()
        per_rank = self.length // self.world_size
        return order[self.rank::self.world_size][:per_rank]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices())

    def __len__(self) -> int:
        if not self.shuffle:
            return len(range(self.rank, self.length, self.world_size))
        return self.length // self.world_size


def build_loader(dataset: Dataset, world: World, batch_size: int, shuffle: bool, num_workers: int, seed: int = 0,
                 collate_fn: Callable | None = None, drop_last: bool = False) -> DataLoader:
    """A DataLoader over this rank's shard; ``batch_size`` is per rank. Workers are seeded from the loader's
    generator, which the engine re-seeds every epoch (see ``reseed_loader``)."""
    sampler = ShardedSampler(len(dataset), world, shuffle, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=collate_fn, drop_last=drop_last, pin_memory=world.device.type == "cuda",
                      worker_init_fn=seed_worker, generator=torch.Generator(),
                      persistent_workers=False)


def reseed_loader(loader: DataLoader, seed: int, epoch: int, rank: int) -> None:
    """Make epoch ``epoch``'s data order and worker seeds a function of (seed, epoch, rank) alone."""
    if isinstance(loader.sampler, ShardedSampler):
        loader.sampler.set_epoch(epoch)
    loader.generator.manual_seed(derive_seed(seed, epoch, rank, 1))
