"""The results pipeline: a table is declared once in ``conf/table/<name>.yaml`` (its rows as config overrides, its
columns, the papers' numbers); ``scripts/reproduce.py`` composes each row and seed, reuses a finished run with the
same config hash or trains one, and renders ``results/table-<name>.md``, ``.json`` and, when asked, a figure, with
provenance.

A table spec::

    title: "..."                 # heading of the rendered table
    source: "..."                # the paper and table number the published figures come from
    overrides: [task=...]        # shared by every row
    columns: [{key: top1, header: top-1, metric: top1, decimals: 2}]  # metric: dotted path into "metrics"
    rows: [{label: ResNet-50, overrides: [model=resnet50], paper: {top1: 76.43}}]
    seeds: {tiny: 3, paper: 1}   # optional (default 1), or one number for every scale
    plot: {column: top1, x_title: "C_m", x_ticks: ["4", ...]}  # optional: results/figures/table-<name>.png
    notes: {tiny: "...", paper: "..."}                      # optional, printed under the table

A table that reprints another's rows names it instead of copying them (the rows keep their runs)::

    extends: "6"                 # every key of conf/table/6.yaml, overridden by this file's own
    relabel: {CARAFE: CARAFE++}  # optional: rows renamed
    paper_update: {CARAFE++: {APS: 23.2}}  # optional: published figures that differ, per (renamed) row
    append_rows: [{label: Backbone, overrides: [downsampler=carafe], paper: {mIoU: 41.93}}]  # optional: rows after

A column group defined once in ``conf/table/columns/<group>.yaml`` (a list of columns) is used by
``columns: [{group: bbox_ap}, ...]``.

Seeds: seed 0 of a row is its overrides as written (so its config hash does not depend on how many seeds a table
asks for); seed k >= 1 adds exactly one override, ``run.seed=k``. A measured cell is the mean ± the sample standard
deviation (ddof=1) over the row's finished seeds and names every seed that has no value.

Two kinds of columns are not read from a run's ``metrics.json`` but measured when the table is rendered, once per
row (the seed changes a model's weights, not its architecture):

    speed: {baseline: Nearest, warmup: 3, iterations: 10}   # every row's trained model timed together
    columns: [{key: fps, metric: speed.fps, decimals: 1},   # images/s at the task's task.speed_image_size
              {key: fps_ratio, metric: speed.ratio, paper_ratio_of: fps}]   # / the baseline row's images/s
    costs: {node: fpn_upsampler, channels: 256, scale_factor: 2}   # the operator at that config node
    columns: [{key: flops, metric: cost.flops, format: si}, {key: params, metric: cost.params, format: si}]

``format: si`` prints as the papers print costs (``199k``, ``4.7M``); a paper figure may be such a string.
``paper_ratio_of: fps`` fills the paper's cell from its own figures: this row's fps / the baseline row's.

Every table names its baseline rows for what the seeds say (each paper table has the model without the operator, or an
ablation's default setting)::

    compare: {baseline: Nearest, headline: CARAFE, column: AP}   # every other row against Nearest
    compare: {baseline: {"w/ CARAFE": "baseline"}, headline: "w/ CARAFE"}   # or row -> its own baseline row

Each compared row gets Δ against its baseline with Welch's t and the 95 % interval of Δ over the seeds (in the table
and, for the headline row, in ``results/SUMMARY.md``).

A run's values live only in its record, ``results/runs/<config hash>.json`` (``tasks.common.records``): a rendered
table's JSON names each seed's record and keeps no copy of its values, so ``make check-results`` can render every
committed table again from the records and find any difference. A run folder (the runs store, a Hydra sweep) whose
run finished later than a config's record replaces that record.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carafe.costs import paper_round
from tasks.common.backbones import BACKBONE_KEY, backbone_name, missing_backbones, takes_backbone_weights
from tasks.common.experiment import CONF_DIR, CONFIG_NAME, METRICS_NAME, compose, config_hash, read_record, validate
from tasks.common.io import write_json_atomic, write_text_atomic
from tasks.common.provenance import REPO_ROOT, code_status
from tasks.common.records import RECORD_FORMAT, RECORDS_DIR_NAME, RecordError, newer, record_from_run, record_path
from tasks.common.stats import Comparison, welch

TABLE_DIR = CONF_DIR / "table"
NOTES_DIR = TABLE_DIR / "notes"
COLUMN_GROUPS_DIR = TABLE_DIR / "columns"
FIGURES_DIR_NAME = "figures"
SEED_KEY = "run.seed"
STD_NAME = "sample standard deviation (ddof=1)"
TABLE_FORMAT = 2   # a rendered table JSON: seeds reference run records (results/runs/) and keep no values of their own


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

    @property
    def measured_at_render(self) -> bool:
        return self.metric.startswith(MEASURED_AT_RENDER)


@dataclass
class SeedRun:
    """One seed of a row: its config, and the finished run found for it (or why there is none)."""
    seed: int
    config: DictConfig | None = None
    config_hash: str = ""
    record: dict[str, Any] | None = None
    run_dir: str = ""           # the run folder, when this machine has it (the trained model, for speed columns)
    problem: str = ""           # why the seed has no measured numbers
    code: str = ""              # its code against the commit the table is rendered at (provenance.code_status)

    @property
    def overrides(self) -> list[str]:
        """What this seed adds to its row's overrides: nothing for seed 0, ``run.seed=k`` otherwise."""
        return [f"{SEED_KEY}={self.seed}"] if self.seed else []


