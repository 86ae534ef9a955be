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

Two kinds of columns are not read from a run's ``metrics.json`` but measured when the table is rendered:

    speed: {baseline: Nearest, warmup: 3, iterations: 10}   # every row's trained model timed together
    columns: [{key: fps, metric: speed.fps, decimals: 1},   # images/s at the task's task.speed_image_size
              {key: fps_ratio, metric: speed.ratio, paper_ratio_of: fps}]   # / the baseline row's images/s
    costs: {node: fpn_upsampler, channels: 256, scale_factor: 2}   # the operator at that config node
    columns: [{key: flops, metric: cost.flops, format: si}, {key: params, metric: cost.params, format: si}]

``format: si`` prints as the papers print costs (``199k``, ``4.7M``); a paper figure may be such a string.
``paper_ratio_of: fps`` fills the paper's cell from its own figures: this row's fps / the baseline row's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carafe.costs import paper_round
from tasks.common.experiment import CONF_DIR, METRICS_NAME, compose, config_hash, read_record, validate
from tasks.common.io import write_json_atomic, write_text_atomic

TABLE_DIR = CONF_DIR / "table"


class TableSpecError(ValueError):
    pass


MEASURED_AT_RENDER = ("speed.", "cost.")  # column metrics measured by the renderer, not read from a run


@dataclass
class Column:
    key: str
    header: str
    metric: str
    decimals: int = 2
    format: str | None = None          # None (fixed decimals) or "si" (199k, 4.7M)
    paper_ratio_of: str | None = None  # the paper's cell is row.paper[this] / baseline.paper[this]


@dataclass
class Row:
    label: str
    overrides: list[str]
    paper: dict[str, float | str | None]
    config: DictConfig | None = None
    config_hash: str = ""
    record: dict[str, Any] | None = None
    run_dir: str = ""
    problem: str = ""           # why the row has no measured numbers
    measured: dict[str, float] = field(default_factory=dict)   # "speed.*" and "cost.*" values
    measure_problem: str = ""   # why the speed / cost values are missing


@dataclass
class TableSpec:
    name: str
    title: str
    source: str
    overrides: list[str]
    columns: list[Column]
    rows: list[Row]
    notes: dict[str, str] = field(default_factory=dict)
    speed: dict[str, Any] | None = None
    costs: dict[str, Any] | None = None

    def baseline_row(self) -> Row | None:
        label = (self.speed or {}).get("baseline")
        return next((row for row in self.rows if row.label == label), None)


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def normalize_table_name(name: str) -> str:
    """``pp-12``, ``table-pp-12`` and ``conf/table/pp-12.yaml`` all name the same table."""
    name = Path(name).name
    name = name.removesuffix(".yaml").removeprefix("table-")
    if not (TABLE_DIR / f"{name}.yaml").is_file():
        raise TableSpecError(f"no table {name!r}; known tables: {', '.join(table_names())}")
    return name


NOTES_DIR = TABLE_DIR / "notes"


