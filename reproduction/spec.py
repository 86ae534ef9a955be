"""The table-spec format and row composition: a table is declared once in ``conf/table/<name>.yaml`` (its rows as
config overrides, its columns, the papers' numbers); each row and seed composes into the config
``scripts/train.py`` runs and its config hash.

A table spec::

    title: "..."                 # heading of the rendered table
    source: "..."                # the paper and table number the published figures come from
    overrides: [task=...]        # shared by every row
    columns: [{key: top1, header: top-1, metric: top1, decimals: 2}]  # metric: dotted path into "metrics"
    rows: [{label: ResNet-50, overrides: [model=resnet50], paper: {top1: 76.43}}]
    seeds: {tiny: 3, paper: 1}   # optional (default 1), or one number for every scale
    plot: {column: top1, x_title: "C_m", x_ticks: ["4", ...]}  # optional: results/figures/table-<name>.png
    notes: {tiny: "...", paper: "..."}                      # optional, printed under the table
    compare: {baseline: ResNet-50, headline: ResNet-50 w/ CARAFE++, column: top1}   # required, see below

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

Two kinds of columns are not read from a run's record but measured when the table is rendered, once per row (the seed
changes a model's weights, not its architecture)::

    speed: {baseline: Nearest, warmup: 3, iterations: 10}   # every row's trained model timed together
    columns: [{key: fps, metric: speed.fps, decimals: 1},   # images/s at the task's task.speed_image_size
              {key: fps_ratio, metric: speed.ratio, paper_ratio_of: fps}]   # / the baseline row's images/s
    costs: {node: fpn_upsampler, channels: 256, scale_factor: 2}   # the operator at that config node
    columns: [{key: flops, metric: cost.flops, format: si}, {key: params, metric: cost.params, format: si}]

``format: si`` prints as the papers print costs (``199k``, ``4.7M``); a paper figure may be such a string.
``paper_ratio_of: fps`` fills the paper's cell from its own figures: this row's fps / the baseline row's.

Every table names its baseline rows for what the seeds say (each paper table has the model without the operator, or
an ablation's default setting)::

    compare: {baseline: Nearest, headline: CARAFE, column: AP}   # every other row against Nearest
    compare: {baseline: {"w/ CARAFE": "baseline"}, headline: "w/ CARAFE"}   # or row -> its own baseline row

Each compared row gets Δ against its baseline with Welch's t and the 95 % interval of Δ over the seeds (in the table
and, for the headline row, in ``results/SUMMARY.md``).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.classification.backbones import (BACKBONE_KEY, backbone_name, missing_backbones, pretraining_overrides,
                                    takes_backbone_weights, tiny_fine_tuning)
from tasks.common.experiment import CONF_DIR, compose, config_hash, validate
from tasks.common.provenance import REPO_ROOT
from tasks.common.resnet import backbone_weights_pending

TABLE_DIR = CONF_DIR / "table"

NOTES_DIR = TABLE_DIR / "notes"

COLUMN_GROUPS_DIR = TABLE_DIR / "columns"

SEED_KEY = "run.seed"
#: The tasks whose tiny rows start from a backbone pretrained by the classification task (the papers' protocol in
#: miniature: tasks/classification/backbones.py, docs/detection-tiny.md).
TINY_PRETRAINED_TASKS = ("detection",)


class TableSpecError(ValueError):
    pass


_COMPOSED: OrderedDict[tuple, DictConfig] = OrderedDict()
_COMPOSED_MAX = 512


def _conf_fingerprint() -> tuple:
    """Every file under conf/ with its modification time and size: a composed config is reused only while none of
    the files it may have read has changed."""
    return tuple(sorted((str(path.relative_to(CONF_DIR)), stat.st_mtime_ns, stat.st_size)
                        for path in CONF_DIR.rglob("*") if path.is_file() for stat in [path.stat()]))


def compose_once(overrides: list[str]) -> DictConfig:
    """``tasks.common.experiment.compose``, remembered for this process: tables share rows, and listing, checking
    or testing every table composes the same overrides again (Hydra takes about 0.2 s per config, a copy about 3 ms).
    Each call returns its own copy, so a caller may change it."""
    key = (tuple(overrides), _conf_fingerprint())
    if key not in _COMPOSED:
        _COMPOSED[key] = compose(list(overrides))
        while len(_COMPOSED) > _COMPOSED_MAX:
            _COMPOSED.popitem(last=False)
    _COMPOSED.move_to_end(key)
    return copy.deepcopy(_COMPOSED[key])


_FINE_TUNING: dict[tuple, list[str]] = {}


def _named_fine_tuning(plain: DictConfig, runs: Path) -> list[str]:
    """``tiny_fine_tuning(plain, runs, train=False)``, remembered for this process: it depends on ``plain`` only
    through its backbone's pretraining overrides (one Hydra composition for each row otherwise)."""
    key = (tuple(pretraining_overrides(plain)), str(Path(runs).absolute()), _conf_fingerprint())
    if key not in _FINE_TUNING:
        _FINE_TUNING[key] = tiny_fine_tuning(plain, runs, train=False)
    return list(_FINE_TUNING[key])

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

