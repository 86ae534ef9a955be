"""One record per finished run: ``results/runs/<config hash>.json``, the only home of a run's measured values.

A rendered table names its runs by config hash and reads their values from these records; it keeps no copy of them.
Retraining a config replaces its record (the most recently finished run of a config wins), and every table that uses
it shows the new values when rendered again (``make check-results`` finds a table that was not).

A record is the run folder's ``metrics.json`` (written by ``tasks.common.experiment``) plus the resolved config:

    format         RECORD_FORMAT
    config_hash    12 hex digits, the file's name
    status         "finished"
    task, scale    e.g. "detection", "tiny"
    metrics        every metric the evaluation returned (nested names allowed), finite numbers
    primary_metric, history (per epoch: training losses, validation metrics), dataset, device, world_size, threads,
    train_seconds  summed over every resumed segment of the run
    wall_seconds   summed over the segments; ``segments`` has each one's wall and training seconds
    commit         the commit the run was trained at; ``clean`` whether the tree had no uncommitted change, and if it
                   had, ``diff_sha256`` of that change (``git diff HEAD`` and the untracked files)
    finished_at, torch, config (the resolved config the run trained with)
    cpu            the CPU's family / model and torch's CPU capability (``tasks.common.provenance.cpu_kernels``)
    weights_sha256 the content digest of the run's final weights (``tasks.common.io.content_digest``)
    backbone_weights  for a run that started from pretrained weights: their ``path`` as configured and the ``sha256``
                   of the weights it loaded, equal to the pretraining run's ``weights_sha256`` when it loaded that
                   training's checkpoint (records written before these two existed have neither)

Records recovered from tables rendered before records existed (``scripts/recover_records.py``) hold what those tables
kept: the metrics they showed, the run's commit, device, times and dataset; ``recovered_from`` names the table file
and ``not_recorded`` lists what is missing (history, per-class values, segments ...).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

from tasks.common.io import write_json_atomic
from tasks.common.provenance import REPO_ROOT

RECORD_FORMAT = 1
RECORDS_DIR_NAME = "runs"
RECORDS_DIR = REPO_ROOT / "results" / RECORDS_DIR_NAME
HASH_RE = re.compile(r"[0-9a-f]{12}")
COMMIT_RE = re.compile(r"([0-9a-f]{40}(\+dirty)?|unknown)")
#: Metric leaf names that are percentages (AP, AR, mIoU, accuracy ...): a value outside [0, 100] is refused.
PERCENT_RE = re.compile(r"(^|_)(AP|AR|mIoU|mAcc|IoU|acc|top\d+)[A-Za-z0-9]*$", re.IGNORECASE)
TEXT_LIMIT = 400


class RecordError(ValueError):
    """A run record that is missing, malformed or inconsistent; the message names the file and the field."""


def record_path(config_hash: str, records_dir: str | Path = RECORDS_DIR) -> Path:
    if not isinstance(config_hash, str) or not HASH_RE.fullmatch(config_hash):
        raise RecordError(f"{config_hash!r} is not a config hash (12 hex digits)")
    return Path(records_dir) / f"{config_hash}.json"


def _check_text(value: Any, where: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        raise RecordError(f"{where} must be a string, got {type(value).__name__}")
    if len(value) > TEXT_LIMIT or any(ord(ch) < 32 for ch in value):
        raise RecordError(f"{where} must be one line of at most {TEXT_LIMIT} characters, got {value[:80]!r}...")


def _check_number(value: Any, where: str, low: float | None = None, high: float | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecordError(f"{where} must be a number, got {type(value).__name__} {value!r}"[:200])
    if not math.isfinite(value):
        raise RecordError(f"{where} must be finite, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RecordError(f"{where} = {value!r} is outside [{low}, {high}]")


def _check_metrics(node: Any, where: str, depth: int = 0) -> None:
    if not isinstance(node, dict) or depth > 4:
        raise RecordError(f"{where} must be a mapping of metric names to numbers")
    for key, value in node.items():
        if not isinstance(key, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,80}", key):
            raise RecordError(f"{where}: {key!r} is not a metric name")
        if isinstance(value, dict):
            _check_metrics(value, f"{where}.{key}", depth + 1)
        elif PERCENT_RE.search(key):
            _check_number(value, f"{where}.{key}", 0.0, 100.0)
        elif key.lower() in ("l1", "l2", "psnr", "ssim", "loss"):
            _check_number(value, f"{where}.{key}", 0.0, 1000.0)
        else:
            _check_number(value, f"{where}.{key}")


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value) is not None


def validate_record(record: Any, where: str) -> dict[str, Any]:
    """``record`` if it is a well-formed finished run's record, else ``RecordError`` naming ``where`` and the
    field."""
    if not isinstance(record, dict):
        raise RecordError(f"{where}: a run record is a JSON object, got {type(record).__name__}")
    if record.get("format") != RECORD_FORMAT:
        raise RecordError(f"{where}: format is {record.get('format')!r}, expected {RECORD_FORMAT}")
    for key in ("config_hash", "status", "task", "scale", "metrics", "commit", "dataset", "device", "finished_at"):
        if key not in record:
            raise RecordError(f"{where}: no {key!r}")
    if not isinstance(record["config_hash"], str) or not HASH_RE.fullmatch(record["config_hash"]):
        raise RecordError(f"{where}: config_hash {record['config_hash']!r} is not 12 hex digits")
    if record["status"] != "finished":
        raise RecordError(f"{where}: status is {record['status']!r}; only finished runs have records")
    for key in ("task", "scale"):
        if not isinstance(record[key], str) or not re.fullmatch(r"[a-z][a-z0-9_]{0,40}", record[key]):
            raise RecordError(f"{where}: {key} {record[key]!r} is not a name")
    _check_metrics(record["metrics"], f"{where}: metrics")
    if not record["metrics"]:
        raise RecordError(f"{where}: metrics is empty (a finished run was evaluated)")
    if not isinstance(record["commit"], str) or not COMMIT_RE.fullmatch(record["commit"]):
        raise RecordError(f"{where}: commit {record['commit']!r} is not a 40-digit commit (+dirty)")
    for key in ("dataset", "device", "finished_at"):
        _check_text(record[key], f"{where}: {key}")
    for key in ("torch", "primary_metric", "recovered_from", "diff_sha256", "cpu"):
        _check_text(record.get(key), f"{where}: {key}", optional=True)
    for key in ("train_seconds", "wall_seconds"):
        if record.get(key) is not None:
            _check_number(record[key], f"{where}: {key}", 0.0)
    for key in ("world_size", "threads"):
        value = record.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise RecordError(f"{where}: {key} must be a whole number >= 1, got {value!r}")
    if record.get("weights_sha256") is not None and not _is_sha256(record["weights_sha256"]):
        raise RecordError(f"{where}: weights_sha256 {record['weights_sha256']!r} is not 64 hex digits")
    loaded = record.get("backbone_weights")
    if loaded is not None:
        if not isinstance(loaded, dict) or set(loaded) != {"path", "sha256"} or not _is_sha256(loaded["sha256"]):
            raise RecordError(f"{where}: backbone_weights must be {{'path': ..., 'sha256': <64 hex digits>}}, "
                              f"got {loaded!r}"[:300])
        _check_text(loaded["path"], f"{where}: backbone_weights.path")
    if record.get("clean") not in (True, False, None):
        raise RecordError(f"{where}: clean must be true, false or null, got {record.get('clean')!r}")
    for key in ("config", "history", "segments", "not_recorded"):
        expected = dict if key == "config" else list
        if record.get(key) is not None and not isinstance(record[key], expected):
            raise RecordError(f"{where}: {key} must be a {'mapping' if expected is dict else 'list'} or null")
    return record


def read_record_file(path: str | Path) -> dict[str, Any]:
    """The validated record in ``path``; its name must be its config hash."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise RecordError(f"{path}: no such run record") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{path}: not a readable JSON run record ({error})") from None
    validate_record(record, str(path))
    if path.stem != record["config_hash"]:
        raise RecordError(f"{path}: holds the record of run {record['config_hash']}, not of {path.stem}")
    return record


