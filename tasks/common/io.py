"""Atomic file writes: a crash leaves the old file or the new one, never half of one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


MANIFEST_NAME = "synthetic.json"


class FolderConflictError(FileExistsError, ValueError):
    """The folder exists and holds something other than what was asked for."""


def _manifest_at(root: Path, manifest_name: str) -> dict | None:
    """The manifest of a generated folder at ``root``; None when ``root`` is missing or an empty folder."""
    if not root.exists():
        return None
    if not root.is_dir():
        raise FolderConflictError(f"{str(root)!r} exists and is not a folder")
    manifest = root / manifest_name
    if manifest.is_file():
        return json.loads(manifest.read_text())
    if any(root.iterdir()):
        raise FolderConflictError(f"{str(root)!r} is not empty and holds no {manifest_name}: it is not a dataset "
                                  "this generator wrote; pass an empty or missing folder")
    return None


def ensure_generated_folder(root: str | Path, manifest: dict[str, Any], write: Callable[[Path], None],
                            manifest_name: str = MANIFEST_NAME) -> Path:
    """Fill ``root`` by ``write(folder)`` unless it already holds the folder described by ``manifest``.

    ``write`` fills a temporary folder beside ``root``, which gets ``manifest`` and is then renamed into place, so an
    interrupted write leaves nothing behind to be reused, and two processes racing on ``root`` both end with the
    first one's folder. A ``root`` written with another manifest, or holding anything else, raises
    ``FolderConflictError`` (a ``FileExistsError`` and a ``ValueError``).
    """
    root = Path(root)

    def reuse(found: dict) -> Path:
        if found != manifest:
            raise FolderConflictError(f"{str(root)!r} holds a dataset written with {found}, not {manifest}; "
                                      "delete it or choose another folder")
        return root

    found = _manifest_at(root, manifest_name)
    if found is not None:
        return reuse(found)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        write(staging)
        (staging / manifest_name).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        try:
            os.rename(staging, root)  # replaces a missing or empty folder atomically
        except OSError:
            found = _manifest_at(root, manifest_name)  # another process finished first
            if found is None:
                raise
            return reuse(found)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(path, map_location=map_location, weights_only=False)