def _raw_spec(name: str, seen: tuple[str, ...] = (), shared_notes: bool = True) -> dict[str, Any]:
    """A table file as a dict, with ``extends`` (another table whose keys it overrides; ``relabel`` renames rows,
    ``paper_update`` sets paper figures per row label) and ``notes_from`` (``conf/table/notes/<name>.yaml``, shared
    notes printed before the table's own) applied."""
    path = TABLE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise TableSpecError(f"no table {name!r}; known tables: {', '.join(table_names())}")
    if name in seen:
        raise TableSpecError(f"conf/table/{name}.yaml: 'extends' loops through {' -> '.join((*seen, name))}")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    base_name = raw.pop("extends", None)
    if base_name is not None:
        base = _raw_spec(str(base_name), (*seen, name), shared_notes=False)
        relabel, updates = raw.pop("relabel", None) or {}, raw.pop("paper_update", None) or {}
        raw = {**base, **raw}
        rows = []
        for row in raw.get("rows", []):
            label = relabel.get(row["label"], row["label"])
            rows.append({**row, "label": label, "paper": {**(row.get("paper") or {}), **updates.pop(label, {})}})
        if updates:
            raise TableSpecError(f"conf/table/{name}.yaml: paper_update names no row: {sorted(updates)}")
        keys = {c["key"] for c in raw.get("columns", [])}
        for row in rows:  # figures of the base's columns that this table does not show
            row["paper"] = {k: v for k, v in row["paper"].items() if k in keys}
        raw["rows"] = rows
    shared = raw.pop("notes_from", None) if shared_notes else None
    if shared is not None:
        notes_path = NOTES_DIR / f"{shared}.yaml"
        if not notes_path.is_file():
            raise TableSpecError(f"conf/table/{name}.yaml: notes_from={shared!r} but {notes_path} does not exist")
        common = OmegaConf.to_container(OmegaConf.load(notes_path))
        own = raw.get("notes") or {}
        raw["notes"] = {scale: "\n\n".join(t.strip() for t in (common.get(scale), own.get(scale)) if t)
                        for scale in {*common, *own}}
    return raw


def load_table_spec(name: str) -> TableSpec:
    name = normalize_table_name(name)
    raw = _raw_spec(name)
    where = f"conf/table/{name}.yaml"
    for key in ("title", "columns", "rows"):
        if key not in raw:
            raise TableSpecError(f"{where} lacks {key!r}")
    columns = [Column(c["key"], c.get("header", c["key"]), c.get("metric", c["key"]), int(c.get("decimals", 2)),
                      c.get("format"), c.get("paper_ratio_of")) for c in raw["columns"]]
    keys = {c.key for c in columns}
    for c in columns:
        if c.format not in (None, "si"):
            raise TableSpecError(f"{where}: column {c.key!r} has format {c.format!r}; use si or leave it out")
        if c.metric.startswith("speed.") and not raw.get("speed"):
            raise TableSpecError(f"{where}: column {c.key!r} reads {c.metric} but the table has no 'speed' section")
        if c.metric.startswith("cost.") and not raw.get("costs"):
            raise TableSpecError(f"{where}: column {c.key!r} reads {c.metric} but the table has no 'costs' section")
        if c.paper_ratio_of is not None and c.paper_ratio_of not in keys:
            raise TableSpecError(f"{where}: column {c.key!r}: paper_ratio_of={c.paper_ratio_of!r} is no column")
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
    spec = TableSpec(name, raw["title"], raw.get("source", ""), list(raw.get("overrides") or []), columns, rows,
                     dict(raw.get("notes") or {}), raw.get("speed"), raw.get("costs"))
    if spec.speed is not None and spec.baseline_row() is None:
        raise TableSpecError(f"{where}: speed.baseline={spec.speed.get('baseline')!r} names no row; rows are "
                             f"{[r.label for r in rows]}")
    return spec


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


def measure_costs(spec: TableSpec) -> None:
    """Fill ``cost.flops`` (per input pixel, papers' convention) and ``cost.params`` of each composed row's
    operator at ``spec.costs.node``, built for ``channels`` and ``scale_factor``."""
    from hydra.utils import instantiate

    from carafe.costs import flops_per_pixel, num_params

    costs = spec.costs or {}
    for row in spec.rows:
        node = OmegaConf.select(row.config, costs["node"]) if row.config is not None else None
        if node is None:
            row.measure_problem = f"no `{costs['node']}` in the row's config"
            continue
        module = instantiate(node)(channels=int(costs.get("channels", 256)),
                                   scale_factor=int(costs.get("scale_factor", 2)))
        row.measured.update({"cost.flops": float(flops_per_pixel(module)), "cost.params": float(num_params(module))})


