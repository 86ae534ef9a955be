"""Compiling the CPU kernels (``carafe/csrc/reassemble_cpu.cpp``) into shared libraries, at install time or later.

The library is plain C++ with a C ABI (no Python or libtorch headers), built once per instruction-set level, so one
installation serves every CPU of a cluster and the process loads the widest level its CPU runs (x86-64: baseline
``x86-64``, ``avx2`` and ``avx512``; other machines: ``generic``). Where it comes from, in order:

1. **Prebuilt**, in ``carafe/_native/``: compiled when the package was installed (``pip install .``, a wheel, the
   editable install of ``make setup``). ``manifest.json`` there records each library's SHA-256 and flags and the
   SHA-256 of the source it was compiled from; a library is used only if all three match this installation, so an
   edited source or other flags never load a stale build. No compiler is needed.
2. **Cached**, in ``$CARAFE_BUILD_DIR`` (default: the platform's cache folder, ``$XDG_CACHE_HOME/carafe`` or
   ``~/.cache/carafe`` on Linux), under a name that hashes the source, the level, the flags and the compiler's name;
   reading it needs no compiler. Beside it lies its SHA-256; a library that does not match it is rebuilt.
3. **Compiled on first use** into that cache (a one-line notice says so; it takes tens of seconds). Pre-build with::

       python -m carafe.build               # every level this compiler can build (a cache shared by a cluster)
       python -m carafe.build --host        # only the level of this CPU
       python -m carafe.build --info        # which library this process would load, and why

Environment: ``CXX`` (the compiler, default ``g++``), ``CARAFE_CXXFLAGS`` (extra flags, appended; a prebuilt
library built without them is not used), ``CARAFE_CPU_LEVEL`` (force a level, e.g. ``x86-64`` to compare),
``CARAFE_BUILD_DIR`` (the cache), and at install time ``CARAFE_BUILD_LEVELS`` (``all``, ``host``, ``none`` or a
comma-separated list; default ``all``).

This module uses only the standard library: ``setup.py`` loads it by path to build the wheel, without torch.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE = PACKAGE_DIR / "csrc" / "reassemble_cpu.cpp"
PREBUILT_DIR = PACKAGE_DIR / "_native"
MANIFEST_NAME = "manifest.json"
LIBRARY_STEM = "reassemble_cpu"
COMMON_FLAGS = ("-O3", "-fopenmp-simd", "-std=c++17", "-shared", "-fPIC", "-pthread")

_V2 = ("-march=x86-64-v2", "-mtune=generic")
_AVX2 = ("-mavx", "-mavx2", "-mfma", "-mf16c")
_AVX512 = ("-mavx512f", "-mavx512cd", "-mavx512vl", "-mavx512bw", "-mavx512dq")
# Instruction-set levels, narrowest first, with their compiler flags and the /proc/cpuinfo flags a CPU needs to run
# them (x86-64-v2's own: cx16, lahf_lm, popcnt, pni = SSE3, ssse3, sse4_1, sse4_2). The kernels pick their vector
# width from the compiler's __AVX512F__ / __AVX__ macros, so each level is the same source compiled once more.
_X86_CPU_V2 = ("cx16", "lahf_lm", "popcnt", "pni", "ssse3", "sse4_1", "sse4_2")
X86_LEVELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "x86-64": (("-march=x86-64", "-mtune=generic"), ("sse2",)),
    "avx2": (_V2 + _AVX2, _X86_CPU_V2 + ("avx", "avx2", "fma", "f16c")),
    "avx512": (_V2 + _AVX2 + _AVX512,
               _X86_CPU_V2 + ("avx", "avx2", "fma", "f16c", "avx512f", "avx512cd", "avx512vl", "avx512bw", "avx512dq")),
}
GENERIC_LEVELS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {"generic": ((), ())}
# torch.backends.cpu.get_cpu_capability() names, for CPUs whose flags /proc/cpuinfo does not list (macOS, Windows).
_TORCH_CAPABILITY = {"AVX512": "avx512", "AVX2": "avx2"}

log = logging.getLogger("carafe")


class BuildError(RuntimeError):
    """The kernels could not be compiled, written or found."""


# --- instruction-set levels ---------------------------------------------------------------------------------------

def is_x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64", "x86-64")


def levels() -> dict[str, tuple[tuple[str, ...], tuple[str, ...]]]:
    """This machine's levels, narrowest first: name -> (compiler flags, CPU flags needed)."""
    return X86_LEVELS if is_x86_64() else GENERIC_LEVELS


