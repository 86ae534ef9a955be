"""A two-part (GAN-like) model trained by the engine's ``train_one_epoch``, run by ``tests/test_engine.py`` both
under ``torchrun`` (each rank a shard of every batch) and in one process (the whole batches), so the test can
check that data parallelism by hand (``engine.data_parallel``) trains exactly what one process with the whole batch
trains.

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ddp_parts_worker.py OUT_DIR

writes each rank's final weights to ``OUT_DIR/rank<r>.pt`` and, for the model with a BatchNorm in its
discriminator, ``OUT_DIR/rank<r>-bn.pt``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tasks.common.distributed import World, close_world, init_world  # noqa: E402
from tasks.common.engine import RunSettings, data_parallel, train_one_epoch  # noqa: E402

FEATURES, BATCH, ITERATIONS = 4, 8, 3


class TwoPartTask:
    """A least-squares GAN on vectors: the discriminator step, then the generator step, as the inpainting task
    orders them. Every loss is a mean over the batch, so the mean of the ranks' gradients is the whole batch's."""

    optimizer_parts = ("discriminator", "generator")

    def __init__(self, world: World) -> None:
        self.world = world

    def to_device(self, batch: Any) -> Any:
        return batch

    def train_part(self, model: nn.Module, batch: Any, part: str, carry: dict[str, Any]) -> dict[str, torch.Tensor]:
        real, noise = batch
        if part == "discriminator":
            carry["fake"] = model.generator(noise)
            loss = ((model.discriminator(real) - 1) ** 2).mean() + (model.discriminator(carry["fake"].detach()) ** 2).mean()
        else:
            loss = ((model.discriminator(carry["fake"]) - 1) ** 2).mean()
        return {"loss": loss}


def build_model(with_bn: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.generator = nn.Sequential(nn.Linear(FEATURES, FEATURES), nn.Tanh(), nn.Linear(FEATURES, FEATURES))
    model.discriminator = nn.Sequential(*([nn.BatchNorm1d(FEATURES)] if with_bn else []), nn.Linear(FEATURES, 1))
    return model


def train(world: World, with_bn: bool) -> nn.Module:
    """Build the model with a seed of its own on each rank (``data_parallel`` must make them equal), train
    ``ITERATIONS`` batches of ``BATCH`` samples, this rank's contiguous share of each, and return it."""
    model = data_parallel(TwoPartTask(world), build_model(with_bn, seed=world.rank), world, RunSettings())
    generator = torch.Generator().manual_seed(1234)
    real = torch.randn(ITERATIONS, BATCH, FEATURES, generator=generator) + 2
    noise = torch.randn(ITERATIONS, BATCH, FEATURES, generator=generator)
    share = BATCH // world.world_size
    mine = slice(world.rank * share, (world.rank + 1) * share)
    loader = DataLoader(TensorDataset(real[:, mine].reshape(-1, FEATURES), noise[:, mine].reshape(-1, FEATURES)),
                        batch_size=share, shuffle=False)
    optimizers = {part: torch.optim.SGD(getattr(model, part).parameters(), lr=0.1, momentum=0.9)
                  for part in TwoPartTask.optimizer_parts}
    schedulers = {part: torch.optim.lr_scheduler.LambdaLR(o, lambda _: 1.0) for part, o in optimizers.items()}
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    train_one_epoch(TwoPartTask(world), model, loader, optimizers, schedulers, scaler, world, 0,
                    RunSettings(progress=False), None)
    return model


def main() -> None:
    out = Path(sys.argv[1])
    world = init_world("cpu")
    try:
        for with_bn in (False, True):
            model = train(world, with_bn)
            torch.save(model.state_dict(), out / f"rank{world.rank}{'-bn' if with_bn else ''}.pt")
    finally:
        close_world()


if __name__ == "__main__":
    main()
