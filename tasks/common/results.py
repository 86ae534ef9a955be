"""The results pipeline: a table is declared once in ``conf/table/<name>.yaml`` (its rows as config overrides, its
columns, the papers' numbers); ``scripts/reproduce.py`` composes each row, reuses a finished run with the same
config hash or trains one, and renders ``results/table-<name>.md`` and ``.json`` with provenance.

A table spec::

    title: "..."                 # heading of the rendered table
    source: "..."                # where the papers' numbers come from
    overrides: [task=...]        # shared by every row
    columns: [{key: top1, header: top-1, metric: top1, decimals: 2}]  # metric: dotted path into "metrics"
    rows: [{label: ResNet-50, overrides: [model=resnet50], paper: {top1: 76.43}}]
    notes: {tiny: "...", paper: "..."}                      # optional, printed under the table
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.common.experiment import CONF_DIR, METRICS_NAME, compose, config_hash, read_record, validate
from tasks.common.io import write_json_atomic, write_text_atomic

TABLE_DIR = CONF_DIR / "table"


class TableSpecError(ValueError):
    pass


@dataclass
class Column:
    key: str
    header: str
    metric: str
    decimals: int = 2


@dataclass
class Row:
    label: str
    overrides: list[str]
    paper: dict[str, float | None]
    config: DictConfig | None = None
    config_hash: str = ""
    record: dict[str, Any] | None = None
    run_dir: str = ""
    problem: str = ""           # why the row has no measured numbers


@dataclass
class TableSpec:
    name: str
    title: str
    source: str
    overrides: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: dict[str, str] = field(default_factory=dict)


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def normalize_table_name(name: str) -> str:
    """``pp-12``, ``table-pp-12`` and ``conf/table/pp-12.yaml`` all name the same table."""
    name = Path(name).name
    name = name.removesuffix(".yaml").removeprefix("table-")
    if not (TABLE_DIR / f"{name}.yaml").is_file():
        raise TableSpecError(f"no table {name!r}; known tables: {', '.join(table_names())}")
    return name


def load_table_spec(name: str) -> TableSpec:
    name = normalize_table_name(name)
    raw = OmegaConf.to_container(OmegaConf.load(TABLE_DIR / f"{name}.yaml"))
    where = f"conf/table/{name}.yaml"
    for key in ("title", "columns", "rows"):
        if key not in raw:
            raise TableSpecError(f"{where} lacks {key!r}")
    columns = [Column(c["key"], c.get("header", c["key"]), c.get("metric", c["key"]), int(c.get("decimals", 2)))
               for c in raw["columns"]]
    keys = {c.key for c in columns}
    rows = []
    for index, row in enumerate(raw["rows"]):
        if "label" not in row:
            raise TableSpecError(f"{where}: row {index} has no label")
        paper = dict(row.get("paper") or {})
        unknown = set(paper) - keys
        if unknown:
            raise TableSpecError(f"{where}: row {row['label']!r} gives paper numbers for unknown columns "
                                 f"{sorted(unknown)}; columns are {sorted(keys)}")
        rows.append(Row(row["label"], list(row.get("overrides") or []), paper))
    return TableSpec(name, raw["title"], raw.get("source", ""), list(raw.get("overrides") or []), columns, rows,
                     dict(raw.get("notes") or {}))


def row_overrides(spec: TableSpec, row: Row, scale: str, extra: list[str] = ()) -> list[str]:
    return [*spec.overrides, *row.overrides, f"scale={scale}", *extra]


def compose_rows(spec: TableSpec, scale: str, extra: list[str] = ()) -> None:
    """Compose and validate every row (so a bad row fails before any training) and fill in its config hash."""
    for row in spec.rows:
        overrides = row_overrides(spec, row, scale, extra)
        try:
            row.config = compose(overrides)
            validate(row.config)
        except Exception as error:
            raise TableSpecError(f"table {spec.name}, row {row.label!r} ({' '.join(overrides)}): {error}") from error
        row.config_hash = config_hash(row.config)


def index_runs(*folders: str | Path) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Finished runs found under ``folders`` (run folders, a runs store, Hydra sweep folders): hash -> (folder,
    record); of several runs of one config the most recently finished wins."""
    found: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in folders:
        folder = Path(folder)
        if not folder.exists():
            continue
        for path in sorted(folder.rglob(METRICS_NAME)):
            try:
                record = read_record(path.parent)
            except (OSError, json.JSONDecodeError):
                continue
            if record is None or "config_hash" not in record:
                continue
            previous = found.get(record["config_hash"])
            if previous is None or record.get("finished_at", "") >= previous[1].get("finished_at", ""):
                found[record["config_hash"]] = (path.parent, record)
    return found


