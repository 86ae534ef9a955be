"""What the qualitative figures share (ICCV 2019 Figure 8, segmentation: ``scripts/segmentation_figure.py``; Figure 9,
inpainting: ``scripts/inpainting_figure.py``): finding finished runs in a rendered table, loading them, checking that
they were validated on the same data, laying the cells out as a grid with white gaps, and writing the PNG with a
provenance caption (``<name>.md``) beside it.

Both scripts take the runs either from ``results/table-<name>.json`` (``--table``, ``--rows``, ``--seed``) or as run
folders, one column each, and the same ``--count``, ``--zoom``, ``--labels``, ``--out``, ``--device`` options
(``figure_parser``); ``figure_main`` is their ``main``.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from tasks.common.distributed import World
from tasks.common.engine import load_weights, prepared_datasets
from tasks.common.experiment import task_class
from tasks.common.io import write_bytes_atomic, write_text_atomic
from tasks.common.provenance import REPO_ROOT, git_commit, utc_now
from tasks.common.run_folder import CHECKPOINT_NAME, CONFIG_NAME, read_config, read_metrics
from tasks.common.task import Task

GAP = 2  # px of white between cells (before any zoom)


class FigureError(ValueError):
    """Runs that cannot make the figure asked for; the message says what to run first."""


#: Where ``scripts/reproduce.py`` trains runs by default (its ``--runs``); a table's run folders must lie below it.
RUNS_ROOT = REPO_ROOT / "runs"


def runs_of_table(table: str, rows: list[str], seed: int, results: Path = REPO_ROOT / "results",
                  runs_root: Path = RUNS_ROOT) -> list[Path]:
    """The run folders of ``rows`` (labels) at ``seed`` of the rendered ``results/table-<table>.json``: each seed's run
    is found by its config hash in the runs store, ``<runs_root>/<task>/<hash>`` (the table names runs by hash only,
    never by a path)."""
    path = results / f"table-{table}.json"
    if not path.is_file():
        raise FigureError(f"{path} does not exist; run `make reproduce-table-{table}` first")
    by_label = {row["label"]: row for row in json.loads(path.read_text())["rows"]}
    folders = []
    for label in rows:
        if label not in by_label:
            raise FigureError(f"table {table} has no row {label!r}; its rows: {', '.join(by_label)}")
        runs = {run["seed"]: run for run in by_label[label].get("seeds") or []}
        config_hash = str(runs.get(seed, {}).get("config_hash") or "")
        if not re.fullmatch(r"[0-9a-f]{12}", config_hash):
            raise FigureError(f"{path}: row {label!r} has no seed {seed} (seeds {sorted(runs)})")
        found = sorted(p for p in runs_root.glob(f"*/{config_hash}") if (p / CHECKPOINT_NAME).is_file())
        if not found:
            raise FigureError(f"no run folder of {label!r} seed {seed} (run {config_hash}) with its checkpoint under "
                              f"{runs_root}: the figure needs the trained model; run `make reproduce-table-{table}` "
                              "(it trains the runs whose folders this machine lacks only when their records are "
                              "missing: delete results/runs/<hash>.json or use --retrain-stale)")
        folders.append(found[0])
    return folders


def figure_parser(description: str, default_rows: Sequence[str], default_out: str) -> argparse.ArgumentParser:
    """The command line both figure scripts take: run folders or ``--table`` (with ``--rows``, ``--seed``), and
    ``--zoom``, ``--labels``, ``--count``, ``--out``, ``--device``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", type=Path, metavar="runs",
                        help="finished run folders, one output column each")
    parser.add_argument("--table", help="take the runs from results/table-<TABLE>.json (e.g. 7 or pp-10)")
    parser.add_argument("--rows", nargs="+", default=list(default_rows), help="with --table: the rows, one column each")
    parser.add_argument("--seed", type=int, default=0, help="with --table: which seed's runs")
    parser.add_argument("--runs", type=Path, default=RUNS_ROOT,
                        help="with --table: the folder the table's runs must lie under (reproduce.py's --runs)")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge each cell this many times (nearest neighbour)")
    parser.add_argument("--labels", nargs="*", default=None, help="a label per run, for the caption")
    parser.add_argument("--count", type=int, default=6, help="validation images, one row each")
    parser.add_argument("--out", type=Path, default=Path(default_out))
    parser.add_argument("--device", default="cpu")
    return parser