def load_records(records_dir: str | Path = RECORDS_DIR) -> dict[str, dict[str, Any]]:
    """Every record in ``records_dir`` by config hash (an empty mapping when the folder does not exist)."""
    records_dir = Path(records_dir)
    if not records_dir.is_dir():
        return {}
    return {path.stem: read_record_file(path) for path in sorted(records_dir.glob("*.json"))}


def write_record(record: dict[str, Any], records_dir: str | Path = RECORDS_DIR) -> Path:
    """Validate ``record`` and write it to ``records_dir/<config hash>.json`` (atomically, replacing the old one)."""
    record = {"format": RECORD_FORMAT, **record}
    validate_record(record, f"the record of run {record.get('config_hash')!r}")
    path = record_path(record["config_hash"], records_dir)
    write_json_atomic(path, record)
    return path


def record_from_run(metrics_record: dict[str, Any], config: dict[str, Any] | None) -> dict[str, Any]:
    """A run folder's ``metrics.json`` content and its resolved config as a record (validated)."""
    record = {"format": RECORD_FORMAT, **{k: v for k, v in metrics_record.items() if k != "format"}, "config": config}
    return validate_record(record, f"the run {metrics_record.get('config_hash')!r}")


def newer(candidate: dict[str, Any], current: dict[str, Any] | None) -> bool:
    """Whether ``candidate`` replaces ``current`` (a record of the same config): it finished later."""
    return current is None or str(candidate.get("finished_at", "")) > str(current.get("finished_at", ""))
