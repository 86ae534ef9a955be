"""A table rendered: its markdown (the paper's figures beside ours, provenance, what the seeds say, each seed's run),
its JSON (the same as data; each seed names its run's record and keeps none of its values) and, over every rendered
table, ``results/SUMMARY.md``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from carafe.costs import paper_round
from reproduction.records import RECORDS_DIR_NAME
from reproduction.seeds import comparisons, row_problem, seed_summary
from reproduction.spec import Column, Row, SeedRun, TableSpec

FIGURES_DIR_NAME = "figures"

STD_NAME = "sample standard deviation (ddof=1)"

TABLE_FORMAT = 2   # a rendered table JSON: seeds reference run records (results/runs/) and keep no values of their own


def _fmt(value: float | str | None, column: Column, like: object = None) -> str:
    """A cell; ``format: si`` rounds to the precision of ``like`` (the paper's printed figure) when there is one."""
    if isinstance(value, str):
        return value
    if value is None or math.isnan(value):
        return "–"
    if column.format == "si":
        return paper_round(value, like=like if isinstance(like, str) else None)
    return f"{value:.{column.decimals}f}"

def paper_value(spec: TableSpec, row: Row, column: Column) -> float | str | None:
    if column.paper_ratio_of is None:
        return row.paper.get(column.key)
    baseline = spec.baseline_row()
    mine = row.paper.get(column.paper_ratio_of)
    theirs = baseline.paper.get(column.paper_ratio_of) if baseline is not None else None
    if not isinstance(mine, (int, float)) or not isinstance(theirs, (int, float)) or not theirs:
        return None
    return mine / theirs

def measured_value(row: Row, column: Column, paper: object = 0.0) -> float | str | None:
    """The measured value of a cell: a number (the mean over the row's finished seeds), or the reason there is
    none (None: a metric neither the runs nor the paper have)."""
    if column.measured_at_render:
        if column.metric in row.measured:
            return row.measured[column.metric]
        return row.measure_problem or row_problem(row) or "not measured"
    summary = seed_summary(row, column, paper)
    if summary is None:
        return None
    if summary.n:
        return summary.mean
    reasons = sorted(set(summary.missing.values()))
    return reasons[0] if len(reasons) == 1 else "; ".join(f"seed {s}: {r}" for s, r in summary.missing.items())

def _seed_list(seeds: list[int]) -> str:
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))

def measured_cell(row: Row, column: Column, paper: object) -> str:
    """A measured cell as printed: the value (one seed) or mean ± sample std (several), naming missing seeds."""
    value = measured_value(row, column, paper)
    if column.measured_at_render or len(row.runs) == 1 or not isinstance(value, float):
        return _fmt(value, column, like=paper)
    summary = seed_summary(row, column, paper)
    text = _fmt(summary.mean, column, like=paper)
    if summary.std is not None:
        text += f" ± {_fmt(summary.std, column)}"
    if summary.missing:
        by_reason: dict[str, list[int]] = {}
        for seed, reason in summary.missing.items():
            by_reason.setdefault(reason, []).append(seed)
        text += f" (n={summary.n}; " + "; ".join(f"{_seed_list(s)}: {r}" for r, s in by_reason.items()) + ")"
    return text

def seed_statement(spec: TableSpec) -> str:
    """What the rendered table says about seeds, from the seeds its rows were composed with."""
    seeds = spec.seed_count
    if seeds == 1:
        return ("One seed per row (run.seed=0): the spread over seeds is not measured, so a difference between rows "
                "cannot be told apart from seed noise.")
    return (f"{seeds} seeds per row (run.seed=0..{seeds - 1}; the data and everything else are the same): each "
            f"\"ours\" cell of a trained metric is the mean ± the {STD_NAME} over the row's seeds, n={seeds}, and a "
            "cell names any seed without a value. Cost and speed columns are measured once per row: the seed "
            "changes a model's weights, not its architecture (speed is timed on the first finished seed's model).")


#: How a run's code relates to the commit a table is rendered at (``provenance.code_status``): its mark and meaning.
CODE_MARKS = {"current": "", "equivalent": "", "changed": "†", "uncommitted": "‡", "unknown": "?"}

