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

Finished results are found by config hash in run folders (a runs store, Hydra sweep folders) and in rendered table
JSON files (``results/table-<name>.json``: their measured cells, mapped back to metrics, for rows whose hash matches).
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from carafe.costs import paper_round
from tasks.common.backbones import BACKBONE_KEY, backbone_name, missing_backbones, takes_backbone_weights
from tasks.common.experiment import CONF_DIR, METRICS_NAME, compose, config_hash, read_record, validate
from tasks.common.io import write_json_atomic, write_text_atomic
from tasks.common.provenance import REPO_ROOT

TABLE_DIR = CONF_DIR / "table"
NOTES_DIR = TABLE_DIR / "notes"
COLUMN_GROUPS_DIR = TABLE_DIR / "columns"
FIGURES_DIR_NAME = "figures"
SEED_KEY = "run.seed"
STD_NAME = "sample standard deviation (ddof=1)"


class TableSpecError(ValueError):
    pass


MEASURED_AT_RENDER = ("speed.", "cost.")  # column metrics measured by the renderer, not read from a run
RUN_INFO_KEYS = ("wall_seconds", "train_seconds", "device", "world_size", "commit", "finished_at", "dataset", "scale")


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
    run_dir: str = ""
    source: str = ""            # where a result not read from a run folder came from (a table JSON and its commit)
    problem: str = ""           # why the seed has no measured numbers

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
    spec = TableSpec(name, raw["title"], raw.get("source", ""), list(raw.get("overrides") or []), columns, rows,
                     dict(raw.get("notes") or {}), raw.get("speed"), raw.get("costs"),
                     _seeds_setting(raw.get("seeds", 1), where), plot)
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
    """A finished run found by ``index_runs``: its record (``metrics.json``'s content) and where it came from."""
    record: dict[str, Any]
    run_dir: Path | None = None   # None for a result taken from a table JSON (no folder, no checkpoint)
    source: str = ""              # for a table JSON: the file and its commit


def shown_path(path: str | Path) -> str:
    """A path as the rendered files may show it: relative to the repository, or only its last part when it lies
    outside (results/ never names a file outside the repository)."""
    path = Path(path).absolute()
    if path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return f"<outside the repository>/{path.name}"


