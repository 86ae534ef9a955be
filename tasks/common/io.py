"""Files a run writes and reads: atomic writes (a crash leaves the old file or the new one, never half of one),
checkpoints that load without running code, and the lock that keeps two runs out of one folder."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import pickle
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
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


def _temporary_prefix(path: Path) -> str:
    return f".{path.name}."


def _read_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; done once, at import, before any thread starts
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def _atomic_write(path: Path, write) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temporary_prefix(path), suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; the result gets a new file's usual mode
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        full = isinstance(err, Exception) and _disk_full(err, path.parent)
        Path(tmp).unlink(missing_ok=True)
        if full:
            raise OSError(errno.ENOSPC, f"writing {path} failed: the disk holding {path.parent} is full "
                                        f"({full}); {path.name} was left as it was. Free some space and run the "
                                        "command again") from err
        raise


# Below this much free space a failed write is taken to be a full disk even when the writer's error does not say so
# (torch.save reports one as "RuntimeError: [enforce fail at inline_container.cc] unexpected pos ...").
_NEARLY_FULL_BYTES = 64 << 20


def _disk_full(err: BaseException, folder: Path) -> str:
    """Why a failed write looks like a full disk ("" when it does not): ENOSPC / EDQUOT anywhere in the error's chain,
    or almost no free space left in ``folder`` while the partial file still takes its share."""
    seen = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return ""
    return f"{free / 2**20:.1f} MiB free" if free < _NEARLY_FULL_BYTES else ""


def write_text_atomic(path: str | Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    _atomic_write(Path(path), lambda handle: handle.write(data))


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``."""
    _atomic_write(Path(path), lambda handle: torch.save(state, handle))


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Delete the temporary files an atomic write of ``path`` left behind when its process was killed; returns them.

    Only call this while holding the folder's lock (``run_folder_lock``): another writer's live temporary looks the same.
    """
    path = Path(path)
    stale = sorted(path.parent.glob(f"{_temporary_prefix(path)}*.tmp"))
    for tmp in stale:
        tmp.unlink(missing_ok=True)
    return stale


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be loaded safely: corrupt, truncated, or holding more than tensors and data."""


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a bare state dict) with ``weights_only=True``: tensors and plain Python data only.

    Unpickling arbitrary objects can run arbitrary code, so a file holding anything else is refused, as is a
    truncated or corrupt one; both raise ``CheckpointError`` naming the file.
    """
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain data, and unpickling them "
            f"could run code. Checkpoints written by this project never do; if you trust the file, convert it to a "
            f"plain state dict. ({str(error).splitlines()[0]})") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt "
                              f"({str(error).splitlines()[0]}); delete it (a run restarts from its previous "
                              "epoch only if an older checkpoint exists) or point at another file") from None


class RunFolderLocked(RuntimeError):
    """Another process holds the run folder."""


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_folder_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive lock on ``run_dir`` (``flock`` on ``run_dir/.lock``) for the duration of the block.

    A second process asking for the same folder gets ``RunFolderLocked`` naming the holder's PID at once, instead
    of training the same run in the same folder a second time. The lock dies with its process, so a killed run
    never leaves a folder locked.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock_path = run_dir / LOCK_NAME
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
        try:
            yield lock_path
        finally:
            handle.seek(0)
            handle.truncate()
