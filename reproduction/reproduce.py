"""Reproduce one table of the papers: run the rows (and seeds) that have no finished run yet, then render results/.

    python scripts/reproduce.py pp-12                       # tiny scale, embedded data, this machine
    python scripts/reproduce.py pp-12 --seeds 3             # seeds 0, 1, 2 of every row (default: the spec's)
    python scripts/reproduce.py pp-2 --scale paper --data-root /data/imagenet --nproc 8
    python scripts/reproduce.py pp-12 --render-only --from multirun/classification/2026-11-21_10-00-00
    python scripts/reproduce.py pp-12 --render-only --from results/table-pp-12.json   # a rendered table's results
    python scripts/reproduce.py --list                      # every table: title, rows, runs shared with others

Each row is ``scripts/train.py <shared overrides> <row overrides> scale=<scale>`` (plus ``run.seed=k`` for seed
k >= 1), run in ``<runs>/<task>/<hash>`` (the hash of its resolved config). Every finished run has one record,
``results/runs/<hash>.json`` (``reproduction/records.py``): a seed whose config has a record is not trained again,
unless a run folder (in the runs store or a ``--from`` folder, for instance a Hydra multirun sweep) holds a run of it
that finished later, which then replaces the record. An interrupted run resumes from its checkpoint. Training is
refused from a tree with uncommitted changes (every record names the commit its code is at) unless
``--allow-dirty`` is given; ``--retrain-stale`` trains again the seeds whose runs' result-affecting code has changed
since they were trained. Stopping this script (Ctrl-C, SIGTERM, SIGHUP, or killing it outright) stops the training it
started. After each table, ``results/SUMMARY.md`` is written again from every rendered table.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from reproduction.measure import carry_speed, measure_costs, measure_speed
from reproduction.records import RECORDS_DIR_NAME, RecordError, load_records, write_record
from reproduction.render import (SUMMARY_NAME, TABLE_FORMAT, code_provenance, committed_tables, figure_path,
                                 render_markdown, render_summary, table_json, weights_provenance)
from reproduction.runs import attach_records, index_runs, mark_code, record_of_run_folder, shown_path
from reproduction.spec import (TableSpec, TableSpecError, compose_rows, load_table_spec, row_overrides, shared_runs,
                               table_names)
from tasks.common.io import write_json_atomic, write_text_atomic
from tasks.common.provenance import REPO_ROOT, git_commit, uncommitted_changes, utc_now
from tasks.common.run_folder import CHECKPOINT_NAME

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

PR_SET_PDEATHSIG = 1  # linux/prctl.h

CHILD_GRACE_SECONDS = 30


def train_command(overrides: list[str], run_dir: Path, nproc: int) -> list[str]:
    script = str(REPO_ROOT / "scripts" / "train.py")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, script, *overrides, f"hydra.run.dir={run_dir}"]

def _die_with_parent() -> None:
    """In the child, before it runs: the kernel sends it SIGTERM when this script dies, even by SIGKILL."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