@dataclass
class Row:
    label: str
    overrides: list[str]
    paper: dict[str, float | str | None]
    runs: list[SeedRun] = field(default_factory=lambda: [SeedRun(0)])
    measured: dict[str, float] = field(default_factory=dict)   # "speed.*" and "cost.*" values
    measure_problem: str = ""   # why the speed / cost values are missing
    backbone: list[str] = field(default_factory=list)   # model.backbone_weights=..., from compose_rows(backbones=)

    @property
    def config(self) -> DictConfig | None:
        return self.runs[0].config

    @property
    def config_hash(self) -> str:
        """The row's identity: its seed-0 run."""
        return self.runs[0].config_hash

    def finished_runs(self) -> list[SeedRun]:
        return [run for run in self.runs if run.record is not None]


@dataclass
class Plot:
    column: str
    x_title: str = ""
    x_ticks: list[str] | None = None   # one per row; None: the row labels


@dataclass
class Compare:
    """What the seeds are asked: each row in ``baselines`` (row -> its baseline row) against its baseline, on every
    column read from the runs, with ``column`` the one the rendered table and ``results/SUMMARY.md`` state;
    ``headline`` is the comparison the summary's line is about (a key of ``baselines``)."""
    column: str
    baselines: dict[str, str]
    headline: str


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
    seeds: int | dict[str, int] = 1
    plot: Plot | None = None
    compare: Compare | None = None

    def row(self, label: str) -> Row:
        return next(row for row in self.rows if row.label == label)

    def baseline_row(self) -> Row | None:
        label = (self.speed or {}).get("baseline")
        return next((row for row in self.rows if row.label == label), None)

    def seeds_at(self, scale: str) -> int:
        return int(self.seeds.get(scale, 1)) if isinstance(self.seeds, dict) else int(self.seeds)

    @property
    def seed_count(self) -> int:
        """How many seeds the composed rows have."""
        return max((len(row.runs) for row in self.rows), default=1)


def table_names() -> list[str]:
    return sorted(p.stem for p in TABLE_DIR.glob("*.yaml"))


def normalize_table_name(name: str) -> str:
    """``pp-12``, ``table-pp-12`` and ``conf/table/pp-12.yaml`` all name the same table."""
    name = Path(name).name
    name = name.removesuffix(".yaml").removeprefix("table-")
    if not (TABLE_DIR / f"{name}.yaml").is_file():
        raise TableSpecError(f"no table {name!r}; known tables: {', '.join(table_names())}")
    return name


