"""Reproduce one table of the papers: run the rows (and seeds) that have no finished run yet, then render results/.

    python scripts/reproduce.py pp-12                       # tiny scale, embedded data, this machine
    python scripts/reproduce.py pp-12 --seeds 3             # seeds 0, 1, 2 of every row (default: the spec's)
    python scripts/reproduce.py pp-2 --scale paper --data-root /data/imagenet --nproc 8
    python scripts/reproduce.py pp-12 --render-only --from multirun/classification/2026-11-21_10-00-00
    python scripts/reproduce.py pp-12 --render-only --from results/table-pp-12.json   # a rendered table's results
    python scripts/reproduce.py --list                      # every table: title, rows, runs shared with others

Each row is ``scripts/train.py <shared overrides> <row overrides> scale=<scale>`` (plus ``run.seed=k`` for seed
k >= 1), run in ``<runs>/<task>/<hash>`` (the hash of its resolved config). A finished run with the same hash, in the
runs store, in a ``--from`` folder (for instance a Hydra multirun sweep) or in a ``--from`` table JSON, is reused; an
interrupted one resumes from its checkpoint. Stopping this script (Ctrl-C, SIGTERM, SIGHUP, or killing it outright)
stops the training it started.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tasks.common.experiment import read_record
from tasks.common.provenance import REPO_ROOT, git_commit, utc_now
from tasks.common.results import (TableSpecError, attach_run, compose_rows, index_runs, load_table_spec,
                                  measure_costs, measure_speed, row_overrides, shared_runs, shown_path,
                                  table_names, write_table)

FORWARDED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # linux/prctl.h
CHILD_GRACE_SECONDS = 30


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
                        help="a folder (e.g. a multirun sweep) or a rendered table JSON to take finished runs "
                             "from; repeatable")
    parser.add_argument("--backbones", type=Path, default=os.environ.get("BACKBONES") or None,
                        help="a folder of ImageNet backbone weights, <name>.pt per backbone (resnet50, "
                             "resnet50-carafe, ...): each detection / segmentation row loads its own "
                             "(tasks/common/backbones.py)")
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print(list_tables(args.scale))
        return 0
    started = time.perf_counter()
    extra = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    try:
        spec = load_table_spec(args.table)
        compose_rows(spec, args.scale, extra, args.seeds, args.backbones)
        found = index_runs(args.runs, *args.extra)
    except TableSpecError as error:
        print(f"reproduce: {error}", file=sys.stderr)
        return 2
    failures = 0
    runs = [(row, run) for row in spec.rows for run in row.runs]
    for index, (row, run) in enumerate(runs, 1):
        run_dir = args.runs / run.config.task.name / run.config_hash
        seed = f", seed {run.seed}" if len(row.runs) > 1 else ""
        prefix = f"[{spec.name} {index}/{len(runs)}] {row.label}{seed} ({run.config_hash})"
        if run.config_hash in found:
            attach_run(run, found[run.config_hash])
            print(f"{prefix}: reusing the finished run in {run.run_dir or run.source}", file=sys.stderr)
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
        run.record = read_record(run_dir)
        if run.record is None:
            failures += 1
            run.problem = f"run failed (exit {returncode}); see {shown_path(run_dir)}/train.log"
            print(f"{prefix}: {run.problem}", file=sys.stderr)
    if spec.costs:
        measure_costs(spec)
    speed_device = None
    finished = [run for row in spec.rows for run in row.finished_runs()]
    if spec.speed and finished:
        print(f"[{spec.name}] timing the trained models of the rows together", file=sys.stderr, flush=True)
        speed_device = measure_speed(spec)
    datasets = sorted({run.record["dataset"] for run in finished})
    devices = sorted({f"{run.record['device']} x{run.record.get('world_size', 1)}" for run in finished})
    run_seconds = sum(run.record.get("wall_seconds", 0) for run in finished)
    provenance = {
        "commit": git_commit(), "scale": args.scale, "seeds": spec.seed_count,
        "dataset": "; ".join(datasets) or "–", "device": "; ".join(devices) or "–", "date": utc_now(),
        "wall time": f"{time.perf_counter() - started:.0f} s for this command; {run_seconds:.0f} s summed over "
                     "the runs (each run's own wall time)",
        "command": shown_command(argv if argv is not None else sys.argv[1:]),
    }
    if speed_device is not None:
        provenance["speed measured on"] = speed_device
    written = write_table(spec, provenance, args.out)
    print("wrote " + ", ".join(map(str, written)), file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
