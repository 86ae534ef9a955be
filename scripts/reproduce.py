"""Reproduce one table of the papers: run the rows that have no finished run yet, then render results/.

    python scripts/reproduce.py pp-12                       # tiny scale, embedded data, this machine
    python scripts/reproduce.py pp-2 --scale paper --data-root /data/imagenet --nproc 8
    python scripts/reproduce.py pp-12 --render-only --from multirun/classification/2026-11-21_10-00-00
    python scripts/reproduce.py --list

Each row is ``scripts/train.py <shared overrides> <row overrides> scale=<scale>``, run in ``<runs>/<task>/<hash>``
(the hash of its resolved config). A finished run with the same hash, in the runs store or in a ``--from`` folder
(for instance a Hydra multirun sweep), is reused; an interrupted one resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from tasks.common.experiment import read_record
from tasks.common.provenance import REPO_ROOT, git_commit, utc_now
from tasks.common.results import (TableSpecError, compose_rows, index_runs, load_table_spec, measure_costs,
                                  measure_speed, row_overrides, table_names, write_table)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", nargs="?", help="pp-12, table-pp-12 or 1 ... (see --list)")
    parser.add_argument("--list", action="store_true", help="list the declared tables and exit")
    parser.add_argument("--scale", default=os.environ.get("SCALE", "tiny"), choices=("tiny", "paper"))
    parser.add_argument("--data-root", default=os.environ.get("DATA_ROOT") or None,
                        help="the real dataset (required at --scale paper); default: the embedded one")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs", help="where runs are stored")
    parser.add_argument("--from", dest="extra", type=Path, action="append", default=[],
                        help="another folder to take finished runs from (e.g. a multirun sweep); repeatable")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "results", help="where the table is written")
    parser.add_argument("--render-only", action="store_true", help="run nothing; render what is finished")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun) for GPUs")
    parser.add_argument("overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra Hydra overrides for every row (e.g. run.num_workers=16)")
    args = parser.parse_intermixed_args(argv)  # KEY=VALUE words may come before or after the options
    if not args.list and not args.table:
        parser.error("name a table (see --list)")
    return args


def train_command(overrides: list[str], run_dir: Path, nproc: int) -> list[str]:
    script = str(REPO_ROOT / "scripts" / "train.py")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                    "--standalone", f"--nproc_per_node={nproc}"]
    return [*launcher, script, *overrides, f"hydra.run.dir={run_dir}"]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(table_names()))
        return 0
    started = time.perf_counter()
    extra = list(args.overrides) + ([f"data.root={args.data_root}"] if args.data_root else [])
    try:
        spec = load_table_spec(args.table)
        compose_rows(spec, args.scale, extra)
    except TableSpecError as error:
        print(f"reproduce: {error}", file=sys.stderr)
        return 2
    found = index_runs(args.runs, *args.extra)
    failures = 0
    for index, row in enumerate(spec.rows, 1):
        task = row.config.task.name
        run_dir = args.runs / task / row.config_hash
        prefix = f"[{spec.name} {index}/{len(spec.rows)}] {row.label} ({row.config_hash})"
        if row.config_hash in found:
            folder, row.record = found[row.config_hash]
            row.run_dir = str(folder)
            print(f"{prefix}: reusing the finished run in {folder}", file=sys.stderr)
            continue
        row.run_dir = str(run_dir)
        if args.render_only:
            row.problem = "not run yet"
            print(f"{prefix}: no finished run", file=sys.stderr)
            continue
        print(f"{prefix}: training in {run_dir}", file=sys.stderr, flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        command = train_command(row_overrides(spec, row, args.scale, extra), run_dir, args.nproc)
        returncode = subprocess.run(command, cwd=REPO_ROOT).returncode
        row.record = read_record(run_dir)
        if row.record is None:
            failures += 1
            shown = run_dir.relative_to(REPO_ROOT) if run_dir.is_relative_to(REPO_ROOT) else run_dir
            row.problem = f"run failed (exit {returncode}); see {shown}/train.log"
            print(f"{prefix}: {row.problem}", file=sys.stderr)
    if spec.costs:
        measure_costs(spec)
    speed_device = None
    if spec.speed and any(r.record for r in spec.rows):
        print(f"[{spec.name}] timing the trained models of {sum(bool(r.record) for r in spec.rows)} rows together",
              file=sys.stderr, flush=True)
        speed_device = measure_speed(spec)
    datasets = sorted({r.record["dataset"] for r in spec.rows if r.record})
    devices = sorted({f"{r.record['device']} x{r.record.get('world_size', 1)}" for r in spec.rows if r.record})
    run_seconds = sum(r.record.get("wall_seconds", 0) for r in spec.rows if r.record)
    provenance = {
        "commit": git_commit(), "scale": args.scale, "dataset": "; ".join(datasets) or "–",
        "device": "; ".join(devices) or "–", "date": utc_now(),
        "wall time": f"{time.perf_counter() - started:.0f} s for this command; {run_seconds:.0f} s summed over "
                     "the rows' runs (each run's own wall time)",
        "command": "python scripts/reproduce.py " + " ".join(argv if argv is not None else sys.argv[1:]),
    }
    if speed_device is not None:
        provenance["speed measured on"] = speed_device
    md, js = write_table(spec, provenance, args.out)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