def _expand_column_groups(columns: list[Any], where: str) -> list[dict[str, Any]]:
    """``{group: name}`` entries replaced by the columns of ``conf/table/columns/<name>.yaml``."""
    expanded = []
    for entry in columns:
        if isinstance(entry, dict) and set(entry) == {"group"}:
            path = COLUMN_GROUPS_DIR / f"{entry['group']}.yaml"
            if not path.is_file():
                known = sorted(p.stem for p in COLUMN_GROUPS_DIR.glob("*.yaml"))
                raise TableSpecError(f"{where}: no column group {entry['group']!r}; groups are {known}")
            expanded += OmegaConf.to_container(OmegaConf.load(path))
        elif isinstance(entry, dict) and "key" in entry and "group" not in entry:
            expanded.append(entry)
        else:
            raise TableSpecError(f"{where}: column {entry!r} is neither {{key: ...}} nor {{group: <name>}}")
    return expanded


def _raw_spec(name: str, seen: tuple[str, ...] = (), shared_notes: bool = True) -> dict[str, Any]:
    """A table file as a dict, with column groups expanded, ``extends`` (another table whose keys it overrides;
    ``relabel`` renames rows, ``paper_update`` sets paper figures per row label, ``append_rows`` adds rows after the
    base's) and ``notes_from``
    (``conf/table/notes/<name>.yaml``, shared notes printed before the table's own) applied."""
    path = TABLE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise TableSpecError(f"no table {name!r}; known tables: {', '.join(table_names())}")
    if name in seen:
        raise TableSpecError(f"conf/table/{name}.yaml: 'extends' loops through {' -> '.join((*seen, name))}")
    raw = OmegaConf.to_container(OmegaConf.load(path))
    if "columns" in raw:
        raw["columns"] = _expand_column_groups(raw["columns"] or [], f"conf/table/{name}.yaml")
    base_name = raw.pop("extends", None)
    stray = [key for key in ("relabel", "paper_update", "append_rows") if key in raw]
    if base_name is None and stray:
        raise TableSpecError(f"conf/table/{name}.yaml: {', '.join(stray)} only apply to a table with 'extends'")
    if base_name is not None:
        base = _raw_spec(str(base_name), (*seen, name), shared_notes=False)
        relabel, updates = raw.pop("relabel", None) or {}, raw.pop("paper_update", None) or {}
        appended = raw.pop("append_rows", None) or []
        if "rows" in raw and appended:
            raise TableSpecError(f"conf/table/{name}.yaml: give either rows (replacing {base_name}'s) or append_rows "
                                 "(added after them), not both")
        if "compare" not in raw and isinstance(base.get("compare"), dict) and relabel:
            compare = dict(base["compare"])
            baseline = compare.get("baseline")
            compare["baseline"] = ({relabel.get(k, k): relabel.get(v, v) for k, v in baseline.items()}
                                   if isinstance(baseline, dict) else relabel.get(baseline, baseline))
            compare["headline"] = relabel.get(compare.get("headline"), compare.get("headline"))
            raw["compare"] = compare
        raw = {**base, **raw}
        rows = []
        for row in raw.get("rows", []):
            label = relabel.get(row["label"], row["label"])
            rows.append({**row, "label": label, "paper": {**(row.get("paper") or {}), **updates.pop(label, {})}})
        if updates:
            raise TableSpecError(f"conf/table/{name}.yaml: paper_update names no row: {sorted(updates)}")
        rows += appended
        keys = {c["key"] for c in raw.get("columns", [])}
        for row in rows:  # figures of the base's columns that this table does not show
            row["paper"] = {k: v for k, v in (row.get("paper") or {}).items() if k in keys}
        raw["rows"] = rows
    shared = raw.pop("notes_from", None) if shared_notes else None
    if shared is not None:
        notes_path = NOTES_DIR / f"{shared}.yaml"
        if not notes_path.is_file():
            raise TableSpecError(f"conf/table/{name}.yaml: notes_from={shared!r} but conf/table/notes/{shared}.yaml "
                                 "does not exist")
        common = OmegaConf.to_container(OmegaConf.load(notes_path))
        own = raw.get("notes") or {}
        raw["notes"] = {scale: "\n\n".join(t.strip() for t in (common.get(scale), own.get(scale)) if t)
                        for scale in {*common, *own}}
    return raw