class _StopRequested(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

def _raise_stop(signum: int, _frame: object) -> None:
    raise _StopRequested(signum)

def run_child(command: list[str], cwd: Path) -> int:
    """Run ``command`` to its end and return its exit status; it does not outlive this script. A SIGINT, SIGTERM
    or SIGHUP to this script is passed on to the child, which gets ``CHILD_GRACE_SECONDS`` to stop (then SIGKILL);
    the script then exits with 128 + the signal's number. If the script dies any other way (SIGKILL), the kernel
    sends the child SIGTERM."""
    previous = {signum: signal.signal(signum, _raise_stop) for signum in FORWARDED_SIGNALS}
    child = None
    try:
        child = subprocess.Popen(command, cwd=cwd, preexec_fn=_die_with_parent)
        return child.wait()
    except _StopRequested as stop:
        if child is not None and child.poll() is None:
            child.send_signal(stop.signum)
            try:
                child.wait(CHILD_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
        sys.exit(128 + stop.signum)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

def list_tables(scale: str) -> str:
    """Every table's title and rows, each row with its seed-0 run and the other tables that share that run."""
    specs = []
    for name in table_names():
        spec = load_table_spec(name)
        compose_rows(spec, scale, seeds=1)
        specs.append(spec)
    shared = shared_runs(specs)
    lines = []
    for spec in specs:
        seeds = spec.seeds_at(scale)
        lines.append(f"{spec.name}: {spec.title}" + (f" [{seeds} seeds at scale={scale}]" if seeds > 1 else ""))
        for row in spec.rows:
            others = [f"{table} ({label})" for table, label in shared.get(row.config_hash, []) if table != spec.name]
            lines.append(f"  {row.config_hash}  {row.label}" + (f"  (shared with {', '.join(others)})" if others
                                                                 else ""))
    lines.append(f"Runs at scale={scale} (seed 0; seed k adds run.seed=k); {len(shared)} are shared by two tables "
                 "or more.")
    return "\n".join(lines)

def shown_command(argv: list[str]) -> str:
    """The command line for the provenance, with paths outside the repository shortened (``shown_path``)."""
    words = []
    for word in argv:
        option, equals, value = word.partition("=")
        if word.startswith("/"):
            word = shown_path(word)
        elif equals and option.startswith("--") and value.startswith("/"):
            word = f"{option}={shown_path(value)}"
        words.append(word)
    return "python scripts/reproduce.py " + " ".join(words)


def write_table(spec: TableSpec, provenance: dict[str, Any], out_dir: str | Path, figure: bool = True) -> list[Path]:
    """Write ``table-<name>.md``, ``table-<name>.json`` and, for a spec with ``plot``, ``figures/table-<name>.png``
    under ``out_dir``, each replaced atomically. Returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    if spec.plot is not None and figure:
        from reproduction.figures import write_table_figure

        path = out_dir / figure_path(spec)
        write_table_figure(spec, provenance, path)
        written.append(path)
    md, js = out_dir / f"table-{spec.name}.md", out_dir / f"table-{spec.name}.json"
    write_text_atomic(md, render_markdown(spec, provenance))
    write_json_atomic(js, table_json(spec, provenance))
    return [md, js, *written]

def write_summary(results_dir: str | Path) -> Path:
    results_dir = Path(results_dir)
    tables = [json.loads(path.read_text()) for path in committed_tables(results_dir)]
    path = results_dir / SUMMARY_NAME
    write_text_atomic(path, render_summary([t for t in tables if t.get("format") == TABLE_FORMAT]))
    return path


def pretraining_runner(allow_dirty: bool) -> Callable[[list[str], Path], int]:
    """How a missing pretraining run is trained while the rows are composed: as a child of this script, and, like
    every training here, not from a tree with uncommitted changes unless allowed."""
    def run(command: list[str], cwd: Path) -> int:
        changed = [] if allow_dirty else uncommitted_changes()
        if changed:
            raise TableSpecError(f"a backbone's pretraining would be trained from a tree with uncommitted changes "
                                 f"({', '.join(changed[:5])}); commit first, or pass --allow-dirty")
        return run_child(command, cwd)
    return run


def reproduce(args: argparse.Namespace, argv: list[str]) -> int:
    """Run ``scripts/reproduce.py``'s table (``args`` as its command line parses them, ``argv`` as given, for the
    provenance): 0 when every seed has a result, 1 when a training failed, 2 for a bad table, record or tree."""
    started = time.perf_counter()
    extra = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    records_dir = args.records or args.out / RECORDS_DIR_NAME
    try:
        spec = load_table_spec(args.table)
        compose_rows(spec, args.scale, extra, args.seeds, args.backbones, args.runs,
                     None if args.render_only else pretraining_runner(args.allow_dirty))
        records = load_records(records_dir)
        folders = index_runs(args.runs, *args.extra)
    except (TableSpecError, RecordError) as error:
        print(f"reproduce: {error}", file=sys.stderr)
        return 2
    for record in attach_records(spec, records, folders):
        print(f"[{spec.name}] run {record['config_hash']}: the run folder's result replaces its record",
              file=sys.stderr)
        write_record(record, records_dir)
    head = git_commit()
    if args.retrain_stale:
        _forget_stale_runs(spec, head)
    if not args.render_only and not args.allow_dirty and not _may_train_here(spec):
        return 2
    failures = _train_missing_runs(spec, args, extra, records, records_dir)
    speed_device = _measure(spec, args)
    mark_code(spec, head)
    provenance = _provenance(spec, args, argv, head, started, speed_device)
    provenance.update(weights_provenance(spec, load_records(records_dir)))
    written = write_table(spec, provenance, args.out)
    written.append(write_summary(args.out))
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 1 if failures else 0


def _forget_stale_runs(spec: TableSpec, head: str) -> None:
    """``--retrain-stale``: drop the record of every seed trained at other result-affecting code than ``head``'s
    (neither the same nor attested equivalent), so that it is trained again."""
    mark_code(spec, head)
    for row in spec.rows:
        for run in row.runs:
            if run.record is not None and run.code not in ("current", "equivalent"):
                print(f"[{spec.name}] {row.label}, seed {run.seed} ({run.config_hash}): trained at "
                      f"{run.record.get('commit', '?')[:12]} ({run.code}); training it again", file=sys.stderr)
                run.record, run.run_dir = None, ""


def _may_train_here(spec: TableSpec) -> bool:
    """False (and why, on stderr) when some seed needs training and the tree has uncommitted changes."""
    to_train = [run for row in spec.rows for run in row.runs if run.record is None]
    changed = uncommitted_changes() if to_train else []
    if changed:
        print(f"reproduce: {len(to_train)} run(s) of table {spec.name} would be trained from a tree with "
              f"uncommitted changes ({', '.join(changed[:5])}{' ...' if len(changed) > 5 else ''}), so their "
              "records could not name the code that produced them. Commit first, or pass --allow-dirty (the "
              "records then keep a hash of the change and the table marks the runs).", file=sys.stderr)
    return not changed


def _train_missing_runs(spec: TableSpec, args: argparse.Namespace, extra: list[str],
                        records: dict[str, dict[str, Any]], records_dir: Path) -> int:
    """Train every seed without a record, one at a time in a child process, and record each that finishes
    (``--render-only``: mark them "not run yet" instead); the number that failed."""
    runs = [(row, run) for row in spec.rows for run in row.runs]
    failures = 0
    for index, (row, run) in enumerate(runs, 1):
        run_dir = args.runs / run.config.task.name / run.config_hash
        seed = f", seed {run.seed}" if len(row.runs) > 1 else ""
        prefix = f"[{spec.name} {index}/{len(runs)}] {row.label}{seed} ({run.config_hash})"
        if run.record is not None:
            print(f"{prefix}: reusing the run's record ({RECORDS_DIR_NAME}/{run.config_hash}.json)", file=sys.stderr)
            continue
        run.run_dir = str(run_dir)
        if args.render_only:
            run.problem = "not run yet"
            print(f"{prefix}: no finished run", file=sys.stderr)
            continue
        print(f"{prefix}: training in {run_dir}", file=sys.stderr, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        returncode = run_child(train_command(row_overrides(spec, row, args.scale, extra, run), run_dir, args.nproc),
                               REPO_ROOT)
        try:
            run.record = record_of_run_folder(run_dir)
        except RecordError as error:
            run.record, run.problem = None, f"run finished with a malformed result: {error}"
        if run.record is None:
            failures += 1
            run.problem = run.problem or f"run failed (exit {returncode}); see {shown_path(run_dir)}/train.log"
            print(f"{prefix}: {run.problem}", file=sys.stderr)
        else:
            records[run.config_hash] = run.record
            write_record(run.record, records_dir)
    return failures


def _measure(spec: TableSpec, args: argparse.Namespace) -> str | None:
    """The render-time columns: costs, and speed when the trained models are here (else the previous rendering's
    speeds for unchanged rows); the device the speeds were timed on, None without speed columns."""
    if spec.costs:
        measure_costs(spec)
    speed_device = None
    finished = [run for row in spec.rows for run in row.finished_runs()]
    if spec.speed and finished:
        timed = all(any(r.run_dir and (Path(r.run_dir) / CHECKPOINT_NAME).is_file() for r in row.finished_runs())
                    for row in spec.rows if row.finished_runs())
        if timed or not args.render_only:
            print(f"[{spec.name}] timing the trained models of the rows together", file=sys.stderr, flush=True)
            speed_device = measure_speed(spec)
        carried = carry_speed(spec, args.out / f"table-{spec.name}.json")
        if carried is not None:
            speed_device = carried
    return speed_device


def _provenance(spec: TableSpec, args: argparse.Namespace, argv: list[str], head: str, started: float,
                speed_device: str | None) -> dict[str, str]:
    finished = [run for row in spec.rows for run in row.finished_runs()]
    datasets = sorted({str(run.record["dataset"]) for run in finished})
    devices = sorted({f"{run.record['device']} x{run.record.get('world_size', 1)}" for run in finished})
    train_seconds = sum(float(run.record.get("train_seconds") or 0) for run in finished)
    provenance = {
        "commit": head, "scale": args.scale, "seeds": spec.seed_count,
        "dataset": "; ".join(datasets) or "–", "device": "; ".join(devices) or "–", "date": utc_now(),
        "wall time": f"{time.perf_counter() - started:.0f} s for this command; {train_seconds:.0f} s of training "
                     "summed over the runs' records (every resumed segment of a run counted)",
        "command": shown_command(argv),
        **code_provenance(spec),
    }
    if speed_device is not None:
        provenance["speed measured on"] = speed_device
    return provenance


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", help="pp-12, table-pp-12 or 1 ... (see --list)")
    parser.add_argument("--list", action="store_true", help="list the declared tables and the runs they share")
    parser.add_argument("--scale", default=os.environ.get("SCALE", "tiny"), choices=("tiny", "paper"))
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds per row, run.seed=0..N-1 (default: the table spec's `seeds` for the scale)")
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT") or None,
                        help="the real dataset (required at --scale paper); default: the embedded one")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs", help="where runs are stored")
    parser.add_argument("--from", dest="extra", type=Path, action="append", default=[],
                        help="a folder of run folders (e.g. a multirun sweep) to take finished runs from; repeatable")
    parser.add_argument("--records", type=Path, default=None,
                        help=f"the run records (default: <out>/{RECORDS_DIR_NAME}, i.e. results/{RECORDS_DIR_NAME})")
    parser.add_argument("--allow-dirty", action="store_true",
                        help="train even though the tree has uncommitted changes (each record then keeps a hash of "
                             "the change; its table marks the run)")
    parser.add_argument("--retrain-stale", action="store_true",
                        help="train again the seeds whose runs were trained at other result-affecting code than "
                             "this commit's, or from an uncommitted tree")
    parser.add_argument("--backbones", type=Path, default=os.environ.get("BACKBONES") or None,
                        help="a folder of ImageNet backbone weights, <name>.pt per backbone (resnet50, "
                             "resnet50-carafe, ...): each detection / segmentation row loads its own "
                             "(tasks/classification/backbones.py)")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="where the table is written")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render what is finished")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) for GPUs")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every row (e.g. run.num_workers=16)")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE words may come before or after the options
    if not args.list and not args.table:
        parser.error("name a table (see --list)")
    if args.seeds is not None and args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: give a whole number >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.list:
        print(list_tables(args.scale))
        return 0
    return reproduce(args, argv)
