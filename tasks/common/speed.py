"""Inference speed of several models measured together, so that their ratios are fair on a shared machine.

``measure_speeds`` warms every model up, then times them in interleaved rounds (the order rotates each round), so a
burst of load from elsewhere hits all models alike, and reports each model's median. On a GPU every timed call is
bracketed by ``torch.cuda.synchronize``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

from carafe.ops import check_int


def noise_image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Tensor[3, H, W] of uniform noise in [0, 1), the same for the same arguments: the image speeds are timed on."""
    return torch.rand(3, height, width, generator=torch.Generator().manual_seed(seed))


def measure_speeds(calls: Mapping[str, Callable[[], object]], warmup: int = 5, iterations: int = 20,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """Calls per second (median over ``iterations`` timed calls) of each of ``calls``, timed in rotating rounds
    after ``warmup`` untimed calls each. A call is one forward pass of one image: calls per second = images/s."""
    if not calls:
        raise ValueError("measure_speeds needs at least one call to time")
    warmup = check_int("warmup", warmup, 0)
    iterations = check_int("iterations", iterations, 1)
    device = torch.device(device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    names = list(calls)
    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                calls[name]()
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_index in range(iterations):
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                sync()
                start = time.perf_counter()
                calls[name]()
                sync()
                times[name].append(time.perf_counter() - start)
    return {name: 1.0 / statistics.median(values) for name, values in times.items()}
