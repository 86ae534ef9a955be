"""Refactors that keep every result: an attestation that training at one commit gives bit-identical models and
metrics to training at another, so that runs trained at the first still count as trained at the current code.

A table marks a run † when the result-affecting code (``reproduction.runs.RESULT_CODE``) differs between the commit
it was trained at and the commit the table is rendered at. A pure refactor (code moved between modules, names
changed, a function split) changes those files without changing what training computes; without a way to show that,
every refactor would mark every trained run stale. ``results/code-equivalence.json`` holds the proof:

    {"format": 1, "attestations": [
      {"from": "<40 hex>", "to": "<40 hex>", "tasks": ["classification", "detection", ...], "device": "cpu",
       "threads": 2, "torch": "2.15.0+...", "created": "2026-12-03 18:00:00 UTC",
       "checks": [{"name": "detection-mask-rcnn-carafe", "task": "detection", "overrides": [...],
                   "config_hash": "<12 hex>", "state_sha256": "<64 hex>", "results_sha256": "<64 hex>",
                   "seconds": {"from": 41.2, "to": 40.8}}, ...]}]}

Each check trained the same short run (a few iterations of every step a table's run takes: the task's data,
model, optimizer, warm-up, clipping, checkpoint, evaluation) in an export of each commit, in its own folder and
with its own embedded data, and found the same config hash, the same trained weights (``state_sha256``, every tensor
of the model's state dict in key order) and the same metrics and per-epoch history (``results_sha256``, times left
out). An attestation covers the tasks it has checks for, and only runs on the CPU (``device``): the CUDA code is
result-affecting only for GPU runs, which a CPU check does not exercise.

``reproduction.runs.code_status`` then calls a run ``equivalent`` (no mark; the provenance says so and names the
commits) when a chain of attestations leads from its commit's result code to the render commit's. An attestation is
as strong as its checks: make one only for a change meant to change nothing, never to excuse a change of behaviour
that the checks happen not to reach.

    python -m reproduction.equivalence --from f4607b8 --to HEAD        # train the checks at both, append if equal
    python -m reproduction.equivalence --list                          # the attestations this checkout holds
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.common.io import write_json_atomic
from tasks.common.provenance import REPO_ROOT, git_output, utc_now

EQUIVALENCE_FORMAT = 1
EQUIVALENCE_NAME = "code-equivalence.json"
EQUIVALENCE_PATH = REPO_ROOT / "results" / EQUIVALENCE_NAME
COMMIT_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: Every task of the repository (``conf/task/<name>.yaml``). An attestation covers the tasks it has checks for; a new
#: task's runs are attested once ``CHECKS`` has a short run of it (until then a refactor marks them †).
TASKS = tuple(sorted(path.stem for path in (REPO_ROOT / "conf" / "task").glob("*.yaml")))

_CLASSIFICATION = ["scale=tiny", "schedule.epochs=2", "schedule.batch_size=8", "run.max_iters_per_epoch=2",
                   "run.max_eval_batches=1", "run.num_workers=0", "run.progress=false",
                   "data.embedded.train_per_class=4", "data.embedded.val_per_class=2"]
_DETECTION = ["task=detection", "scale=tiny", "schedule.epochs=2", "schedule.batch_size=2",
              "run.max_iters_per_epoch=2", "run.eval_every=1", "run.num_workers=0", "run.progress=false",
              "data.embedded.num_train=4", "data.embedded.num_val=4", "data.embedded.image_size=64",
              "model.min_size=64", "model.max_size=64"]

#: The checks an attestation trains at both commits, in order. ``{data}`` is the check's own embedded-data folder;
#: ``{weights}`` the ``checkpoint.pt`` of the ``classification-r50`` check (trained first, in the same tree), which
#: the detection check loads as its pretrained backbone with frozen BatchNorm, as every tiny detection row does.
CHECKS: tuple[dict[str, Any], ...] = (
    {"name": "classification-r50", "task": "classification",
     "overrides": ["task=classification", "model=resnet50", *_CLASSIFICATION, "data.embedded.dir={data}"]},
    {"name": "classification-r50-carafe-pp", "task": "classification",
     "overrides": ["task=classification", "model=resnet50", "downsampler=carafe", *_CLASSIFICATION,
                   "data.embedded.dir={data}"]},
    {"name": "detection-mask-rcnn-carafe", "task": "detection",
     "overrides": [*_DETECTION, "model=mask_rcnn_r50", "upsampler@fpn_upsampler=carafe",
                   "upsampler@mask_upsampler=carafe", "model.backbone_weights={weights}", "model.norm=frozen_bn",
                   "model.trainable_backbone_layers=3", "data.embedded.dir={data}"]},
    {"name": "detection-faster-rcnn", "task": "detection",
     "overrides": [*_DETECTION, "model=faster_rcnn_r50", "model.backbone_weights={weights}",
                   "model.norm=frozen_bn", "model.trainable_backbone_layers=3", "data.embedded.dir={data}"]},
    {"name": "segmentation-upernet-carafe", "task": "segmentation",
     "overrides": ["task=segmentation", "scale=tiny", "schedule.epochs=2", "schedule.batch_size=2",
                   "run.max_iters_per_epoch=2", "run.num_workers=0", "run.progress=false",
                   "data.embedded.num_train=2", "data.embedded.num_val=2", "data.embedded.image_size=64",
                   "data.train_scales=[64]", "data.test_size=64", "data.max_size=64", "model.fpn_dim=32",
                   "model.head_dim=32", "upsampler@fpn_upsampler=carafe", "data.embedded.dir={data}"]},
    {"name": "inpainting-global-local-carafe", "task": "inpainting",
     "overrides": ["experiment=inpainting/global_local_carafe", "scale=tiny", "schedule.epochs=2",
                   "schedule.batch_size=2", "run.max_iters_per_epoch=2", "run.max_eval_batches=1",
                   "run.num_workers=0", "run.progress=false", "data.image_size=32", "data.embedded.num_train=4",
                   "data.embedded.num_val=2", "model.base_channels=8", "model.discriminator_channels=[8,16]",
                   "data.embedded.dir={data}"]},
    {"name": "inpainting-partial-conv-carafe-pp", "task": "inpainting",
     "overrides": ["experiment=inpainting/partial_conv_carafe_pp", "scale=tiny", "schedule.epochs=2",
                   "schedule.batch_size=2", "run.max_iters_per_epoch=2", "run.max_eval_batches=1",
                   "run.num_workers=0", "run.progress=false", "data.image_size=32", "data.embedded.num_train=4",
                   "data.embedded.num_val=2", "model.base_channels=8", "data.embedded.dir={data}"]},
)
WEIGHTS_CHECK = "classification-r50"


class EquivalenceError(ValueError):
    """A malformed ``code-equivalence.json``; the message names the file and the entry."""


@dataclass(frozen=True)
class Attestation:
    source: str                 # the "from" commit
    target: str                 # the "to" commit
    tasks: tuple[str, ...]
    device: str

    def covers(self, task: str | tuple[str, ...], on_gpu: bool) -> bool:
        """Whether it holds for a run of ``task`` (or of every task of a tuple: its own and those it depends on)."""
        tasks = (task,) if isinstance(task, str) else task
        return all(t in self.tasks for t in tasks) and (self.device == "cuda" or not on_gpu)


def _check_entry(entry: Any, where: str) -> Attestation:
    if not isinstance(entry, dict):
        raise EquivalenceError(f"{where}: not an object")
    for key in ("from", "to"):
        if not isinstance(entry.get(key), str) or not COMMIT_RE.fullmatch(entry[key]):
            raise EquivalenceError(f"{where}: {key!r} is not a 40-digit commit")
    checks = entry.get("checks")
    if not isinstance(checks, list) or not checks:
        raise EquivalenceError(f"{where}: 'checks' must be a non-empty list")
    for i, check in enumerate(checks):
        if not isinstance(check, dict) or check.get("task") not in TASKS:
            raise EquivalenceError(f"{where}: check {i} has no task of {TASKS}")
        for key in ("state_sha256", "results_sha256"):
            if not isinstance(check.get(key), str) or not SHA256_RE.fullmatch(check[key]):
                raise EquivalenceError(f"{where}: check {i} {key!r} is not a SHA-256")
    tasks = entry.get("tasks")
    if not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks):
        raise EquivalenceError(f"{where}: 'tasks' must list some of {TASKS}")
    unchecked = sorted(set(tasks) - {c["task"] for c in checks})
    if unchecked:
        raise EquivalenceError(f"{where}: tasks without a check: {', '.join(unchecked)}")
    if entry.get("device") not in ("cpu", "cuda"):
        raise EquivalenceError(f"{where}: 'device' must be 'cpu' or 'cuda'")
    return Attestation(entry["from"], entry["to"], tuple(tasks), entry["device"])


def load_attestations(path: str | Path = EQUIVALENCE_PATH) -> list[Attestation]:
    """The attestations of ``path`` (none when the file does not exist), validated."""
    path = Path(path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise EquivalenceError(f"{path}: not JSON ({error})") from None
    if not isinstance(data, dict) or data.get("format") != EQUIVALENCE_FORMAT:
        raise EquivalenceError(f"{path}: not format {EQUIVALENCE_FORMAT}")
    entries = data.get("attestations")
    if not isinstance(entries, list):
        raise EquivalenceError(f"{path}: 'attestations' must be a list")
    return [_check_entry(entry, f"{path} attestation {i}") for i, entry in enumerate(entries)]


def equivalence_chain(run_commit: str, against: str, task: str | tuple[str, ...], on_gpu: bool,
                      attestations: Sequence[Attestation],
                      same_code: Callable[[str, str], bool]) -> list[Attestation] | None:
    """The attestations leading from ``run_commit``'s result code to ``against``'s, None when none do.
    ``same_code(a, b)`` says whether the task's result-affecting code is the same at commits ``a`` and ``b``. An
    attestation is used in either direction (equivalence is symmetric), breadth first, each commit once."""
    usable = [a for a in attestations if a.covers(task, on_gpu)]
    frontier: list[tuple[str, list[Attestation]]] = [(run_commit, [])]
    seen = {run_commit}
    while frontier:
        commit, chain = frontier.pop(0)
        if chain and same_code(commit, against):
            return chain
        for attestation in usable:
            for start, end in ((attestation.source, attestation.target), (attestation.target, attestation.source)):
                if end not in seen and same_code(commit, start):
                    seen.add(end)
                    frontier.append((end, [*chain, attestation]))
    return None


# ---------------------------------------------------------------------------------------------------------------
# Making an attestation: train every check in an export of each commit and compare.

def state_sha256(state: dict[str, Any]) -> str:
    """SHA-256 over a state dict's tensors in key order (name, dtype, shape, bytes)."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        digest.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            tensor = value.detach().cpu().contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        else:
            digest.update(repr(value).encode())
    return digest.hexdigest()


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in sorted(value.items())
                if "seconds" not in k and k not in ("finished_at", "segments", "it_per_s")}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    return value


