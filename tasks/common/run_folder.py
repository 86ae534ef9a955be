"""The run folder, the one object every part of the project shares: ``scripts/train.py`` writes it, the engine
resumes from it, the figures load its model and the reproduction reads its result.

    <run_dir>/config.yaml      the resolved config, written before training starts
    <run_dir>/checkpoint.pt    after every epoch: everything a rerun in the same folder needs to resume exactly
    <run_dir>/tensorboard/     training and validation scalars, and the task's images
    <run_dir>/train.log        everything the run logged (Hydra's job log, ``<job name>.log``)
    <run_dir>/metrics.json     once the run finished: its record (``tasks.common.experiment.run_experiment``)
    <run_dir>/.lock            held (``flock``) while a process trains in the folder

Nothing here knows a task; reading a folder never runs code from it (the config is YAML, the checkpoint is loaded
by ``tasks.common.io.load_checkpoint`` with ``weights_only``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.common.io import write_json_atomic, write_text_atomic

CONFIG_NAME = "config.yaml"
CHECKPOINT_NAME = "checkpoint.pt"
TENSORBOARD_NAME = "tensorboard"
LOG_NAME = "train.log"
METRICS_NAME = "metrics.json"


def write_config(run_dir: Path, cfg: DictConfig) -> None:
    write_text_atomic(Path(run_dir) / CONFIG_NAME, OmegaConf.to_yaml(cfg, resolve=True))


def read_config(run_dir: str | Path) -> DictConfig | None:
    """The resolved config a run trained with, None when the folder holds none."""
    path = Path(run_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    if not isinstance(cfg, DictConfig):
        raise ValueError(f"{path}: not a mapping")
    return cfg


def write_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / METRICS_NAME, record)


def read_metrics(run_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's ``metrics.json`` whatever its status, None when there is none."""
    path = Path(run_dir) / METRICS_NAME
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def finished_record(run_dir: str | Path) -> dict[str, Any] | None:
    """A run folder's ``metrics.json`` if the run finished, else None."""
    record = read_metrics(run_dir)
    return record if record is not None and record.get("status") == "finished" else None


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder."""


LOCK_NAME = ".lock"
_HELD: dict[str, int] = {}  # run folders this process holds (real path -> nesting depth)


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (``flock`` on ``run_dir/.lock``) for the duration of the block.

    A second process asking for the same folder gets ``RunFolderLocked`` naming the holder's PID at once, instead
    of training the same run in the same folder a second time. The lock dies with its process, so a killed run
    never leaves a folder locked. Within one process the lock is re-entrant: ``scripts/train.py`` takes it before
    Hydra writes anything into the folder, and ``run_experiment`` takes it again inside.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
    key = os.path.realpath(run_dir)
    if _HELD.get(key):
        _HELD[key] += 1
        try:
            yield lock_path
        finally:
            _HELD[key] -= 1
        return
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunFolderLocked(f"{run_dir} is in use by another run (process {holder}); wait for it to finish, "
                                  "stop it, or use another run folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        _HELD[key] = 1
        try:
            yield lock_path
        finally:
            _HELD.pop(key, None)
            handle.seek(0)
            handle.truncate()
