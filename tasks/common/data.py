"""Data helpers every task shares: the per-rank sampler, the DataLoader factory, and reading images so that a
corrupt file is named."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from tasks.common.distributed import World
from tasks.common.progress import Progress
from tasks.common.reproducibility import derive_seed, seed_worker

log = logging.getLogger(__name__)


class CorruptImageError(OSError):
    """An image file that cannot be decoded; the message names the file."""


def read_rgb(path: str | Path) -> Image.Image:
    """Decode the image at ``path`` into RGB; a truncated or unreadable file raises ``CorruptImageError`` naming it."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise CorruptImageError(f"cannot read image {str(path)!r}: {error}. Replace or delete the file; "
                                "data.verify=true checks every image before training starts") from error


def verify_images(paths: Iterable[str | Path], what: str, read: Callable[[Path], object] = read_rgb,
                  kind: str = "images") -> int:
    """Decode every file of ``paths`` with ``read`` (``data.verify=true``; default: as RGB images); raise
    ``CorruptImageError`` listing those that fail (``read`` raises it naming the file).

    Meant for real datasets before a long run: a corrupt file otherwise stops training when the loader reaches it.
    Returns how many files were checked; ``kind`` names them in messages (e.g. ``"annotations"``).
    """
    paths = list(paths)
    progress = Progress(len(paths), f"verifying {len(paths)} {kind} of {what}", enabled=True)
    bad = []
    for index, path in enumerate(paths, 1):
        try:
            read(Path(path))
        except CorruptImageError as error:
            bad.append(f"{path} ({error.__cause__})")
        progress.update(index)
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise CorruptImageError(f"{len(bad)} of {len(paths)} {kind} of {what} cannot be read:\n  {shown}")
    log.info("verified %d %s of %s", len(paths), kind, what)
    return len(paths)


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