def _seeds_setting(value: Any, where: str) -> int | dict[str, int]:
    counts = value if isinstance(value, dict) else {"every scale": value}
    for scale, count in counts.items():
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise TableSpecError(f"{where}: seeds for {scale} is {count!r}; give a whole number >= 1")
    return value


def _plot_setting(value: dict[str, Any], columns: list[Column], rows: list[Any], where: str) -> Plot:
    unknown = set(value) - {"column", "x_title", "x_ticks"}
    if unknown or "column" not in value:
        raise TableSpecError(f"{where}: plot takes column (required), x_title and x_ticks; got {sorted(value)}")
    if value["column"] not in {c.key for c in columns}:
        raise TableSpecError(f"{where}: plot.column={value['column']!r} is no column; columns are "
                             f"{[c.key for c in columns]}")
    ticks = value.get("x_ticks")
    if ticks is not None and len(ticks) != len(rows):
        raise TableSpecError(f"{where}: plot.x_ticks has {len(ticks)} labels for {len(rows)} rows; give one per row")
    return Plot(value["column"], str(value.get("x_title", "")), None if ticks is None else [str(t) for t in ticks])


def _compare_setting(value: Any, columns: list[Column], rows: list[Row], where: str) -> Compare:
    """``compare: {baseline: <row> | {<row>: <its baseline row>, ...}, headline: <row>, column: <key>}``: with one
    baseline row every other row is compared with it. Every table names one (the papers' tables each have the model
    without the operator, or the default setting of an ablation)."""
    if not isinstance(value, dict) or set(value) - {"baseline", "headline", "column"} or "baseline" not in value \
            or "headline" not in value:
        raise TableSpecError(f"{where}: compare takes baseline (a row, or a mapping row -> baseline row), headline (a "
                             f"compared row) and column (optional; default the first column read from the runs); got "
                             f"{value!r}")
    labels = [row.label for row in rows]
    baseline = value["baseline"]
    baselines = ({str(k): str(v) for k, v in baseline.items()} if isinstance(baseline, dict)
                 else {label: str(baseline) for label in labels if label != baseline})
    for row, base in baselines.items():
        for label in (row, base):
            if label not in labels:
                raise TableSpecError(f"{where}: compare names no row {label!r}; rows are {labels}")
        if row == base:
            raise TableSpecError(f"{where}: compare: row {row!r} is its own baseline")
    if value["headline"] not in baselines:
        raise TableSpecError(f"{where}: compare.headline={value['headline']!r} is not a compared row; compared rows are "
                             f"{sorted(baselines)}")
    trained = [c.key for c in columns if not c.measured_at_render]
    column = value.get("column", trained[0] if trained else None)
    if column not in trained:
        raise TableSpecError(f"{where}: compare.column={column!r} is not a column read from the runs ({trained})")
    return Compare(str(column), baselines, str(value["headline"]))


