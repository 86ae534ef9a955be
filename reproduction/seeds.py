"""A column over a row's seeds (the values, their mean and sample standard deviation, and why a seed has none), and
each compared row against its baseline row (``reproduction.stats.welch``)."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from reproduction.spec import Column, Row, TableSpec
from reproduction.stats import Comparison, welch


def metric_value(record: dict[str, Any], dotted: str) -> float | None:
    node: Any = record.get("metrics", {})
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) else None

@dataclass
class SeedSummary:
    """One column of one row over its seeds: the value of every seed that has one, and why the others have none."""
    values: dict[int, float]
    missing: dict[int, str]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values.values()) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None below two values."""
        return statistics.stdev(self.values.values()) if self.n >= 2 else None

def row_problem(row: Row) -> str:
    problems = sorted({run.problem for run in row.runs if run.problem and run.record is None})
    return "; ".join(problems)

def seed_summary(row: Row, column: Column, paper: object = 0.0) -> SeedSummary | None:
    """A run-metric column over the row's seeds; None when neither a run nor the paper has the metric (such as mask
    AP of a Faster R-CNN row)."""
    values, missing = {}, {}
    for run in row.runs:
        value = None if run.record is None else metric_value(run.record, column.metric)
        if value is not None:
            values[run.seed] = value
        elif run.record is None:
            missing[run.seed] = run.problem or "not run"
        else:
            missing[run.seed] = f"no `{column.metric}` in the run's metrics"
    if not values and paper is None and row.finished_runs():  # runs that finished without it: not this row's metric
        return None
    return SeedSummary(values, missing)

def row_values(row: Row, column: Column) -> list[float]:
    return [value for run in row.runs if run.record is not None
            for value in [metric_value(run.record, column.metric)] if value is not None]

def comparisons(spec: TableSpec) -> dict[str, dict[str, dict[str, Any]]]:
    """For each compared row of ``spec.compare``: per column read from the runs, Δ against its baseline row (Welch's t,
    its degrees of freedom and the 95 % interval of Δ over the seeds), the paper's Δ, and what that says."""
    if spec.compare is None:
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label, base_label in spec.compare.baselines.items():
        row, base = spec.row(label), spec.row(base_label)
        per_column = {}
        for column in spec.columns:
            if column.measured_at_render:
                continue
            mine, theirs = row_values(row, column), row_values(base, column)
            paper_mine, paper_theirs = row.paper.get(column.key), base.paper.get(column.key)
            paper_delta = (paper_mine - paper_theirs if isinstance(paper_mine, (int, float))
                           and isinstance(paper_theirs, (int, float)) else None)
            comparison = welch(mine, theirs) if mine and theirs else None
            per_column[column.key] = {
                "baseline": base_label, "paper_delta": paper_delta,
                "delta": None if comparison is None else comparison.delta,
                "t": None if comparison is None else comparison.t, "df": None if comparison is None else comparison.df,
                "low": None if comparison is None else comparison.low,
                "high": None if comparison is None else comparison.high,
                "n": len(mine), "n_baseline": len(theirs),
                "verdict": verdict(comparison, paper_delta)}
        out[label] = per_column
    return out

def verdict(comparison: Comparison | None, paper_delta: float | None) -> str:
    """What the seeds say about one Δ, in words."""
    if comparison is None:
        return "not measured (a row has no finished run)"
    if comparison.separated is None:
        return ("spread not measured (one seed)" if min(comparison.n_a, comparison.n_b) < 2
                else "no spread over the seeds (identical values)")
    if not comparison.separated:
        return "not separated from seed noise"
    if paper_delta is None or paper_delta == 0:
        return "separated (the paper shows no difference)"
    same = (comparison.delta > 0) == (paper_delta > 0)
    return "separated, in the paper's direction" if same else "separated, opposite to the paper's direction"
