"""Finding finished runs: each seed's record (``reproduction.records``), replaced by a run folder's result when that
run finished later (a retrained config); and how the code a run was trained at relates to the commit a table is
rendered at."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from reproduction.equivalence import equivalence_chain, load_attestations
from reproduction.records import RECORDS_DIR_NAME, RecordError, newer, record_from_run
from reproduction.spec import SeedRun, TableSpec, TableSpecError
from tasks.common.provenance import REPO_ROOT, git_output
from tasks.common.run_folder import METRICS_NAME, finished_record, read_config

#: The code a trained result depends on, per task: the operator package, the shared task code, the task's own code,
#: the configs (not the table specs), the training entry point and the pinned environment (``requirements.lock``;
#: ``pyproject.toml`` holds ranges and build settings, which the lock resolves). Rendering code
#: (``reproduction/``, and where it lived before, ``tasks/common/results.py`` ...) and the CUDA sources for a run on
#: the CPU are left out.
RESULT_CODE = ("carafe", "tasks/common", "tasks/{task}", "conf", "scripts/train.py", "requirements.lock")

NOT_RESULT_CODE = ("conf/table", "tasks/common/results.py", "tasks/common/figures.py", "tasks/common/records.py",
                   "tasks/common/stats.py", "tasks/common/qualitative.py")

CUDA_CODE = ("cuda", "carafe/backends/cuda.py")
#: The task whose runs provide pretrained backbones (``runs/<it>/<hash>/checkpoint.pt``)
PRETRAINING_TASK = "classification"


def result_code_paths(tasks: str | tuple[str, ...], on_gpu: bool) -> list[str]:
    """The pathspecs of the code a run of ``tasks`` (its own task, then any task it depends on) depends on."""
    tasks = (tasks,) if isinstance(tasks, str) else tasks
    paths = list(dict.fromkeys(p.format(task=task) for p in RESULT_CODE for task in tasks))
    excluded = list(NOT_RESULT_CODE) + ([] if on_gpu else list(CUDA_CODE))
    return paths + (["cuda"] if on_gpu else []) + [f":(exclude){p}" for p in excluded]


def code_tasks(record: dict[str, Any]) -> tuple[str, ...]:
    """The tasks whose code a run's result depends on: its own, and the classification task's when it started
    from a pretraining run of this repository (``model.backbone_weights`` under ``runs/classification/``: the
    backbone that run trained is part of the result)."""
    model = (record.get("config") or {}).get("model") or {}
    weights = model.get("backbone_weights") if isinstance(model, dict) else None
    task = str(record.get("task", ""))
    pretrained = isinstance(weights, str) and weights.startswith(f"runs/{PRETRAINING_TASK}/")
    return (task, PRETRAINING_TASK) if pretrained and task != PRETRAINING_TASK else (task,)


def code_status(run_commit: str, task: str | tuple[str, ...], on_gpu: bool, against: str,
                cache: dict | None = None) -> str:
    """How the code a run was trained at relates to commit ``against`` (the commit a table is rendered at):
    ``current`` (no result-affecting file differs), ``equivalent`` (some did, but a chain of attestations of
    ``results/code-equivalence.json`` shows the two train bit-identically: ``reproduction.equivalence``),
    ``changed`` (they differ otherwise), ``uncommitted`` (the run was trained from a tree with uncommitted changes:
    its code cannot be recovered), or ``unknown`` (a commit this clone does not have). ``task`` is the run's task
    or the tuple ``code_tasks`` gives (its own and those it depends on)."""
    task = (task,) if isinstance(task, str) else tuple(task)
    key = (run_commit, task, on_gpu, against)
    cache = {} if cache is None else cache
    if key in cache:
        return cache[key]
    if run_commit.endswith("+dirty"):
        status = "uncommitted"
    elif run_commit == "unknown" or against in ("", "unknown"):
        status = "unknown"
    else:
        try:
            git_output("cat-file", "-e", f"{run_commit}^{{commit}}")
            git_output("cat-file", "-e", f"{against}^{{commit}}")
            same = _same_result_code(run_commit, against, task, on_gpu, cache)
            status = "current" if same else "changed"
            if not same:
                if "attestations" not in cache:
                    cache["attestations"] = load_attestations()
                chain = equivalence_chain(run_commit, against, task, on_gpu, cache["attestations"],
                                          lambda a, b: _same_result_code(a, b, task, on_gpu, cache, False))
                status = "changed" if chain is None else "equivalent"
        except (OSError, subprocess.CalledProcessError, _UnknownCommit):
            status = "unknown"
    cache[key] = status
    return status


class _UnknownCommit(Exception):
    pass


def _same_result_code(a: str, b: str, task: tuple[str, ...], on_gpu: bool, cache: dict, strict: bool = True) -> bool:
    """Whether the task's result-affecting code is the same at commits ``a`` and ``b``. A commit this clone lacks
    raises ``_UnknownCommit`` when ``strict``, else counts as different (an attestation naming it leads nowhere)."""
    key = ("same", a, b, task, on_gpu)
    if key not in cache:
        changed = subprocess.run(["git", "-C", str(REPO_ROOT), "diff", "--quiet", a, b, "--",
                                  *result_code_paths(task, on_gpu)], capture_output=True, check=False).returncode
        if changed not in (0, 1):
            if strict:
                raise _UnknownCommit(a if changed else b)
            return False
        cache[key] = cache[("same", b, a, task, on_gpu)] = changed == 0
    return cache[key]


@dataclass
class FinishedRun:
    """A finished run found in a run folder by ``index_runs``: its record (``reproduction.records``) and its folder
    (which also holds the trained model)."""
    record: dict[str, Any]
    run_dir: Path | None = None

def shown_path(path: str | Path) -> str:
    """A path as the rendered files may show it: relative to the repository, or only its last part when it lies
    outside (results/ never names a file outside the repository)."""
    path = Path(path).absolute()
    if path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return f"<outside the repository>/{path.name}"

def record_of_run_folder(run_dir: Path) -> dict[str, Any] | None:
    """The record of the finished run in ``run_dir`` (its ``metrics.json`` and resolved ``config.yaml``), None if it
    has not finished; ``RecordError`` if what it holds is malformed."""
    try:
        metrics = finished_record(run_dir)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{run_dir / METRICS_NAME}: not readable ({error})") from None
    if metrics is None:
        return None
    cfg = read_config(run_dir)
    config = None if cfg is None else OmegaConf.to_container(cfg)
    return record_from_run(metrics, config)

def index_runs(*sources: str | Path) -> dict[str, FinishedRun]:
    """Finished runs found in the folders ``sources`` (run folders, a runs store, Hydra sweep folders), by config
    hash; of several runs of one config the most recently finished wins. A folder whose ``metrics.json`` is malformed
    is named on stderr and skipped."""
    found: dict[str, FinishedRun] = {}
    for source in sources:
        source = Path(source)
        if source.is_file():
            raise TableSpecError(f"{source} is a file; --from takes folders of run folders (a rendered table keeps no "
                                 f"results of its own: its runs' records are in results/{RECORDS_DIR_NAME}/)")
        if not source.exists():
            continue
        for path in sorted(source.rglob(METRICS_NAME)):
            try:
                record = record_of_run_folder(path.parent)
            except (RecordError, OSError, ValueError) as error:
                print(f"skipping {shown_path(path.parent)}: {error}", file=sys.stderr)
                continue
            if record is None:
                continue
            previous = found.get(record["config_hash"])
            if previous is None or newer(record, previous.record) or record == previous.record:
                found[record["config_hash"]] = FinishedRun(record, path.parent)
    return found

def attach_run(run: SeedRun, finished: FinishedRun) -> None:
    run.record = finished.record
    run.run_dir = str(finished.run_dir) if finished.run_dir is not None else ""

def attach_records(spec: TableSpec, records: dict[str, dict[str, Any]],
                   folders: dict[str, FinishedRun] | None = None) -> list[dict[str, Any]]:
    """Give every seed of ``spec`` its run: the record of its config hash, or a finished run folder's when that one
    finished later (a retrained config replaces its record). Returns the records that are new or replace one in
    ``records`` (the caller writes them)."""
    replaced = []
    for row in spec.rows:
        for run in row.runs:
            folder = (folders or {}).get(run.config_hash)
            record = records.get(run.config_hash)
            if folder is not None and newer(folder.record, record):
                replaced.append(folder.record)
                records[run.config_hash] = folder.record
                attach_run(run, folder)
            elif record is not None:
                run.record = record
                if folder is not None and folder.record.get("finished_at") == record.get("finished_at"):
                    run.run_dir = str(folder.run_dir)
    return replaced

def on_gpu(record: dict[str, Any]) -> bool:
    device = str(record.get("device", ""))
    return not device.endswith("threads)") and device not in ("", "cpu")

def mark_code(spec: TableSpec, against: str, cache: dict | None = None) -> None:
    """Set each finished seed's ``code`` against ``against`` (the commit the table is rendered at)."""
    against = against.removesuffix("+dirty")
    cache = {} if cache is None else cache
    for row in spec.rows:
        for run in row.runs:
            run.code = "" if run.record is None else code_status(
                str(run.record.get("commit", "unknown")), code_tasks(run.record), on_gpu(run.record), against, cache)