def _cpuinfo_flags() -> set[str] | None:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.partition(":")[2].split())
    return None


def supported_levels(cpu_flags: set[str] | None = None) -> list[str]:
    """The levels this CPU runs, narrowest first (``cpu_flags``: its /proc/cpuinfo flags; read when None)."""
    table = levels()
    if not is_x86_64():
        return list(table)
    flags = _cpuinfo_flags() if cpu_flags is None else cpu_flags
    if flags is None:  # no /proc/cpuinfo: ask torch, which reads CPUID (and lets ATEN_CPU_CAPABILITY narrow it)
        widest = "x86-64"
        try:
            import torch

            widest = _TORCH_CAPABILITY.get(torch.backends.cpu.get_cpu_capability(), "x86-64")
        except Exception:  # noqa: BLE001 -- without torch (setup.py), the baseline is always safe
            pass
        names = list(table)
        return names[:names.index(widest) + 1]
    return [name for name, (_, needed) in table.items() if set(needed) <= flags]


def host_level() -> str:
    """The widest level this CPU runs, or the one ``CARAFE_CPU_LEVEL`` names (which it must be able to run)."""
    supported = supported_levels()
    forced = os.environ.get("CARAFE_CPU_LEVEL")
    if forced:
        if forced not in levels():
            raise BuildError(f"CARAFE_CPU_LEVEL={forced!r} is not a level of this machine; choose one of "
                             + ", ".join(levels()))
        if forced not in supported:
            raise BuildError(f"CARAFE_CPU_LEVEL={forced!r}: this CPU cannot run it (it runs "
                             + ", ".join(supported) + ")")
        return forced
    return supported[-1]


def extra_flags() -> list[str]:
    return shlex.split(os.environ.get("CARAFE_CXXFLAGS", ""))


def compiler_flags(level: str) -> list[str]:
    """Every flag the library of ``level`` is compiled with (``CARAFE_CXXFLAGS`` last, so it can override)."""
    return [*COMMON_FLAGS, *levels()[level][0], *extra_flags()]


def compiler() -> str:
    """The C++ compiler's name (``CXX``, default ``g++``); not looked up, so naming it needs no compiler."""
    return os.environ.get("CXX", "g++")


def find_compiler() -> str:
    cxx = compiler()
    if shutil.which(cxx) is None:
        raise BuildError(f"no C++ compiler: {cxx!r} is not on PATH (install g++, or set CXX to a C++17 compiler)")
    return cxx


def compiler_version(cxx: str) -> str:
    result = subprocess.run([cxx, "--version"], capture_output=True, text=True)
    return (result.stdout.strip().splitlines() or ["unknown"])[0]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def library_name(level: str) -> str:
    return f"{LIBRARY_STEM}-{level}.so"


# --- compiling, atomically ----------------------------------------------------------------------------------------