def load_table_spec(name: str) -> TableSpec:
    name = normalize_table_name(name)
    raw = _raw_spec(name)
    where = f"conf/table/{name}.yaml"
    for key in ("title", "columns", "rows"):
        if key not in raw:
            raise TableSpecError(f"{where} lacks {key!r}")
    columns = [Column(c["key"], c.get("header", c["key"]), c.get("metric", c["key"]), int(c.get("decimals", 2)),
                      c.get("format"), c.get("paper_ratio_of")) for c in raw["columns"]]
    keys = [c.key for c in columns]
    if len(set(keys)) != len(keys):
        raise TableSpecError(f"{where}: a column key appears twice: {keys}")
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
        unknown = set(paper) - set(keys)
        if unknown:
            raise TableSpecError(f"{where}: row {row['label']!r} gives paper numbers for unknown columns "
                                 f"{sorted(unknown)}; columns are {sorted(keys)}")
        rows.append(Row(row["label"], list(row.get("overrides") or []), paper))
    plot = _plot_setting(raw["plot"], columns, rows, where) if raw.get("plot") else None
    compare = _compare_setting(raw.get("compare"), columns, rows, where)
    spec = TableSpec(name, raw["title"], raw.get("source", ""), list(raw.get("overrides") or []), columns, rows,
                     dict(raw.get("notes") or {}), raw.get("speed"), raw.get("costs"),
                     _seeds_setting(raw.get("seeds", 1), where), plot, compare)
    if spec.speed is not None and spec.baseline_row() is None:
        raise TableSpecError(f"{where}: speed.baseline={spec.speed.get('baseline')!r} names no row; rows are "
                             f"{[r.label for r in rows]}")
    return spec


def row_overrides(spec: TableSpec, row: Row, scale: str, extra: list[str] = (),
                  run: SeedRun | None = None) -> list[str]:
    """The overrides of ``scripts/train.py`` for one seed of a row (seed 0 when ``run`` is None)."""
    return [*spec.overrides, *row.overrides, f"scale={scale}", *extra, *row.backbone, *(run.overrides if run else [])]


def compose_rows(spec: TableSpec, scale: str, extra: list[str] = (), seeds: int | None = None,
                 backbones: Path | None = None) -> None:
    """Compose and validate every row and seed (so a bad row fails before any training) and fill in their config
    hashes. ``seeds`` (default: the spec's for ``scale``) seeds per row: 0 .. seeds-1. With ``backbones`` (a
    folder), every row that takes backbone weights gets ``model.backbone_weights=<backbones>/<name>.pt`` for the
    backbone it has (``tasks.common.backbones``); a missing file fails here, naming the run that makes it."""
    seeds = spec.seeds_at(scale) if seeds is None else seeds
    if seeds < 1:
        raise TableSpecError(f"table {spec.name}: seeds={seeds}; give a whole number >= 1")
    fixed_seed = [o for o in extra if o.lstrip("+").startswith(f"{SEED_KEY}=")]
    if seeds > 1 and fixed_seed:
        raise TableSpecError(f"table {spec.name}: {fixed_seed[0]} fixes the seed of every run, but the table runs "
                             f"{seeds} seeds (run.seed=0..{seeds - 1}); drop the override or ask for 1 seed")
    needed: dict[Path, DictConfig] = {}
    for row in spec.rows:
        if backbones is not None:
            plain = compose(row_overrides(spec, row, scale, extra))
            if takes_backbone_weights(plain):
                path = Path(backbones).absolute() / f"{backbone_name(plain)}.pt"
                needed[path] = plain
                row.backbone = [f"{BACKBONE_KEY}={path}"]
    missing = missing_backbones(needed)
    if missing:
        raise TableSpecError(f"table {spec.name}: backbone weights missing from {backbones}:\n{missing}")
    for row in spec.rows:
        row.runs = [SeedRun(seed) for seed in range(seeds)]
        for run in row.runs:
            overrides = row_overrides(spec, row, scale, extra, run)
            try:
                run.config = compose(overrides)
                validate(run.config)
            except Exception as error:
                raise TableSpecError(f"table {spec.name}, row {row.label!r} ({' '.join(overrides)}): "
                                     f"{error}") from error
            run.config_hash = config_hash(run.config)


@dataclass
class FinishedRun:
    """A finished run found in a run folder by ``index_runs``: its record (``tasks.common.records``) and its folder
    (which also holds the trained model)."""
    record: dict[str, Any]
    run_dir: Path | None = None