def results_sha256(metrics_file: dict[str, Any]) -> str:
    """SHA-256 of a run's metrics, per-epoch history and config hash (its ``metrics.json`` without times)."""
    kept = {key: _without_times(metrics_file.get(key)) for key in ("config_hash", "metrics", "history")}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


def export_commit(commit: str, dest: Path, repo: Path = REPO_ROOT) -> None:
    """The tracked files of ``commit`` in ``dest`` (``git archive``; no ignored build output)."""
    dest.mkdir(parents=True)
    archive = dest.parent / f"{dest.name}.tar"
    archive.write_bytes(bytes(git_output("archive", "--format=tar", commit, root=repo, text=False)))
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()


def run_check(tree: Path, check: dict[str, Any], threads: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Train ``check`` in the exported ``tree`` and return its config hash, hashes and seconds."""
    from tasks.common.io import load_checkpoint

    name = check["name"]
    run_dir = Path("runs") / "equivalence" / name
    values = {"data": f"data/equivalence/{name}",
              "weights": f"runs/equivalence/{WEIGHTS_CHECK}/checkpoint.pt"}
    overrides = [o.format(**values) for o in check["overrides"]]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(threads), "PYTHONHASHSEED": "0"}
    started = time.monotonic()
    result = subprocess.run([sys.executable, "scripts/train.py", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=tree, env=env, capture_output=True, text=True, check=False)
    seconds = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise RuntimeError(f"check {name} failed in {tree} (exit {result.returncode}):\n{tail}")
    metrics = json.loads((tree / run_dir / "metrics.json").read_text())
    state = load_checkpoint(tree / run_dir / "checkpoint.pt", map_location="cpu")
    values = {"config_hash": metrics["config_hash"], "state_sha256": state_sha256(state["model"]),
              "results_sha256": results_sha256(metrics), "seconds": seconds}
    log(f"  {name}: {seconds:.0f} s, config {values['config_hash']}, state {values['state_sha256'][:12]}")
    return values


def attest(source: str, target: str, checks: Sequence[dict[str, Any]], threads: int, work: Path,
           log: Callable[[str], None] = print, repo: Path = REPO_ROOT) -> tuple[dict[str, Any] | None, list[str]]:
    """Train ``checks`` at both commits of ``repo``; the attestation (None if any check differs) and the
    differences."""
    import torch

    trees = {side: work / side for side in ("from", "to")}
    for side, commit in (("from", source), ("to", target)):
        export_commit(commit, trees[side], repo)
    found: dict[str, dict[str, dict[str, Any]]] = {"from": {}, "to": {}}
    for check in checks:
        for side, commit in (("from", source), ("to", target)):
            log(f"{check['name']} at {commit[:12]} ({side})")
            found[side][check["name"]] = run_check(trees[side], check, threads, log)
    differences = []
    entries = []
    for check in checks:
        a, b = found["from"][check["name"]], found["to"][check["name"]]
        for key in ("config_hash", "state_sha256", "results_sha256"):
            if a[key] != b[key]:
                differences.append(f"{check['name']}: {key} {a[key]} at {source[:12]} != {b[key]} at {target[:12]}")
        entries.append({"name": check["name"], "task": check["task"], "overrides": list(check["overrides"]),
                        "config_hash": a["config_hash"], "state_sha256": a["state_sha256"],
                        "results_sha256": a["results_sha256"],
                        "seconds": {"from": a["seconds"], "to": b["seconds"]}})
    if differences:
        return None, differences
    attestation = {"from": source, "to": target, "tasks": sorted({c["task"] for c in checks}, key=TASKS.index),
                   "device": "cpu", "threads": threads, "torch": torch.__version__, "created": utc_now(),
                   "checks": entries}
    return attestation, []


def append_attestation(attestation: dict[str, Any], path: str | Path = EQUIVALENCE_PATH) -> None:
    path = Path(path)
    data = json.loads(path.read_text()) if path.is_file() else {"format": EQUIVALENCE_FORMAT, "attestations": []}
    data["attestations"].append(attestation)
    write_json_atomic(path, data)
    load_attestations(path)


def _commit(name: str) -> str:
    try:
        return str(git_output("rev-parse", "--verify", f"{name}^{{commit}}")).strip()
    except subprocess.CalledProcessError:
        raise SystemExit(f"{name!r} is not a commit of this repository") from None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", help="the commit the runs were trained at")
    parser.add_argument("--to", dest="target", default="HEAD", help="the commit to attest (default HEAD)")
    parser.add_argument("--checks", nargs="+", choices=[c["name"] for c in CHECKS],
                        help="train only these checks (default all; the attestation covers their tasks)")
    parser.add_argument("--threads", type=int, default=2, help="OMP_NUM_THREADS of every check (default 2)")
    parser.add_argument("--file", type=Path, default=EQUIVALENCE_PATH, help="the attestations file")
    parser.add_argument("--keep", type=Path, help="train in this new folder and keep it (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="print the attestations and exit")
    args = parser.parse_args(argv)
    if args.list:
        for a in load_attestations(args.file):
            print(f"{a.source[:12]} == {a.target[:12]} for {', '.join(a.tasks)} ({a.device})")
        return 0
    if not args.source:
        parser.error("--from is required (or --list)")
    source, target = _commit(args.source), _commit(args.target)
    names = args.checks or [c["name"] for c in CHECKS]
    if any(c["task"] == "detection" for c in CHECKS if c["name"] in names) and WEIGHTS_CHECK not in names:
        names = [WEIGHTS_CHECK, *names]
    checks = [c for c in CHECKS if c["name"] in names]
    if args.keep:
        args.keep.mkdir(parents=True)
        work = args.keep
    else:
        work = Path(tempfile.mkdtemp(prefix="carafe-equivalence-"))
    try:
        attestation, differences = attest(source, target, checks, args.threads, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if attestation is None:
        print(f"not equivalent: {source[:12]} and {target[:12]} train differently", file=sys.stderr)
        for line in differences:
            print(f"  {line}", file=sys.stderr)
        return 1
    append_attestation(attestation, args.file)
    print(f"{source[:12]} == {target[:12]} for {', '.join(attestation['tasks'])}: appended to {args.file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