def compile_library(cxx: str, level: str, output: Path, source: Path = SOURCE) -> None:
    """Compile ``source`` for ``level`` into ``output`` (not atomic; see ``write_atomically``)."""
    result = subprocess.run([cxx, *compiler_flags(level), str(source), "-o", str(output)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        text = result.stderr.strip() or result.stdout.strip() or "(the compiler printed nothing)"
        raise BuildError(f"the C++ compiler {cxx!r} failed on {source} with exit status {result.returncode}: {text}\n"
                         "Set CXX to a working C++17 compiler (for example CXX=g++) or install g++.")


def temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}.tmp")


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` into a temporary file beside ``path``, then rename it over ``path``: readers never see half a file."""
    tmp = temp_path(path)
    try:
        tmp.write_bytes(b"")  # fails here, with the folder named, if it is not writable
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temp_files(folder: Path) -> None:
    """Delete the temporary files of builds whose process is gone (killed mid-build); live builds keep theirs."""
    for tmp in folder.glob(f".{LIBRARY_STEM}-*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


# --- the prebuilt libraries of the installation -------------------------------------------------------------------

def read_manifest(folder: Path = PREBUILT_DIR) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def prebuilt_problem(level: str, folder: Path = PREBUILT_DIR, manifest: dict | None = None) -> str | None:
    """None if ``folder`` holds a library of ``level`` usable here, else why it is not."""
    manifest = read_manifest(folder) if manifest is None else manifest
    if manifest is None:
        return f"no {MANIFEST_NAME} in {folder} (the package was installed without compiling the kernels)"
    entry = manifest.get("levels", {}).get(level)
    if entry is None:
        return f"no {level} library was built at install time (built: {', '.join(manifest.get('levels', {}))})"
    try:
        source = file_digest(SOURCE)
    except OSError:
        return f"the kernel source {SOURCE} is missing"
    if manifest.get("source_sha256") != source:
        return f"{SOURCE.name} has changed since the library was built"
    if entry.get("flags") != compiler_flags(level):
        return "it was built with other flags than this process asks for (CARAFE_CXXFLAGS)"
    try:
        if file_digest(folder / entry["file"]) != entry.get("sha256"):
            return f"{folder / entry['file']} does not match its recorded SHA-256 (damaged)"
    except OSError:
        return f"{folder / entry['file']} is missing"
    return None


def prebuilt_library(folder: Path = PREBUILT_DIR) -> tuple[Path | None, str]:
    """The widest prebuilt library this CPU runs (a narrower one beats compiling), or None; and a note on the choice."""
    wanted = host_level()
    manifest = read_manifest(folder)
    candidates = supported_levels()
    candidates = candidates[:candidates.index(wanted) + 1] if wanted in candidates else [wanted]
    problems = []
    for level in reversed(candidates):
        problem = prebuilt_problem(level, folder, manifest)
        if problem is None:
            return folder / manifest["levels"][level]["file"], f"prebuilt {level}"
        problems.append(f"{level}: {problem}")
    return None, "; ".join(problems)


def build_prebuilt(folder: Path, wanted: Iterable[str], reuse_from: Path | None = None,
                   report: Callable[[str], None] = print) -> dict:
    """Compile the libraries of ``wanted`` levels into ``folder`` with their manifest (what ``setup.py`` runs).

    A level whose flags this compiler does not know is left out with a message, not an error: the levels that
    built still serve, and the cache fills the rest at run time. ``reuse_from``: a folder of an earlier build whose
    libraries are copied when they came from the same source, flags and compiler version.
    """
    cxx = find_compiler()
    version = compiler_version(cxx)
    source = file_digest(SOURCE)
    folder.mkdir(parents=True, exist_ok=True)
    earlier = read_manifest(reuse_from) if reuse_from is not None else None
    built: dict[str, dict] = {}

    def one(level: str) -> tuple[str, dict | None]:
        target = folder / library_name(level)
        flags = compiler_flags(level)
        old = (earlier or {}).get("levels", {}).get(level)
        if (earlier and old and earlier.get("source_sha256") == source and earlier.get("compiler") == version
                and old.get("flags") == flags and reuse_from is not None
                and file_digest(reuse_from / old["file"]) == old.get("sha256")):
            if reuse_from.resolve() != folder.resolve():
                write_atomically(target, lambda tmp: shutil.copyfile(reuse_from / old["file"], tmp))
            report(f"carafe: {level}: reusing {reuse_from / old['file']} (same source, flags and compiler)")
        else:
            try:
                write_atomically(target, lambda tmp: compile_library(cxx, level, tmp))
            except BuildError as err:
                report(f"carafe: {level}: not built ({str(err).splitlines()[0][:300]})")
                return level, None
            report(f"carafe: {level}: compiled {target}")
        return level, {"file": target.name, "sha256": file_digest(target), "flags": flags}

    jobs = max(1, min(len(list(wanted)) or 1, os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
        for level, entry in pool.map(one, list(wanted)):
            if entry is not None:
                built[level] = entry
    manifest = {"source_sha256": source, "compiler": version, "machine": platform.machine(), "levels": built}
    write_atomically(folder / MANIFEST_NAME, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1) + "\n"))
    return manifest


def install_levels(spec: str | None = None) -> list[str]:
    """The levels ``CARAFE_BUILD_LEVELS`` (or ``spec``) asks an installation to build."""
    spec = (os.environ.get("CARAFE_BUILD_LEVELS", "all") if spec is None else spec).strip()
    if spec == "all":
        return list(levels())
    if spec == "none":
        return []
    if spec == "host":
        return [host_level()]
    names = [name.strip() for name in spec.split(",") if name.strip()]
    unknown = [name for name in names if name not in levels()]
    if unknown:
        raise BuildError(f"CARAFE_BUILD_LEVELS: unknown level(s) {', '.join(unknown)}; choose 'all', 'host', "
                         "'none' or some of " + ", ".join(levels()))
    return names


# --- the cache for builds after installation ----------------------------------------------------------------------

def cache_dir() -> Path:
    """``$CARAFE_BUILD_DIR``, else ``carafe`` in the platform's cache folder."""
    if os.environ.get("CARAFE_BUILD_DIR"):
        return Path(os.environ["CARAFE_BUILD_DIR"])
    if sys.platform == "darwin":
        base = Path.home() / "Library" / "Caches"
    elif sys.platform == "win32":
        base = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local"))
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "carafe"


def digest_path(library: Path) -> Path:
    """Where the SHA-256 of a cached ``library``, recorded when it was built, is kept."""
    return library.with_name(library.name + ".sha256")


def is_valid_build(library: Path) -> bool:
    """True if ``library`` exists and its bytes hash to the digest recorded at build time (a truncated or otherwise
    damaged file could crash the process when called, so it is rebuilt instead of loaded)."""
    try:
        return digest_path(library).read_text().strip() == file_digest(library)
    except OSError:
        return False


def cached_library_path(level: str) -> Path:
    """The cache entry for ``level``: its name hashes everything that changes the binary, read without a compiler."""
    key = hashlib.sha256("\0".join([SOURCE.read_text(), level, *compiler_flags(level), compiler(),
                                    platform.machine()]).encode()).hexdigest()[:16]
    return cache_dir() / f"{LIBRARY_STEM}-{level}-{key}.so"


def build_library(level: str | None = None) -> Path:
    """The cached library of ``level`` (default: this CPU's), compiled first unless a valid one is there.

    The library and its recorded SHA-256 are each written to a temporary file and renamed, so concurrent builds
    (DDP workers, pytest-xdist) are safe and a killed build leaves no half-written library under the final name.
    """
    level = host_level() if level is None else level
    target = cached_library_path(level)
    if is_valid_build(target):
        return target
    cxx = find_compiler()
    folder = target.parent
    log.warning("carafe: compiling the C++ kernels (%s) into %s, once; this takes tens of seconds "
                "(run `python -m carafe.build` beforehand to avoid it)", level, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(folder)
        write_atomically(target, lambda tmp: compile_library(cxx, level, tmp))
        write_atomically(digest_path(target), lambda tmp: tmp.write_text(file_digest(target) + "\n"))
    except OSError as err:
        raise BuildError(f"writing the compiled kernels to {folder} failed ({err}); set CARAFE_BUILD_DIR to a "
                         "writable folder") from None
    return target


def library_to_load() -> tuple[Path, str]:
    """The library this process loads, and where it comes from: prebuilt, else cached, else compiled now."""
    prebuilt, note = prebuilt_library()
    if prebuilt is not None:
        return prebuilt, note
    level = host_level()
    cached = cached_library_path(level)
    source = f"cached {level}" if is_valid_build(cached) else f"compiled {level} at first use"
    return build_library(level), f"{source} (not prebuilt: {note})"


# --- python -m carafe.build ---------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m carafe.build", description=(
        "Compile the CARAFE CPU kernels into the cache ($CARAFE_BUILD_DIR, default the platform's cache folder), "
        "so that no process compiles them on first use (for example while building a container image)."))
    parser.add_argument("--host", action="store_true", help="only the level this CPU runs (default: every level)")
    parser.add_argument("--levels", help="comma-separated levels to build (of: " + ", ".join(levels()) + ")")
    parser.add_argument("--info", action="store_true", help="say which library this process would load, build none")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.info:
        print(f"CPU levels: {', '.join(supported_levels())} (loads {host_level()})")
        prebuilt, note = prebuilt_library()
        print(f"prebuilt: {prebuilt}" if prebuilt else f"prebuilt: none ({note})")
        cached = cached_library_path(host_level())
        print(f"cache: {cached} ({'valid' if is_valid_build(cached) else 'not built'})")
        return 0
    wanted = [host_level()] if args.host else install_levels(args.levels or "all")
    failed = []
    for level in wanted:
        try:
            print(f"{level}: {build_library(level)}")
        except BuildError as err:
            failed.append(level)
            print(f"{level}: failed: {err}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