CODE_MEANING = {
    "equivalent": "trained at an earlier commit whose result-affecting code differs from this render's but was shown "
                  "to train bit-identically to it (`results/code-equivalence.json`: the same weights and metrics from "
                  "short runs of every task at both commits)",
    "changed": "trained at an earlier commit whose result-affecting code (the operator, the shared and the task's code, "
               "the configs, the pinned environment) differs from this render's commit",
    "uncommitted": "trained from a tree with uncommitted changes (`+dirty`): the code that produced it cannot be "
                   "recovered",
    "unknown": "trained at a commit this clone does not have",
}


def md_text(value: Any) -> str:
    """A string from a record or the command line as markdown shows it literally: one line, no HTML, no links, no
    table cells broken by pipes."""
    text = " ".join(str(value).split())
    for char, escaped in (("&", "&amp;"), ("<", "&lt;"), (">", "&gt;"), ("|", "\\|"), ("[", "\\["), ("]", "\\]"),
                          ("`", "'")):
        text = text.replace(char, escaped)
    return text

def code_provenance(spec: TableSpec) -> dict[str, str]:
    """The provenance lines about the runs' code: which commits the runs come from, and how many are marked."""
    finished = [run for row in spec.rows for run in row.finished_runs()]
    if not finished:
        return {}
    commits: dict[str, int] = {}
    for run in finished:
        commit = str(run.record.get("commit", "unknown"))
        commits[commit] = commits.get(commit, 0) + 1
    shown = ", ".join(f"{c[:12]}{'+dirty' if c.endswith('+dirty') else ''} ({n})"
                      for c, n in sorted(commits.items(), key=lambda item: (-item[1], item[0])))
    lines = {"runs' commits": f"{len(finished)} runs from {len(commits)} commits: {shown}"}
    marked = []
    for code in ("equivalent", "changed", "uncommitted", "unknown"):
        count = sum(run.code == code for run in finished)
        if count:
            mark = f" {CODE_MARKS[code]}" if CODE_MARKS[code] else ""
            marked.append(f"{count} of {len(finished)} runs{mark} {CODE_MEANING[code]}")
    lines["runs' code"] = "; ".join(marked) if marked else \
        f"all {len(finished)} runs were trained at this render's result-affecting code"
    return lines

WEIGHTS_KEY = "runs' backbone weights"