def file_commit(path: Path) -> str:
    """The last commit that changed ``path``, ``+modified`` when the file differs from it; ``not committed``."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=path.parent, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("log", "-1", "--format=%H", "--", path.name)
        modified = git("status", "--porcelain", "--", path.name)
    except (OSError, subprocess.CalledProcessError):
        return "not committed"
    if not commit:
        return "not committed"
    return commit + ("+modified" if modified else "")


def _nested(dotted: str, value: float) -> dict[str, Any]:
    node: dict[str, Any] = {}
    head, *rest = dotted.split(".")
    node[head] = _nested(".".join(rest), value) if rest else value
    return node


def _merge(into: dict[str, Any], other: dict[str, Any]) -> None:
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def runs_from_table_json(path: str | Path) -> dict[str, FinishedRun]:
    """The finished runs a rendered ``table-<name>.json`` holds, by config hash: each seed's measured cells mapped
    back to metrics through the file's own columns (speed and cost columns are left out: they are measured when a
    table is rendered, not by a run)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        columns = {c["key"]: c["metric"] for c in data["columns"]}
        rows = data["rows"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise TableSpecError(f"{path} is not a rendered table JSON (table-<name>.json): {error}") from error
    source = f"{shown_path(path)} at commit {file_commit(path)}"
    found: dict[str, FinishedRun] = {}
    for row in rows:
        for seed in row.get("seeds") or [row]:  # a single-seed file written before seeds keeps its runs in the row
            measured = seed.get("measured")
            if not seed.get("config_hash") or seed.get("run") is None or not measured:
                continue
            metrics: dict[str, Any] = {}
            for key, value in measured.items():
                metric = columns.get(key)
                if metric is not None and not metric.startswith(MEASURED_AT_RENDER) and value is not None:
                    _merge(metrics, _nested(metric, float(value)))
            record = {**seed["run"], "status": "finished", "config_hash": seed["config_hash"], "metrics": metrics}
            found[seed["config_hash"]] = FinishedRun(record, None, source)
    return found


def index_runs(*sources: str | Path) -> dict[str, FinishedRun]:
    """Finished runs found under ``sources``, by config hash: folders (run folders, a runs store, Hydra sweep
    folders) and rendered table JSON files. Of several runs of one config in folders the most recently finished
    wins; a table JSON only fills hashes that no run folder has (a folder also holds the trained model)."""
    found: dict[str, FinishedRun] = {}
    from_tables: dict[str, FinishedRun] = {}
    for source in sources:
        source = Path(source)
        if source.is_file():
            from_tables.update(runs_from_table_json(source))
            continue
        if not source.exists():
            continue
        for path in sorted(source.rglob(METRICS_NAME)):
            try:
                record = read_record(path.parent)
            except (OSError, json.JSONDecodeError):
                continue
            if record is None or "config_hash" not in record:
                continue
            previous = found.get(record["config_hash"])
            if previous is None or record.get("finished_at", "") >= previous.record.get("finished_at", ""):
                found[record["config_hash"]] = FinishedRun(record, path.parent)
    return {**from_tables, **found}


def attach_run(run: SeedRun, finished: FinishedRun) -> None:
    run.record, run.source = finished.record, finished.source
    run.run_dir = str(finished.run_dir) if finished.run_dir is not None else ""


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


def _run_line(run: SeedRun) -> str:
    text = f"run `{run.config_hash}`"
    if run.source:
        text += f" (from {run.source})"
    if run.record is not None:
        text += (f"; {run.record.get('wall_seconds', '?')} s on {run.record.get('device', '?')}"
                 f" x{run.record.get('world_size', 1)}, commit {str(run.record.get('commit', '?'))[:12]}")
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


def render_markdown(spec: TableSpec, provenance: dict[str, Any]) -> str:
    """The table with, for every column, the paper's figure and the measured one side by side."""
    seeds = spec.seed_count
    lines = [f"# {spec.title}", "",
             "Generated by `scripts/reproduce.py`; do not edit by hand. Paper: the published figure "
             f"({spec.source}). Ours: measured by the run named in the last column"
             + (f" and its seeds (mean ± {STD_NAME}, n = {seeds})." if seeds > 1 else "."), "",
             "| provenance | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in provenance.items()]
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
        cells.append(f"`{row.config_hash}`" if row.config_hash else "–")
        lines.append("| " + " | ".join(cells) + " |")
    if spec.plot is not None:
        lines += ["", f"![{spec.title}]({figure_path(spec)})", "", f"Figure: {figure_caption(spec, provenance)}"]
    note = spec.notes.get(provenance.get("scale", ""))
    if note:
        lines += ["", note.strip()]
    lines += ["", seed_statement(spec)]
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


def table_json(spec: TableSpec, provenance: dict[str, Any]) -> dict[str, Any]:
    """The rendered table as data: per row the paper's figures, the measured mean (``measured``), ``std`` and ``n``
    per column, and every seed's run and values (``seeds``)."""
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
                  "run_dir": shown_path(run.run_dir) if run.run_dir else None, "source": run.source or None,
                  "problem": None if run.record is not None else (run.problem or None),
                  "measured": None if run.record is None else {
                      c.key: metric_value(run.record, c.metric) for c in spec.columns if not c.measured_at_render},
                  "run": None if run.record is None else {k: run.record.get(k) for k in RUN_INFO_KEYS}}
                 for run in row.runs]
        rows.append({"label": row.label, "overrides": row.overrides, "config_hash": row.config_hash,
                     "paper": paper, "measured": measured, "std": std, "n": count, "seeds": seeds,
                     "measure_problem": row.measure_problem or None})
    return {"table": spec.name, "title": spec.title, "source": spec.source, "provenance": provenance,
            "seeds": spec.seed_count, "std": STD_NAME, "columns": [c.__dict__ for c in spec.columns],
            "shared_overrides": spec.overrides, "speed": spec.speed, "costs": spec.costs, "rows": rows}


def write_table(spec: TableSpec, provenance: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``table-<name>.md``, ``table-<name>.json`` and, for a spec with ``plot``, ``figures/table-<name>.png``
    under ``out_dir``, each replaced atomically. Returns the paths written."""
    out_dir = Path(out_dir)
    written = []
    if spec.plot is not None:
        from tasks.common.figures import write_table_figure

        figure = out_dir / figure_path(spec)
        write_table_figure(spec, provenance, figure)
        written.append(figure)
    md, js = out_dir / f"table-{spec.name}.md", out_dir / f"table-{spec.name}.json"
    write_text_atomic(md, render_markdown(spec, provenance))
    write_json_atomic(js, table_json(spec, provenance))
    return [md, js, *written]