def metric_value(record: dict[str, Any], dotted: str) -> float | None:
    node: Any = record.get("metrics", {})
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) else None


def _fmt(value: float | None, decimals: int) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{decimals}f}"


def render_markdown(spec: TableSpec, provenance: dict[str, Any]) -> str:
    """The table with, for every column, the paper's figure and the measured one side by side."""
    lines = [f"# {spec.title}", "",
             "Generated by `scripts/reproduce.py`; do not edit by hand. Paper: the published figure "
             f"({spec.source}). Ours: measured by the run named in the last column.", "",
             "| provenance | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in provenance.items()]
    header = ["row"]
    for column in spec.columns:
        header += [f"{column.header} (paper)", f"{column.header} (ours)"]
    header.append("run")
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in spec.rows:
        cells = [row.label]
        for column in spec.columns:
            cells.append(_fmt(row.paper.get(column.key), column.decimals))
            if row.record is None:
                cells.append(row.problem or "not run")
            else:
                value = metric_value(row.record, column.metric)
                cells.append(_fmt(value, column.decimals) if value is not None
                             else f"no `{column.metric}` in the run's metrics")
        cells.append(f"`{row.config_hash}`" if row.config_hash else "–")
        lines.append("| " + " | ".join(cells) + " |")
    scale = provenance.get("scale", "")
    note = spec.notes.get(scale)
    if note:
        lines += ["", note.strip()]
    lines += ["", "Rows (overrides of `scripts/train.py`, shared ones first: "
              f"`{' '.join(spec.overrides) or '(none)'}`):", ""]
    for row in spec.rows:
        extra = ""
        if row.record is not None:
            extra = (f"; {row.record.get('wall_seconds', '?')} s on {row.record.get('device', '?')}"
                     f" x{row.record.get('world_size', 1)}, commit {str(row.record.get('commit', '?'))[:12]}")
        lines.append(f"- {row.label}: `{' '.join(row.overrides) or '(none)'}` -> run `{row.config_hash}`{extra}")
    return "\n".join(lines) + "\n"


def table_json(spec: TableSpec, provenance: dict[str, Any]) -> dict[str, Any]:
    rows = []
    for row in spec.rows:
        measured = {c.key: metric_value(row.record, c.metric) for c in spec.columns} if row.record else None
        rows.append({"label": row.label, "overrides": row.overrides, "config_hash": row.config_hash,
                     "run_dir": row.run_dir, "paper": row.paper, "measured": measured,
                     "problem": row.problem or None,
                     "run": None if row.record is None else {k: row.record.get(k) for k in (
                         "wall_seconds", "train_seconds", "device", "world_size", "commit", "finished_at",
                         "dataset", "scale")}})
    return {"table": spec.name, "title": spec.title, "source": spec.source, "provenance": provenance,
            "columns": [c.__dict__ for c in spec.columns], "shared_overrides": spec.overrides, "rows": rows}


def write_table(spec: TableSpec, provenance: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``table-<name>.md`` and ``table-<name>.json`` under ``out_dir``, each replaced atomically."""
    out_dir = Path(out_dir)
    md, js = out_dir / f"table-{spec.name}.md", out_dir / f"table-{spec.name}.json"
    write_text_atomic(md, render_markdown(spec, provenance))
    write_json_atomic(js, table_json(spec, provenance))
    return md, js