def weights_provenance(spec: TableSpec, records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """The provenance line about the pretrained weights the runs started from (``model.backbone_weights``): per file,
    how many runs loaded which weights (by the digest their record holds), and whether those are the weights of the
    pretraining run whose record ``records`` holds. One config trained on two machines can give two sets of weights,
    so runs naming one file need not have started from the same weights."""
    loaded: dict[str, dict[str | None, int]] = {}
    for row in spec.rows:
        for run in row.finished_runs():
            model = (run.record.get("config") or {}).get("model") or {}
            path = model.get("backbone_weights") if isinstance(model, dict) else None
            if not path:
                continue
            digest = (run.record.get("backbone_weights") or {}).get("sha256")
            counts = loaded.setdefault(str(path), {})
            counts[digest] = counts.get(digest, 0) + 1
    parts = []
    for path, counts in sorted(loaded.items()):
        pretraining = records.get(Path(path).parent.name) if Path(path).name == "checkpoint.pt" else None
        recorded = (pretraining or {}).get("weights_sha256")
        groups = []
        for digest, count in sorted(counts.items(), key=lambda item: (item[0] is None, -item[1], item[0] or "")):
            if digest is None:
                groups.append(f"{count} without a digest (trained before records held one)")
                continue
            same = "" if pretraining is None else \
                ", the weights of its pretraining run's record" if digest == recorded else \
                ", not the weights of its pretraining run's record" + ("" if recorded else " (which holds no digest)")
            groups.append(f"{count} loaded weights sha256 {digest[:12]}{same}")
        parts.append(f"`{md_text(path)}`: " + "; ".join(groups))
    return {WEIGHTS_KEY: " · ".join(parts)} if parts else {}

def _seconds(value: Any) -> str:
    return f"{value:.0f} s" if isinstance(value, (int, float)) else "? s"

def _run_line(run: SeedRun) -> str:
    text = f"run `{run.config_hash}`"
    if run.record is not None:
        record = run.record
        recovered = ", recovered from an older table" if record.get("recovered_from") else ""
        text += (f" (record {RECORDS_DIR_NAME}/{run.config_hash}.json{recovered}): "
                 f"{_seconds(record.get('train_seconds'))} "
                 f"training on {md_text(record.get('device', '?'))} x{record.get('world_size', 1)}, commit "
                 f"{md_text(str(record.get('commit', '?'))[:12])}{CODE_MARKS.get(run.code, '')}")
    elif run.problem and len(run.problem) < 200:
        text += f": {run.problem}"
    return text

def figure_path(spec: TableSpec) -> str:
    """The figure's path relative to the folder the table is written to."""
    return f"{FIGURES_DIR_NAME}/table-{spec.name}.png"

def figure_caption(spec: TableSpec, provenance: dict[str, Any]) -> str:
    column = next(c for c in spec.columns if c.key == spec.plot.column)
    seeds = spec.seed_count
    spread = f"mean ± {STD_NAME} over {seeds} seeds" if seeds > 1 else "one seed, no error bar"
    return (f"{column.header} per row: the paper's figure and ours ({spread}; dots: single seeds); "
            f"scale={provenance.get('scale', '?')}, commit {str(provenance.get('commit', '?'))[:12]}.")

def _signed(value: float | None, decimals: int) -> str:
    return "–" if value is None else f"{value:+.{decimals}f}"

def comparison_lines(spec: TableSpec, compared: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """The markdown section that states what the seeds say about ``spec.compare.column``."""
    if spec.compare is None:
        return []
    column = next(c for c in spec.columns if c.key == spec.compare.column)
    d = column.decimals + 1   # one more than the table's cells: a Δ is a small difference of two of them
    lines = [f"What the seeds say about {column.header}: Δ = the row's mean − its baseline's, the 95 % interval of Δ "
             "and Welch's t (degrees of freedom) from the seeds; a Δ is separated from seed noise when its interval "
             "excludes 0.", "",
             "| row | baseline | Δ (paper) | Δ (ours) | 95 % interval | t (df) | n | what the seeds say |",
             "|---|---|---|---|---|---|---|---|"]
    for label in spec.compare.baselines:
        c = compared[label][column.key]
        interval = "–" if c["low"] is None else f"[{c['low']:+.{d}f}, {c['high']:+.{d}f}]"
        t = "–" if c["t"] is None else f"{c['t']:+.2f} ({c['df']:.1f})"
        lines.append(f"| {label} | {c['baseline']} | {_signed(c['paper_delta'], d)} | {_signed(c['delta'], d)} | "
                     f"{interval} | {t} | {c['n']} / {c['n_baseline']} | {c['verdict']} |")
    return lines


PROVENANCE_ORDER = ("commit", "scale", "seeds", "dataset", "device", "date", "wall time", "command", "runs' commits",
                    "runs' code", WEIGHTS_KEY, "speed measured on")


def provenance_order(provenance: dict[str, Any]) -> list[str]:
    """The provenance keys in the order a table prints them (the JSON file keeps them sorted)."""
    return [k for k in PROVENANCE_ORDER if k in provenance] + sorted(set(provenance) - set(PROVENANCE_ORDER))

def render_markdown(spec: TableSpec, provenance: dict[str, Any]) -> str:
    """The table with, for every column, the paper's figure and the measured one side by side."""
    seeds = spec.seed_count
    lines = [f"# {spec.title}", "",
             "Generated by `scripts/reproduce.py` from the run records in "
             f"[`{RECORDS_DIR_NAME}/`]({RECORDS_DIR_NAME}/); do not edit by hand (`make check-results` renders it "
             f"again and fails on any difference). Paper: the published figure ({spec.source}). Ours: measured by "
             "the run named in the last column"
             + (f" and its seeds (mean ± {STD_NAME}, n = {seeds})." if seeds > 1 else "."), "",
             "| provenance | |", "|---|---|"]
    lines += [f"| {md_text(key)} | {md_text(provenance[key])} |" for key in provenance_order(provenance)]
    header = ["row"]
    for column in spec.columns:
        ours = "ours" if seeds == 1 or column.measured_at_render else f"ours, n={seeds}"
        header += [f"{column.header} (paper)", f"{column.header} ({ours})"]
    header.append("run" if seeds == 1 else "run (seed 0)")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in spec.rows:
        cells = [row.label]
        for column in spec.columns:
            paper = paper_value(spec, row, column)
            cells += [_fmt(paper, column), measured_cell(row, column, paper)]
        marks = "".join(sorted({CODE_MARKS.get(run.code, "") for run in row.runs}))
        cells.append(f"`{row.config_hash}`{marks}" if row.config_hash else "–")
        lines.append("| " + " | ".join(cells) + " |")
    used = [code for code in ("changed", "uncommitted", "unknown")
            if any(run.code == code for row in spec.rows for run in row.runs)]
    if used:
        lines += [""] + [f"{CODE_MARKS[code]} a run {CODE_MEANING[code]}." for code in used]
    if spec.plot is not None:
        lines += ["", f"![{spec.title}]({figure_path(spec)})", "", f"Figure: {figure_caption(spec, provenance)}"]
    note = spec.notes.get(provenance.get("scale", ""))
    if note:
        lines += ["", note.strip()]
    lines += ["", seed_statement(spec)]
    if spec.compare is not None:
        lines += [""] + comparison_lines(spec, comparisons(spec))
    lines += ["", "Rows (overrides of `scripts/train.py`, shared ones first: "
              f"`{' '.join(spec.overrides) or '(none)'}`):", ""]
    for row in spec.rows:
        head = f"- {row.label}: `{' '.join(row.overrides) or '(none)'}`"
        if len(row.runs) == 1:
            lines.append(f"{head} -> {_run_line(row.runs[0])}")
            continue
        lines.append(head)
        lines += [f"  - seed {run.seed}" + (f" (`{' '.join(run.overrides)}`)" if run.overrides else "")
                  + f": {_run_line(run)}" for run in row.runs]
    return "\n".join(lines) + "\n"

def _json_value(value: float | str | None) -> float | None:
    return None if isinstance(value, str) else value

def plot_data(spec: TableSpec) -> dict[str, Any] | None:
    """The numbers the table's figure draws, per row: the paper's figure, every seed's value, their mean and std,
    and the FLOPs of a table with a FLOPs column."""
    if spec.plot is None:
        return None
    column = next(c for c in spec.columns if c.key == spec.plot.column)
    flops = [row.measured.get("cost.flops") for row in spec.rows] \
        if any(c.metric == "cost.flops" for c in spec.columns) else None
    summaries = [seed_summary(row, column, paper_value(spec, row, column)) for row in spec.rows]
    return {"column": column.key, "x_title": spec.plot.x_title,
            "x_ticks": spec.plot.x_ticks or [row.label for row in spec.rows],
            "paper": [_json_value(paper_value(spec, row, column)) if not isinstance(paper_value(spec, row, column), str)
                      else None for row in spec.rows],
            "values": [[] if s is None else [s.values[k] for k in sorted(s.values)] for s in summaries],
            "mean": [None if s is None else s.mean for s in summaries],
            "std": [None if s is None else s.std for s in summaries], "flops": flops}

def table_json(spec: TableSpec, provenance: dict[str, Any]) -> dict[str, Any]:
    """The rendered table as data: per row the paper's figures, the mean over the seeds (``measured``), ``std`` and
    ``n`` per column, what the seeds say against the row's baseline (``vs_baseline``), the values measured when the
    table was rendered (``render_measured``: speed, cost), and every seed's run as a reference to its record (the
    record holds the values; the table keeps no copy)."""
    compared = comparisons(spec)
    rows = []
    for row in spec.rows:
        paper = {c.key: paper_value(spec, row, c) for c in spec.columns}
        measured = std = count = None
        if row.finished_runs() or row.measured:
            measured = {c.key: _json_value(measured_value(row, c, paper[c.key])) for c in spec.columns}
            summaries = {c.key: None if c.measured_at_render else seed_summary(row, c, paper[c.key])
                         for c in spec.columns}
            std = {k: s.std if s else None for k, s in summaries.items()}
            count = {k: s.n if s else None for k, s in summaries.items()}
        seeds = [{"seed": run.seed, "overrides": run.overrides, "config_hash": run.config_hash,
                  "record": None if run.record is None else f"{RECORDS_DIR_NAME}/{run.config_hash}.json",
                  "problem": None if run.record is not None else (run.problem or None),
                  "code": run.code or None}
                 for run in row.runs]
        rows.append({"label": row.label, "overrides": row.overrides, "config_hash": row.config_hash,
                     "paper": paper, "measured": measured, "std": std, "n": count,
                     "vs_baseline": compared.get(row.label), "render_measured": dict(sorted(row.measured.items())),
                     "measure_problem": row.measure_problem or None, "seeds": seeds})
    compare = None if spec.compare is None else {"column": spec.compare.column, "headline": spec.compare.headline,
                                                 "baselines": spec.compare.baselines}
    return {"format": TABLE_FORMAT, "table": spec.name, "title": spec.title, "source": spec.source,
            "provenance": provenance, "seeds": spec.seed_count, "std": STD_NAME,
            "columns": [c.__dict__ for c in spec.columns], "shared_overrides": spec.overrides, "speed": spec.speed,
            "costs": spec.costs, "compare": compare, "plot": plot_data(spec), "rows": rows}

def json_text(data: Any) -> str:
    """How the results' JSON files are written (``write_json_atomic``'s format)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


SUMMARY_NAME = "SUMMARY.md"


def _table_order(name: str) -> tuple[int, int]:
    journal = name.startswith("pp-")
    return (int(journal), int(name.removeprefix("pp-")))

def _table_title(name: str) -> str:
    if name.startswith("pp-"):
        number = int(name[3:])
        roman = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI", "XII", "XIII", "XIV"][number]
        return f"CARAFE++ Table {roman}"
    return f"ICCV Table {name}"

def render_summary(tables: list[dict[str, Any]]) -> str:
    """One line per rendered table (its JSON data): the headline comparison, the paper's Δ beside ours, and what the
    seeds say about it."""
    tables = sorted(tables, key=lambda data: _table_order(data["table"]))
    scales = sorted({str(data.get("provenance", {}).get("scale", "?")) for data in tables})
    lines = ["# What the seeds say, table by table", "",
             "Generated by `scripts/reproduce.py` from the rendered tables (`make check-results` renders it again); do "
             "not edit by hand. One line per table: its headline row against its baseline row (each table's spec "
             "names both), the paper's Δ beside ours (the mean over our seeds), the 95 % interval of our Δ and "
             "Welch's t over the seeds, and whether our Δ is separated from seed noise (its interval excludes 0) "
             "and in the paper's direction.", "",
             f"Scale: {', '.join(scales)}."
             + (" Numbers at scale=tiny come from minutes-long runs on small embedded datasets: they are not the "
                "paper's and only their differences, read against the seeds, are compared." if "tiny" in scales
                else ""), "",
             "| table | comparison | metric | Δ (paper) | Δ (ours) | 95 % interval | t (df) | n | what the seeds say "
             "| runs' code |", "|---|---|---|---|---|---|---|---|---|---|"]
    counts: dict[str, int] = {}
    for data in tables:
        compare = data.get("compare")
        name = data["table"]
        link = f"[{_table_title(name)}](table-{name}.md)"
        if not compare:
            lines.append(f"| {link} | no baseline row | | | | | | | | |")
            continue
        column = next(c for c in data["columns"] if c["key"] == compare["column"])
        row = next(r for r in data["rows"] if r["label"] == compare["headline"])
        c = (row.get("vs_baseline") or {}).get(compare["column"]) or {}
        d = int(column.get("decimals", 2)) + 1
        interval = "–" if c.get("low") is None else f"[{c['low']:+.{d}f}, {c['high']:+.{d}f}]"
        t = "–" if c.get("t") is None else f"{c['t']:+.2f} ({c['df']:.1f})"
        seeds = [seed for r in data["rows"] for seed in r["seeds"] if seed.get("record")]
        marked = sum(seed.get("code") not in (None, "current") for seed in seeds)
        code = f"{marked} of {len(seeds)} runs marked" if marked else f"all {len(seeds)} current"
        text = c.get("verdict", "not measured")
        counts[text] = counts.get(text, 0) + 1
        lines.append(f"| {link} | {compare['headline']} vs {c.get('baseline', '?')} | {column['header']} | "
                     f"{_signed(c.get('paper_delta'), d)} | {_signed(c.get('delta'), d)} | {interval} | {t} | "
                     f"{c.get('n', 0)} / {c.get('n_baseline', 0)} | {text} | {code} |")
    lines += ["", "Over the tables: " + "; ".join(f"{n} {text}" for text, n in
                                                  sorted(counts.items(), key=lambda item: (-item[1], item[0]))) + ".",
              "", "A run is marked when it was trained at a commit whose result-affecting code differs from the commit "
              "its table was rendered at, or from an uncommitted tree; each table's provenance says which and how "
              "many."]
    return "\n".join(lines) + "\n"

def committed_tables(results_dir: Path) -> list[Path]:
    return sorted(results_dir.glob("table-*.json"), key=lambda p: _table_order(p.stem.removeprefix("table-")))