def shown_path(path: str | Path) -> str:
    """A path as the rendered files may show it: relative to the repository, or only its last part when it lies
    outside (results/ never names a file outside the repository)."""
    path = Path(path).absolute()
    if path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return f"<outside the repository>/{path.name}"


def record_of_run_folder(run_dir: Path) -> dict[str, Any] | None:
    """The record of the finished run in ``run_dir`` (its ``metrics.json`` and resolved ``config.yaml``), None if it
    has not finished; ``RecordError`` if what it holds is malformed."""
    try:
        metrics = read_record(run_dir)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RecordError(f"{run_dir / METRICS_NAME}: not readable ({error})") from None
    if metrics is None:
        return None
    config_file = run_dir / CONFIG_NAME
    config = OmegaConf.to_container(OmegaConf.load(config_file)) if config_file.is_file() else None
    return record_from_run({"format": RECORD_FORMAT, **metrics}, config)


def index_runs(*sources: str | Path) -> dict[str, FinishedRun]:
    """Finished runs found in the folders ``sources`` (run folders, a runs store, Hydra sweep folders), by config
    hash; of several runs of one config the most recently finished wins. A folder whose ``metrics.json`` is malformed
    is named on stderr and skipped."""
    found: dict[str, FinishedRun] = {}
    for source in sources:
        source = Path(source)
        if source.is_file():
            raise TableSpecError(f"{source} is a file; --from takes folders of run folders (a rendered table keeps no "
                                 f"results of its own: its runs' records are in results/{RECORDS_DIR_NAME}/)")
        if not source.exists():
            continue
        for path in sorted(source.rglob(METRICS_NAME)):
            try:
                record = record_of_run_folder(path.parent)
            except (RecordError, OSError, ValueError) as error:
                print(f"skipping {shown_path(path.parent)}: {error}", file=sys.stderr)
                continue
            if record is None:
                continue
            previous = found.get(record["config_hash"])
            if previous is None or newer(record, previous.record) or record == previous.record:
                found[record["config_hash"]] = FinishedRun(record, path.parent)
    return found


def attach_run(run: SeedRun, finished: FinishedRun) -> None:
    run.record = finished.record
    run.run_dir = str(finished.run_dir) if finished.run_dir is not None else ""


def attach_records(spec: TableSpec, records: dict[str, dict[str, Any]],
                   folders: dict[str, FinishedRun] | None = None) -> list[dict[str, Any]]:
    """Give every seed of ``spec`` its run: the record of its config hash, or a finished run folder's when that one
    finished later (a retrained config replaces its record). Returns the records that are new or replace one in
    ``records`` (the caller writes them)."""
    replaced = []
    for row in spec.rows:
        for run in row.runs:
            folder = (folders or {}).get(run.config_hash)
            record = records.get(run.config_hash)
            if folder is not None and newer(folder.record, record):
                replaced.append(folder.record)
                records[run.config_hash] = folder.record
                attach_run(run, folder)
            elif record is not None:
                run.record = record
                if folder is not None and folder.record.get("finished_at") == record.get("finished_at"):
                    run.run_dir = str(folder.run_dir)
    return replaced


def shared_runs(specs: list[TableSpec]) -> dict[str, list[tuple[str, str]]]:
    """Config hash -> the (table, row label) pairs whose runs have that hash, for every run two or more tables
    share (composed specs)."""
    users: dict[str, list[tuple[str, str]]] = {}
    for spec in specs:
        for row in spec.rows:
            for run in row.runs:
                users.setdefault(run.config_hash, []).append((spec.name, row.label))
    return {h: pairs for h, pairs in users.items() if len({table for table, _ in pairs}) > 1}