def runs_and_labels(args: argparse.Namespace) -> tuple[list[Path], list[str]]:
    """The run folders and their caption labels from ``figure_parser``'s arguments; exits with the reason when the
    arguments cannot make a figure."""
    if args.count < 1:
        sys.exit(f"--count must be >= 1, got {args.count}")
    if args.zoom < 1:
        sys.exit(f"--zoom must be >= 1, got {args.zoom}")
    if bool(args.table) == bool(args.folders):
        sys.exit("name the runs either as folders or with --table, not both and not neither")
    try:
        runs = runs_of_table(args.table, args.rows, args.seed, runs_root=args.runs) if args.table else args.folders
    except FigureError as error:
        sys.exit(f"error: {error}")
    labels = args.labels or (args.rows if args.table else [str(r) for r in runs])
    if len(labels) != len(runs):
        sys.exit(f"--labels names {len(labels)} runs but {len(runs)} were given")
    return runs, labels


def figure_main(description: str, default_rows: Sequence[str], default_out: str,
                figure: Callable[..., Path], columns: Callable[[list[str]], str]) -> None:
    """A figure script's ``main``: parse ``figure_parser``'s arguments, call ``figure(runs, count, out, device, zoom,
    labels)`` and print what it wrote (``columns(labels)`` names the columns); exits with the reason, without a
    traceback, when the runs cannot make the figure."""
    args = figure_parser(description, default_rows, default_out).parse_args()
    runs, labels = runs_and_labels(args)
    try:
        path = figure(runs, args.count, args.out, args.device, args.zoom, labels)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"wrote {path} and {path.with_suffix('.md')}: columns {columns(labels)}")


def load_finished_run(run_dir: Path, task_name: str, world: World) -> tuple[Any, Task, nn.Module]:
    """(config, task, model with the run's final weights in eval mode on ``world.device``) of a finished run folder;
    ``FileNotFoundError`` without ``config.yaml`` and ``checkpoint.pt``, ``ValueError`` for another task's run."""
    checkpoint = run_dir / CHECKPOINT_NAME
    cfg = read_config(run_dir)
    if cfg is None or not checkpoint.is_file():
        raise FileNotFoundError(f"{run_dir} holds no {CONFIG_NAME} and {CHECKPOINT_NAME}; name a finished run folder")
    if cfg.task.name != task_name:
        raise ValueError(f"{run_dir} is a {cfg.task.name} run, not a {task_name} one")
    task = task_class(cfg)(cfg, world)
    return cfg, task, load_weights(task.build_model(), checkpoint).to(world.device).eval()


def runs_on_the_same_data(run_dirs: Sequence[Path], task_name: str, keys: Sequence[str], consequence: str,
                          world: World) -> Iterator[tuple[Any, Task, nn.Module, Any]]:
    """(config, task, model, validation set) of each finished run of ``run_dirs`` in turn; the validation set is
    built once, from the first run, and every later run must have the same ``validation_data`` for ``keys``
    (``check_same_data`` raises ``ValueError`` with ``consequence`` otherwise)."""
    data, val_set = [], None
    for run_dir in run_dirs:
        cfg, task, model = load_finished_run(run_dir, task_name, world)
        data.append((run_dir, validation_data(cfg, keys)))
        check_same_data(data, consequence)
        if val_set is None:
            _, val_set = prepared_datasets(task, world)
        yield cfg, task, model, val_set


def validation_data(cfg: Any, keys: Sequence[str]) -> dict[str, Any]:
    """What decides a run's validation items: ``data.<key>`` for each of ``keys`` and, for the embedded default
    (``data.root`` null), its settings."""
    data = {key: OmegaConf.to_container(value) if OmegaConf.is_config(value := cfg.data.get(key)) else value
            for key in keys}
    if cfg.data.get("root") is None:
        data["embedded"] = OmegaConf.to_container(cfg.data.embedded)
    return data


def check_same_data(runs: Sequence[tuple[Path, dict[str, Any]]], consequence: str) -> None:
    """``ValueError`` naming the first run whose ``validation_data`` differs from the first run's, and
    ``consequence`` (what the figure would show wrong)."""
    (first, reference), *others = runs
    for run_dir, data in others:
        if data != reference:
            differ = {k: (data.get(k), reference.get(k)) for k in reference.keys() | data.keys()
                      if data.get(k) != reference.get(k)}
            raise ValueError(f"{run_dir} was validated on other data than {first} (key: (this run, first run): "
                             f"{differ}); {consequence}")


