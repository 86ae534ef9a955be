"""Where a number came from: the commit, the device, the time."""

from __future__ import annotations

import datetime as _dt
import platform
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit(root: Path = REPO_ROOT) -> str:
    """The checked-out commit, with ``+dirty`` when tracked files other than the generated ``results/`` differ from
    it; ``unknown`` outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!results"],
                               cwd=root, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def device_name(device: torch.device | str | None = None) -> str:
    """``NVIDIA H100 80GB HBM3`` for a GPU, the CPU's model name and core count for the CPU."""
    device = torch.device(device) if device is not None else None
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def cpu_kernels() -> str:
    """What decides which CPU kernels torch runs, and so the rounding of a CPU run: the CPU's family / model / stepping
    (``/proc/cpuinfo``) and the vector instruction set torch dispatches to (``AVX2``, ``AVX512`` ...). The same code
    and seed can train to other weights where this differs."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("vendor_id", "cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:
                break
    except OSError:
        pass
    described = ", ".join(f"{key} {value}" for key, value in fields.items()) or platform.machine()
    return f"{described}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def git_output(*args: str, root: Path = REPO_ROOT, text: bool = True) -> str | bytes:
    """``git -C <root> <args>``'s output (always run in this repository, never in a folder taken from input)."""
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=text, check=True).stdout


def uncommitted_changes(root: Path = REPO_ROOT) -> list[str]:
    """The paths that differ from the checked-out commit (tracked changes and untracked files that git does not
    ignore), leaving out the generated ``results/``; ``["(not a git checkout)"]`` outside git."""
    try:
        lines = str(git_output("status", "--porcelain", "--", ".", ":!results", root=root)).splitlines()
    except (OSError, subprocess.CalledProcessError):
        return ["(not a git checkout)"]
    return [line[3:] for line in lines if line.strip()]


def git_state(root: Path = REPO_ROOT) -> dict[str, object]:
    """What a run's record says about its code: ``commit`` (``+dirty`` with uncommitted changes), ``clean``, and for
    a dirty tree ``diff_sha256``, the SHA-256 of ``git diff HEAD`` (binary) followed by each untracked file's path and
    content, so that two runs from the same uncommitted change can be told apart from two different changes."""
    import hashlib

    commit = git_commit(root)
    if commit == "unknown":
        return {"commit": commit, "clean": None, "diff_sha256": None}
    if not commit.endswith("+dirty") and not uncommitted_changes(root):
        return {"commit": commit, "clean": True, "diff_sha256": None}
    digest = hashlib.sha256(bytes(git_output("diff", "HEAD", "--binary", "--", ".", ":!results", root=root, text=False)))
    untracked = str(git_output("ls-files", "--others", "--exclude-standard", "-z", "--", ".", ":!results", root=root))
    for name in sorted(filter(None, untracked.split("\0"))):
        digest.update(b"\0" + name.encode())
        try:
            digest.update((root / name).read_bytes())
        except OSError:
            pass
    base = commit.removesuffix("+dirty")
    return {"commit": base + "+dirty", "clean": False, "diff_sha256": digest.hexdigest()}
