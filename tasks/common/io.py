"""Files a run writes and reads: atomic writes (a crash leaves the old file or the new one, never half of one),
checkpoints that load without running code, and generated data folders. The run folder itself (its file names,
its lock) is ``tasks.common.run_folder``."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import zipfile
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


#: The manifest key of a generated folder's content: ``{"sha256": folder_content_digest(...), "files": count}``.
CONTENT_KEY = "content"


def folder_content(root: Path, manifest_name: str = MANIFEST_NAME) -> dict[str, Any]:
    """``{"sha256": ..., "files": n}``: SHA-256 over every file under ``root`` but the manifest at its top (each
    file's path relative to ``root`` and its bytes, in path order), and how many files that is."""
    digest, count = hashlib.sha256(), 0
    files = sorted((p for p in root.rglob("*") if p.is_file() and p != root / manifest_name),
                   key=lambda p: p.relative_to(root).as_posix())
    for path in files:
        name = path.relative_to(root).as_posix().encode()
        data = path.read_bytes()
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little") + data)
        count += 1
    return {"sha256": digest.hexdigest(), "files": count}


def generated_folder_digest(root: Path, manifest_name: str = MANIFEST_NAME) -> str | None:
    """The content SHA-256 recorded in the manifest of a folder ``ensure_generated_folder`` wrote (and checked on
    its last use); None when ``root`` holds no such manifest yet."""
    try:
        found = json.loads((Path(root) / manifest_name).read_text())
    except (OSError, ValueError):
        return None
    content = found.get(CONTENT_KEY) if isinstance(found, dict) else None
    return content.get("sha256") if isinstance(content, dict) else None


def _write_manifest(root: Path, manifest: dict[str, Any], manifest_name: str) -> None:
    write_text_atomic(root / manifest_name, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def ensure_generated_folder(root: str | Path, manifest: dict[str, Any], write: Callable[[Path], None],
                            manifest_name: str = MANIFEST_NAME) -> Path:
    """Fill ``root`` by ``write(folder)`` unless it already holds the folder described by ``manifest``.

    ``write`` fills a temporary folder beside ``root``, which gets ``manifest`` and is then renamed into place, so an
    interrupted write leaves nothing behind to be reused, and two processes racing on ``root`` both end with the
    first one's folder. A ``root`` written with another manifest, or holding anything else, raises
    ``FolderConflictError`` (a ``FileExistsError`` and a ``ValueError``).

    The manifest also records the digest of the files written (``CONTENT_KEY``, ``folder_content``), and every
    reuse checks it: a folder whose files were changed, added or deleted since (such as a corrupt image removed by
    hand) raises ``FolderConflictError`` instead of passing for the dataset its settings describe. A folder
    written before digests were recorded gets its current content's digest recorded on first reuse.
    """
    root = Path(root)

    def reuse(found: dict) -> Path:
        settings = {key: value for key, value in found.items() if key != CONTENT_KEY}
        if settings != manifest:
            raise FolderConflictError(f"{str(root)!r} holds a dataset written with {settings}, not {manifest}; "
                                      "delete it or choose another folder")
        content = folder_content(root, manifest_name)
        recorded = found.get(CONTENT_KEY)
        if recorded is None:
            _write_manifest(root, {**found, CONTENT_KEY: content}, manifest_name)
        elif recorded != content:
            raise FolderConflictError(
                f"{str(root)!r} no longer holds the files its generator wrote: it has {content['files']} files with "
                f"content sha256 {content['sha256'][:16]}..., the generator wrote {recorded.get('files')} with "
                f"{str(recorded.get('sha256'))[:16]}... (a file was changed, added or deleted). Delete the folder; "
                "it is written again, identically, on the next run")
        return root

    found = _manifest_at(root, manifest_name)
    if found is not None:
        return reuse(found)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.partial-", dir=root.parent))
    try:
        write(staging)
        written = {**manifest, CONTENT_KEY: folder_content(staging, manifest_name)}
        (staging / manifest_name).write_text(json.dumps(written, indent=1, sort_keys=True) + "\n")
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


#: The key of a checkpoint's own digest: SHA-256 of everything else in it (``content_digest``).
DIGEST_KEY = "content_sha256"


def content_digest(state: Any) -> str:
    """SHA-256 of a checkpoint's content: every tensor's dtype, shape and bytes and every plain value, walked in a
    fixed order (mapping keys sorted), so the same content always gives the same digest wherever it was loaded
    (any ``map_location``) and a flipped bit anywhere in the data changes it."""
    digest = hashlib.sha256()

    def feed(tag: str, payload: bytes = b"") -> None:
        digest.update(tag.encode() + len(payload).to_bytes(8, "little") + payload)

    def walk(value: Any) -> None:
        if isinstance(value, torch.Tensor):
            data = value.detach().cpu().contiguous().reshape(-1)
            feed("tensor", f"{data.dtype} {tuple(value.shape)}".encode())
            feed("bytes", data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
        elif isinstance(value, dict):
            feed("dict", str(len(value)).encode())
            for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
                walk(key)
                walk(value[key])
        elif isinstance(value, (list, tuple)):
            feed(type(value).__name__, str(len(value)).encode())
            for item in value:
                walk(item)
        elif isinstance(value, float):
            feed("float", value.hex().encode())
        elif isinstance(value, str):
            feed("str", value.encode("utf-8", "surrogatepass"))
        elif isinstance(value, bytes):
            feed("bytes", value)
        else:  # int, bool, None, torch.dtype, torch.Size...: their repr is exact
            feed(type(value).__name__, repr(value).encode())

    walk(state)
    return digest.hexdigest()


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> None:
    """``torch.save`` to a temp file in the same folder, then rename over ``path``. The file carries its own digest
    (``DIGEST_KEY``: ``content_digest`` of the rest), which ``load_checkpoint`` checks: torch's zip container does
    not check the tensor data it reads, so without it a damaged file would load with wrong weights and no error."""
    state = {key: value for key, value in state.items() if key != DIGEST_KEY}
    state[DIGEST_KEY] = content_digest(state)
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


def _first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type when it has none (torch raises some without one)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint (or a bare state dict) with ``weights_only=True``: tensors and plain Python data only.

    Unpickling arbitrary objects can run arbitrary code, so a file holding anything else is refused, as is an
    empty, truncated or corrupt one, and one whose content does not match the digest ``save_checkpoint`` put in it
    (a file without a digest, such as downloaded backbone weights, is not checked); all raise ``CheckpointError``
    naming the file. The digest key is removed from the returned dict.
    """
    path = Path(path)
    try:
        if path.is_file() and path.stat().st_size == 0:
            raise CheckpointError(f"cannot read checkpoint {str(path)!r}: the file is empty (0 bytes); delete it (a "
                                  "run then starts again from the beginning) or point at another file")
        state = torch.load(path, map_location=map_location, weights_only=True)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"refusing to load {str(path)!r}: it holds objects other than tensors and plain data, and unpickling them "
            f"could run code. Checkpoints written by this project never do; if you trust the file, convert it to a "
            f"plain state dict. ({_first_line(error)})") from None
    except (FileNotFoundError, IsADirectoryError, PermissionError):
        raise
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError, IndexError, KeyError) as error:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupt "
                              f"({_first_line(error)}); delete it (a run restarts from its previous "
                              "epoch only if an older checkpoint exists) or point at another file") from None
    if isinstance(state, dict) and DIGEST_KEY in state:
        recorded = state.pop(DIGEST_KEY)
        actual = content_digest(state)
        if recorded != actual:
            raise CheckpointError(f"checkpoint {str(path)!r} is corrupt: its content does not match the digest "
                                  f"written with it (sha256 {str(recorded)[:16]}... recorded, {actual[:16]}... now), "
                                  "so some of its data changed after it was saved; delete it or point at another "
                                  "file")
    return state