def measure_speed(spec: TableSpec) -> str:
    """Time every finished row's trained model together (``tasks.common.speed.measure_speeds``) on one image of
    the row's ``task.speed_image_size``; fill ``speed.fps`` and ``speed.ratio`` (to ``spec.speed.baseline``).
    Returns the device the speeds were measured on."""
    from tasks.common.distributed import init_world
    from tasks.common.engine import CHECKPOINT_NAME, load_weights
    from tasks.common.experiment import task_class
    from tasks.common.provenance import device_name
    from tasks.common.speed import measure_speeds

    settings = spec.speed or {}
    world = init_world("auto")
    calls = {}
    for row in spec.rows:
        checkpoint = Path(row.run_dir) / CHECKPOINT_NAME if row.run_dir else None
        if row.record is None or checkpoint is None or not checkpoint.is_file():
            row.measure_problem = row.problem or "no trained model to time"
            continue
        task = task_class(row.config.task.name)(row.config, world)
        model = load_weights(task.build_model(), checkpoint).to(world.device).eval()
        image = task.inference_input(*row.config.task.speed_image_size)
        calls[row.label] = (lambda m=model, x=image: m(x))
    speeds = measure_speeds(calls, int(settings.get("warmup", 3)), int(settings.get("iterations", 10)),
                            world.device) if calls else {}
    baseline = speeds.get(settings.get("baseline"))
    for row in spec.rows:
        if row.label in speeds:
            row.measured["speed.fps"] = speeds[row.label]
            if baseline:
                row.measured["speed.ratio"] = speeds[row.label] / baseline
            else:
                row.measure_problem = f"the baseline row {settings.get('baseline')!r} has no speed"
    return device_name(world.device)


def metric_value(record: dict[str, Any], dotted: str) -> float | None:
    node: Any = record.get("metrics", {})
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return float(node) if isinstance(node, (int, float)) else None


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
    """The measured cell: a number, or the reason there is none (None: a metric neither the run nor the paper
    has, such as mask AP of a Faster R-CNN row)."""
    if column.metric.startswith(MEASURED_AT_RENDER):
        if column.metric in row.measured:
            return row.measured[column.metric]
        return row.measure_problem or row.problem or "not measured"
    if row.record is None:
        return row.problem or "not run"
    value = metric_value(row.record, column.metric)
    if value is None:
        return None if paper is None else f"no `{column.metric}` in the run's metrics"
    return value


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
            paper = paper_value(spec, row, column)
            cells += [_fmt(paper, column), _fmt(measured_value(row, column, paper), column, like=paper)]
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
        paper = {c.key: paper_value(spec, row, c) for c in spec.columns}
        measured = None
        if row.record is not None or row.measured:
            measured = {c.key: value if not isinstance(value := measured_value(row, c, paper[c.key]), str) else None
                        for c in spec.columns}
        rows.append({"label": row.label, "overrides": row.overrides, "config_hash": row.config_hash,
                     "run_dir": row.run_dir, "paper": paper, "measured": measured,
                     "problem": row.problem or None,
                     "run": None if row.record is None else {k: row.record.get(k) for k in (
                         "wall_seconds", "train_seconds", "device", "world_size", "commit", "finished_at",
                         "dataset", "scale")}})
    return {"table": spec.name, "title": spec.title, "source": spec.source, "provenance": provenance,
            "columns": [c.__dict__ for c in spec.columns], "shared_overrides": spec.overrides,
            "speed": spec.speed, "costs": spec.costs, "rows": rows}


def write_table(spec: TableSpec, provenance: dict[str, Any], out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``table-<name>.md`` and ``table-<name>.json`` under ``out_dir``, each replaced atomically."""
    out_dir = Path(out_dir)
    md, js = out_dir / f"table-{spec.name}.md", out_dir / f"table-{spec.name}.json"
    write_text_atomic(md, render_markdown(spec, provenance))
    write_json_atomic(js, table_json(spec, provenance))
    return md, js