def measure_costs(spec: TableSpec) -> None:
    """Fill ``cost.flops`` (per input pixel, papers' convention) and ``cost.params`` of each composed row's
    operator at ``spec.costs.node``, built for ``channels`` and ``scale_factor`` (from the seed-0 config: the seed
    does not change the operator)."""
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
    """Time every row's trained model together (``tasks.common.speed.measure_speeds``) on one image of the row's
    ``task.speed_image_size``: the model of the row's first seed whose run folder holds a checkpoint. Fill
    ``speed.fps`` and ``speed.ratio`` (to ``spec.speed.baseline``). Returns the device the speeds were measured on."""
    from tasks.common.distributed import init_world
    from tasks.common.engine import CHECKPOINT_NAME, load_weights
    from tasks.common.experiment import task_class
    from tasks.common.provenance import device_name
    from tasks.common.speed import measure_speeds

    settings = spec.speed or {}
    world = init_world("auto")
    calls = {}
    for row in spec.rows:
        timed = next((run for run in row.finished_runs()
                      if run.run_dir and (Path(run.run_dir) / CHECKPOINT_NAME).is_file()), None)
        if timed is None:
            row.measure_problem = ("no trained model to time (a result without its run folder)" if row.finished_runs()
                                   else _row_problem(row) or "not run")
            continue
        task = task_class(timed.config)(timed.config, world)
        model = load_weights(task.build_model(), Path(timed.run_dir) / CHECKPOINT_NAME).to(world.device).eval()
        image = task.inference_input(*timed.config.task.speed_image_size)
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


def _row_problem(row: Row) -> str:
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
        return row.measure_problem or _row_problem(row) or "not measured"
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
CODE_MARKS = {"current": "", "changed": "†", "uncommitted": "‡", "unknown": "?"}
CODE_MEANING = {
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


def _on_gpu(record: dict[str, Any]) -> bool:
    device = str(record.get("device", ""))
    return not device.endswith("threads)") and device not in ("", "cpu")


def mark_code(spec: TableSpec, against: str, cache: dict | None = None) -> None:
    """Set each finished seed's ``code`` against ``against`` (the commit the table is rendered at)."""
    against = against.removesuffix("+dirty")
    cache = {} if cache is None else cache
    for row in spec.rows:
        for run in row.runs:
            run.code = "" if run.record is None else code_status(
                str(run.record.get("commit", "unknown")), str(run.record.get("task", "")), _on_gpu(run.record),
                against, cache)


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
    for code in ("changed", "uncommitted", "unknown"):
        count = sum(run.code == code for run in finished)
        if count:
            marked.append(f"{count} of {len(finished)} runs {CODE_MARKS[code]} {CODE_MEANING[code]}")
    lines["runs' code"] = "; ".join(marked) if marked else \
        f"all {len(finished)} runs were trained at this render's result-affecting code"
    return lines


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


def _row_values(row: Row, column: Column) -> list[float]:
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
            mine, theirs = _row_values(row, column), _row_values(base, column)
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
                    "runs' code", "speed measured on")


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


def write_table(spec: TableSpec, provenance: dict[str, Any], out_dir: str | Path, figure: bool = True) -> list[Path]:
    """Write ``table-<name>.md``, ``table-<name>.json`` and, for a spec with ``plot``, ``figures/table-<name>.png``
    under ``out_dir``, each replaced atomically. Returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    if spec.plot is not None and figure:
        from tasks.common.figures import write_table_figure

        path = out_dir / figure_path(spec)
        write_table_figure(spec, provenance, path)
        written.append(path)
    md, js = out_dir / f"table-{spec.name}.md", out_dir / f"table-{spec.name}.json"
    write_text_atomic(md, render_markdown(spec, provenance))
    write_json_atomic(js, table_json(spec, provenance))
    return [md, js, *written]


# --- rendering again from the committed files: make check-results ---------------------------------------------------

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
    provenance = data.get("provenance") or {}
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


# --- results/SUMMARY.md -------------------------------------------------------------------------------------------

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


def write_summary(results_dir: str | Path) -> Path:
    results_dir = Path(results_dir)
    tables = [json.loads(path.read_text()) for path in committed_tables(results_dir)]
    path = results_dir / SUMMARY_NAME
    write_text_atomic(path, render_summary([t for t in tables if t.get("format") == TABLE_FORMAT]))
    return path