def with_seed(seed_0: DictConfig, seed: int) -> DictConfig:
    """Seed ``seed`` of a row from its seed 0's config: what Hydra composes for the same overrides followed by
    ``run.seed=<seed>``, because Hydra applies value overrides in order after the defaults are merged and the seed's
    is the last one (the tests compare the two). Saves one composition per seed."""
    cfg = copy.deepcopy(seed_0)
    OmegaConf.update(cfg, SEED_KEY, seed)
    return cfg


def compose_rows(spec: TableSpec, scale: str, extra: list[str] = (), seeds: int | None = None,
                 backbones: Path | None = None, runs: Path = REPO_ROOT / "runs",
                 pretrain: Callable[[list[str], Path], int] | None = None) -> None:
    """Compose and validate every row and seed (so a bad row fails before any training) and fill in their config
    hashes. ``seeds`` (default: the spec's for ``scale``) seeds per row: 0 .. seeds-1. With ``backbones`` (a
    folder), every row that takes backbone weights gets ``model.backbone_weights=<backbones>/<name>.pt`` for the
    backbone it has (``tasks.classification.backbones``); a missing file fails here, naming the run that makes it. Without
    it, a tiny detection row fine-tunes the backbone its classification pretraining run trained
    (``backbones.tiny_fine_tuning``, in ``runs``): ``pretrain(command, cwd) -> exit status`` trains a missing one
    first; with ``pretrain=None`` (listing, rendering) the rows name its checkpoint whether or not it exists yet."""
    seeds = spec.seeds_at(scale) if seeds is None else seeds
    if seeds < 1:
        raise TableSpecError(f"table {spec.name}: seeds={seeds}; give a whole number >= 1")
    fixed_seed = [o for o in extra if o.lstrip("+").startswith(f"{SEED_KEY}=")]
    if seeds > 1 and fixed_seed:
        raise TableSpecError(f"table {spec.name}: {fixed_seed[0]} fixes the seed of every run, but the table runs "
                             f"{seeds} seeds (run.seed=0..{seeds - 1}); drop the override or ask for 1 seed")
    needed: dict[Path, DictConfig] = {}
    plain_of: dict[int, DictConfig] = {}   # a row's overrides composed before any backbone was added (its seed 0)
    chosen = any(o.lstrip("+").startswith((f"{BACKBONE_KEY}=", "model.norm=")) for o in extra)
    for index, row in enumerate(spec.rows):
        if backbones is not None:
            plain = plain_of[index] = compose_once(row_overrides(spec, row, scale, extra))
            if takes_backbone_weights(plain):
                path = Path(backbones).absolute() / f"{backbone_name(plain)}.pt"
                needed[path] = plain
                row.backbone = [f"{BACKBONE_KEY}={path}"]
        elif scale == "tiny" and not chosen:
            plain = plain_of[index] = compose_once(row_overrides(spec, row, scale, extra))
            if plain.task.name in TINY_PRETRAINED_TASKS:
                row.backbone = (_named_fine_tuning(plain, runs) if pretrain is None else
                                tiny_fine_tuning(plain, runs, runner=pretrain))
    missing = missing_backbones(needed)
    if missing:
        raise TableSpecError(f"table {spec.name}: backbone weights missing from {backbones}:\n{missing}")
    for index, row in enumerate(spec.rows):
        row.runs = [SeedRun(seed) for seed in range(seeds)]
        for run in row.runs:
            overrides = row_overrides(spec, row, scale, extra, run)
            try:
                if run.seed == 0:  # a row that got no backbone overrides: exactly the config composed above
                    reuse = not row.backbone and index in plain_of
                    run.config = plain_of[index] if reuse else compose_once(overrides)
                else:
                    run.config = with_seed(row.runs[0].config, run.seed)
                with backbone_weights_pending() if pretrain is None else contextlib.nullcontext():
                    validate(run.config)
            except Exception as error:
                raise TableSpecError(f"table {spec.name}, row {row.label!r} ({' '.join(overrides)}): "
                                     f"{error}") from error
            run.config_hash = config_hash(run.config)


def shared_runs(specs: list[TableSpec]) -> dict[str, list[tuple[str, str]]]:
    """Config hash -> the (table, row label) pairs whose runs have that hash, for every run two or more tables
    share (composed specs)."""
    users: dict[str, list[tuple[str, str]]] = {}
    for spec in specs:
        for row in spec.rows:
            for run in row.runs:
                users.setdefault(run.config_hash, []).append((spec.name, row.label))
    return {h: pairs for h, pairs in users.items() if len({table for table, _ in pairs}) > 1}
