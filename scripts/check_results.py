"""Check that every committed table is what its spec and the committed run records render: ``make check-results``.

    python scripts/check_results.py                 # results/ of this checkout
    python scripts/check_results.py --results DIR   # another folder of rendered tables and their runs/ records

For every ``results/table-*.json`` it renders the markdown and the JSON (the figure's data included) again from
``conf/table/<name>.yaml``, the records in ``results/runs/`` and the table's own provenance and render-time
measurements (speed, cost), and compares them with the committed files byte for byte. It fails (exit 1, each problem
named) when any differs (a hand-edited cell, a table not rendered again after its runs' records changed), when a table
names a run without a record or shows no result for a run that has one, when a record is malformed, when
``results/SUMMARY.md`` is not what the tables render, or when a run's code mark disagrees with git. One record per run
id means no run id can show two values.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tasks.common.provenance import REPO_ROOT, code_status
from tasks.common.records import RECORDS_DIR_NAME, RecordError, load_records
from tasks.common.results import (SUMMARY_NAME, TABLE_FORMAT, _on_gpu, check_table, committed_tables,
                                  render_summary)


def check(results_dir: Path) -> tuple[list[str], list[str]]:
    """The problems (which fail the check) and the notes (which do not) of the tables in ``results_dir``."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        records = load_records(results_dir / RECORDS_DIR_NAME)
    except RecordError as error:
        return [str(error)], notes
    tables = committed_tables(results_dir)
    if not tables:
        return [f"{results_dir}: no rendered tables (table-*.json)"], notes
    used: set[str] = set()
    datas = []
    cache: dict = {}
    for path in tables:
        problems += check_table(path, records)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if data.get("format") != TABLE_FORMAT:
            continue
        datas.append(data)
        against = str(data.get("provenance", {}).get("commit", "")).removesuffix("+dirty")
        for row in data["rows"]:
            for seed in row["seeds"]:
                record = records.get(seed["config_hash"]) if seed.get("record") else None
                if record is None:
                    continue
                used.add(seed["config_hash"])
                status = code_status(str(record["commit"]), str(record["task"]), _on_gpu(record), against, cache)
                if status == "unknown":
                    notes.append(f"{path.name}: the code mark of run {seed['config_hash']} is not verified (commit "
                                 f"{str(record['commit'])[:12]} or {against[:12]} is not in this clone)")
                elif status != seed.get("code"):
                    problems.append(f"{path.name}: run {seed['config_hash']} is marked {seed.get('code')!r} but git "
                                    f"says {status!r} against the table's commit {against[:12]}")
    summary = results_dir / SUMMARY_NAME
    expected = render_summary(datas)
    if not summary.is_file() or summary.read_text() != expected:
        problems.append(f"{summary}: differs from what the tables render (scripts/reproduce.py writes it)")
    unused = sorted(set(records) - used)
    if unused:
        notes.append(f"{len(unused)} records no committed table uses: {', '.join(unused[:8])}"
                     + (" ..." if len(unused) > 8 else ""))
    return problems, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "results", help="the folder of rendered tables")
    args = parser.parse_args(argv)
    problems, notes = check(args.results)
    for note in notes:
        print(f"check-results: note: {note}", file=sys.stderr)
    for problem in problems:
        print(f"check-results: {problem}", file=sys.stderr)
    tables = len(committed_tables(args.results))
    if problems:
        print(f"check-results: {len(problems)} problem(s) in {tables} tables", file=sys.stderr)
        return 1
    print(f"check-results: {tables} tables render again exactly from their specs and run records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
