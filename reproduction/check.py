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
from typing import Any

from reproduction.equivalence import (
    EQUIVALENCE_NAME,
    EquivalenceError,
    load_attestations,
)
from reproduction.records import RECORDS_DIR_NAME, RecordError, load_records
from reproduction.render import (
    SUMMARY_NAME,
    TABLE_FORMAT,
    WEIGHTS_KEY,
    committed_tables,
    figure_path,
    json_text,
    render_markdown,
    render_summary,
    table_json,
    weights_provenance,
)
from reproduction.runs import code_status, code_tasks, on_gpu
from reproduction.spec import SeedRun, TableSpec, load_table_spec
from tasks.common.provenance import REPO_ROOT


class ResultsCheckError(ValueError):
    pass

def spec_from_table_json(data: dict[str, Any], records: dict[str, dict[str, Any]], where: str) -> TableSpec:
    """The spec of a rendered table with its rows' seeds as the table JSON names them and their runs' values from
    ``records`` (what ``make check-results`` renders again). ``ResultsCheckError`` for a table that cannot be: an old
    format that keeps its own copies of values, rows that differ from the spec, a run without a record."""
    if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
        raise ResultsCheckError(f"{where}: not a table JSON of format {TABLE_FORMAT} (an older rendering keeps its own "
                                "copies of the runs' values); render it again with scripts/reproduce.py")
    spec = load_table_spec(str(data.get("table")))
    labels = [row.get("label") for row in data.get("rows", [])]
    if labels != [row.label for row in spec.rows]:
        raise ResultsCheckError(f"{where}: its rows {labels} are not conf/table/{spec.name}.yaml's "
                                f"{[row.label for row in spec.rows]}; render it again")
    for row, saved in zip(spec.rows, data["rows"]):
        row.runs = []
        for seed in saved.get("seeds") or []:
            run = SeedRun(int(seed["seed"]), None, str(seed["config_hash"]), problem=seed.get("problem") or "",
                          code=seed.get("code") or "")
            if seed.get("record") is not None:
                if seed["record"] != f"{RECORDS_DIR_NAME}/{run.config_hash}.json":
                    raise ResultsCheckError(f"{where}: row {row.label!r} seed {run.seed} names the record "
                                            f"{seed['record']!r}, not {RECORDS_DIR_NAME}/{run.config_hash}.json")
                if run.config_hash not in records:
                    raise ResultsCheckError(f"{where}: row {row.label!r} seed {run.seed} uses run {run.config_hash}, "
                                            f"which has no record in results/{RECORDS_DIR_NAME}/")
                run.record = records[run.config_hash]
            elif run.config_hash in records:
                raise ResultsCheckError(f"{where}: row {row.label!r} seed {run.seed} shows no result ({run.problem}) "
                                        f"but run {run.config_hash} has a record: render the table again")
            row.runs.append(run)
        row.measured = dict(saved.get("render_measured") or {})
        row.measure_problem = saved.get("measure_problem") or ""
    return spec

def check_table(json_path: Path, records: dict[str, dict[str, Any]]) -> list[str]:
    """Render the table in ``json_path`` again from its spec, the records and its own provenance and render-time
    measurements; the differences from the committed ``.md`` and ``.json`` (empty when there are none)."""
    where = str(json_path)
    try:
        data = json.loads(json_path.read_text())
        spec = spec_from_table_json(data, records, where)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
        return [str(error)]
    # The weights line is derived from the records, so it is derived again: a record replaced since shows
    provenance = {key: value for key, value in (data.get("provenance") or {}).items() if key != WEIGHTS_KEY}
    provenance.update(weights_provenance(spec, records))
    problems = []
    md_path = json_path.with_suffix(".md")
    expected = {md_path: render_markdown(spec, provenance), json_path: json_text(table_json(spec, provenance))}
    for path, text in expected.items():
        committed = path.read_text() if path.is_file() else None
        if committed != text:
            problems.append(f"{path}: differs from what its spec and the run records render"
                            + ("" if committed is None else f" ({_first_difference(committed, text)})"))
    if spec.plot is not None and not (json_path.parent / figure_path(spec)).is_file():
        problems.append(f"{json_path.parent / figure_path(spec)}: the table's figure is missing")
    return problems

def _first_difference(committed: str, rendered: str) -> str:
    for number, (a, b) in enumerate(zip(committed.splitlines(), rendered.splitlines()), 1):
        if a != b:
            return f"line {number}: committed {a[:160]!r}, rendered {b[:160]!r}"
    return f"{len(committed.splitlines())} committed lines, {len(rendered.splitlines())} rendered"


def check(results_dir: Path) -> tuple[list[str], list[str]]:
    """The problems (which fail the check) and the notes (which do not) of the tables in ``results_dir``."""
    problems: list[str] = []
    notes: list[str] = []
    try:
        records = load_records(results_dir / RECORDS_DIR_NAME)
    except RecordError as error:
        return [str(error)], notes
    cache: dict = {}
    try:
        cache["attestations"] = load_attestations(results_dir / EQUIVALENCE_NAME)
    except EquivalenceError as error:
        problems.append(str(error))
        cache["attestations"] = []
    tables = committed_tables(results_dir)
    if not tables:
        return [*problems, f"{results_dir}: no rendered tables (table-*.json)"], notes
    used: set[str] = set()
    datas = []
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
                status = code_status(str(record["commit"]), code_tasks(record), on_gpu(record), against, cache)
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
