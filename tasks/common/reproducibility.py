"""Seeds and the deterministic mode.

Randomness is re-derived from ``(seed, epoch, rank)`` at the start of every epoch (data order, augmentation,
dropout), so a run resumed from an epoch-boundary checkpoint replays exactly what the uninterrupted run would
have done, with no RNG state to save.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers, stable across processes and Python versions (no ``hash()``)."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 % (1 << 64)
        value ^= value >> 31
    return value & ((1 << 63) - 1)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Ask torch for deterministic kernels (an error where none exists) and fix cuDNN's algorithm choice."""
    if enabled:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=False)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: NumPy and ``random`` follow the worker's torch seed."""
    worker_seed = torch.initial_seed() % (1 << 32)
    np.random.seed(worker_seed)
    random.seed(worker_seed)