def image_grid(rows: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """Cells (uint8 [h, w, 3], any sizes) -> uint8 [H, W, 3] on white: cell j of row i at the top left of slot
    (i, j), a row as tall as its tallest cell, a column as wide as its widest, ``GAP`` px between slots."""
    if not rows or not rows[0]:
        raise ValueError("a grid needs at least one row of at least one cell")
    if any(len(row) != len(rows[0]) for row in rows):
        raise ValueError(f"every row must have {len(rows[0])} cells, got {[len(row) for row in rows]}")
    for row in rows:
        for cell in row:
            if cell.dtype != np.uint8 or cell.ndim != 3 or cell.shape[2] != 3:
                raise ValueError(f"a cell must be uint8 [h, w, 3], got {cell.dtype} {cell.shape}")
    heights = [max(cell.shape[0] for cell in row) for row in rows]
    widths = [max(row[j].shape[1] for row in rows) for j in range(len(rows[0]))]
    tops = np.cumsum([0, *heights]) + GAP * np.arange(len(heights) + 1)
    lefts = np.cumsum([0, *widths]) + GAP * np.arange(len(widths) + 1)
    grid = np.full((tops[-1] - GAP, lefts[-1] - GAP, 3), 255, np.uint8)
    for row, top in zip(rows, tops):
        for cell, left in zip(row, lefts):
            grid[top:top + cell.shape[0], left:left + cell.shape[1]] = cell
    return grid


def enlarge(grid: np.ndarray, zoom: int) -> np.ndarray:
    """``grid`` [H, W, 3] -> [zoom H, zoom W, 3], each pixel repeated (nearest neighbour, so pixels stay exact)."""
    if not isinstance(zoom, int) or zoom < 1:
        raise ValueError(f"zoom must be an integer >= 1, got {zoom!r}")
    return np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1) if zoom > 1 else grid


def write_png(path: str | Path, grid: np.ndarray) -> Path:
    """Write a uint8 [H, W, 3] grid as a PNG, atomically."""
    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format="PNG")
    write_bytes_atomic(Path(path), buffer.getvalue())
    return Path(path)


def provenance(out: Path, summary: str, labels: Sequence[str], run_dirs: Sequence[Path], script: str,
               details: Sequence[str] = (), tiny_note: str = "") -> str:
    """The caption written beside figure ``out``: ``summary`` (what the rows and columns are), a table of the runs
    (column label, folder, config hash, commit, scale, finish time from each ``metrics.json``), the paragraphs
    ``details``, the command (``script`` and this process's arguments) with the checkout's commit, and, when any run
    is at tiny scale, ``tiny_note`` (why these pictures are not the paper's)."""
    lines = [f"# {out.name}", "", summary, "", "| column | run | config hash | commit | scale | finished |",
             "|---|---|---|---|---|---|"]
    records = [read_metrics(r) or {} for r in run_dirs]
    for label, run_dir, record in zip(labels, run_dirs, records):
        shown = run_dir.relative_to(REPO_ROOT) if run_dir.absolute().is_relative_to(REPO_ROOT) else run_dir.name
        lines.append(f"| {label} | {shown} | {record.get('config_hash', '?')} | {record.get('commit', '?')[:12]} | "
                     f"{record.get('scale', '?')} | {record.get('finished_at', '?')} |")
    for paragraph in details:
        lines += ["", paragraph]
    command = " ".join([f"python {script}", *sys.argv[1:]])
    lines += ["", f"Written by `{command}` at commit {git_commit()} on {utc_now()}."]
    if tiny_note and any(record.get("scale") == "tiny" for record in records):
        lines += ["", f"Tiny scale: {tiny_note}"]
    return "\n".join(lines) + "\n"


def write_figure(out: Path, grid: np.ndarray, caption: str) -> Path:
    """``grid`` as the PNG ``out`` and ``caption`` as ``out`` with the suffix ``.md``, each written atomically."""
    write_png(out, grid)
    write_text_atomic(out.with_suffix(".md"), caption)
    return out
