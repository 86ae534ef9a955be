"""ICCV 2019 Figure 9 from finished inpainting runs: one row per validation image (with its fixed mask), columns
masked input, each run's composited output, original.

    make figure-9      # = python scripts/inpainting_figure.py --table 7 (after make reproduce-table-7)
    python scripts/inpainting_figure.py --table 7 --rows "Partial Conv" "Partial Conv w/ CARAFE" --seed 1
    python scripts/inpainting_figure.py runs/inpainting/<baseline hash> runs/inpainting/<carafe hash> \
        --labels "Global&Local" "w/ CARAFE" --count 6 --out results/figures/figure-9.png

``--table`` takes the run folders of the named rows (default: the paper's pair, Global&Local and Global&Local w/
CARAFE) and seed from the rendered ``results/table-<name>.json``. Each run folder must hold ``config.yaml`` and
``checkpoint.pt``; the runs must share their validation data (dataset, image size, mask kind and seed), so every
column shows the same holes. Beside the PNG, ``<name>.md`` records what it shows: the runs (row, seed, config hash,
commit), the validation images and masks, and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import torch
from omegaconf import OmegaConf

from tasks.common.distributed import World
from tasks.common.engine import load_weights, prepared_datasets
from tasks.common.experiment import CONFIG_NAME, METRICS_NAME, task_class
from tasks.common.io import write_text_atomic
from tasks.common.provenance import REPO_ROOT, git_commit, utc_now
from tasks.inpainting.figures import comparison_grid, masked_input, write_png

SHARED_DATA_KEYS = ("root", "image_size", "val_mask_kind", "val_mask_seed")
FIGURE_9_ROWS = ("Global&Local", "Global&Local w/ CARAFE")  # ICCV 2019 Figure 9's columns


class FigureError(ValueError):
    """Runs that cannot make the figure asked for; the message says what to run first."""


def runs_of_table(table: str, rows: list[str], seed: int, results: Path = REPO_ROOT / "results") -> list[Path]:
    """The run folders of ``rows`` (labels) at ``seed`` as the rendered ``results/table-<table>.json`` records them."""
    path = results / f"table-{table}.json"
    if not path.is_file():
        raise FigureError(f"{path} does not exist; run `make reproduce-table-{table}` first")
    by_label = {row["label"]: row for row in json.loads(path.read_text())["rows"]}
    folders = []
    for label in rows:
        if label not in by_label:
            raise FigureError(f"table {table} has no row {label!r}; its rows: {', '.join(by_label)}")
        runs = {run["seed"]: run for run in by_label[label].get("seeds") or []}
        run_dir = runs.get(seed, {}).get("run_dir")
        if not run_dir or run_dir.startswith("<"):
            raise FigureError(f"{path} holds no run folder in this repository for {label!r} at seed {seed} (seeds "
                              f"{sorted(runs)}); the figure needs its checkpoint: run `make reproduce-table-{table}`")
        folders.append(REPO_ROOT / run_dir)
    return folders


def figure(run_dirs: list[Path], count: int, out: Path, device: str = "cpu", zoom: int = 1,
           labels: list[str] | None = None) -> Path:
    """Write the grid of ``count`` validation images for the runs in ``run_dirs`` (in that column order) to ``out``,
    each cell enlarged ``zoom`` times (nearest neighbour, so pixels stay exact), and its provenance beside it."""
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    columns, reference, images, masks = [], None, None, None
    for run_dir in run_dirs:
        config, checkpoint = run_dir / CONFIG_NAME, run_dir / "checkpoint.pt"
        if not config.is_file() or not checkpoint.is_file():
            raise FileNotFoundError(f"{run_dir} holds no {CONFIG_NAME} and checkpoint.pt; name a finished run folder")
        cfg = OmegaConf.load(config)
        if cfg.task.name != "inpainting":
            raise ValueError(f"{run_dir} is a {cfg.task.name} run, not an inpainting one")
        data = {key: cfg.data.get(key) for key in SHARED_DATA_KEYS} | {"embedded": cfg.data.embedded}
        task = task_class(cfg)(cfg, world)
        if reference is None:
            reference = data
            _, val_set = prepared_datasets(task, world)
            items = [val_set[i] for i in range(min(count, len(val_set)))]
            images, masks = (torch.stack(t).to(world.device) for t in zip(*items))
        elif data != reference:
            raise ValueError(f"{run_dir} was validated on other data than {run_dirs[0]} ({data} != {reference}); "
                             "the columns would show different holes")
        model = load_weights(task.build_model(), checkpoint).to(world.device).eval()
        with torch.no_grad():
            columns.append(model(images, masks))
    grid = comparison_grid([masked_input(images, masks), *columns, images])
    if zoom > 1:
        grid = np.repeat(np.repeat(grid, zoom, axis=0), zoom, axis=1)
    write_png(out, grid)
    write_text_atomic(out.with_suffix(".md"), provenance(run_dirs, labels or [r.name for r in run_dirs], val_set,
                                                         len(images), reference, out))
    return out


def provenance(run_dirs: list[Path], labels: list[str], val_set: object, count: int, data: dict, out: Path) -> str:
    lines = [f"# {out.name}", "", "Rows: the first {} validation images with their fixed masks ({} masks, seed {}); "
             "columns: masked input (holes white), {}, original.".format(count, data["val_mask_kind"],
                                                                         data["val_mask_seed"], ", ".join(labels)),
             "", "| column | run | config hash | commit | scale | finished |", "|---|---|---|---|---|---|"]
    for label, run_dir in zip(labels, run_dirs):
        record = json.loads((run_dir / METRICS_NAME).read_text()) if (run_dir / METRICS_NAME).is_file() else {}
        shown = run_dir.relative_to(REPO_ROOT) if run_dir.absolute().is_relative_to(REPO_ROOT) else run_dir.name
        lines.append(f"| {label} | {shown} | {record.get('config_hash', '?')} | {record.get('commit', '?')[:12]} | "
                     f"{record.get('scale', '?')} | {record.get('finished_at', '?')} |")
    images = [Path(p).name for p in val_set.image_paths()[:count]]
    lines += ["", f"Validation images: {', '.join(images)}.", "",
              f"Written by `python scripts/inpainting_figure.py {' '.join(sys.argv[1:])}` at commit {git_commit()} "
              f"on {utc_now()}."]
    if any(json.loads((r / METRICS_NAME).read_text()).get("scale") == "tiny" for r in run_dirs
           if (r / METRICS_NAME).is_file()):
        lines += ["", "Tiny scale: small generators trained for minutes on 64 px crops of the embedded default, not "
                  "the paper's Places models; the figure shows what these runs do, not what the paper's show."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished inpainting run folders, one output column each")
    parser.add_argument("--table", help="take the runs from results/table-<TABLE>.json (e.g. 7 or pp-10)")
    parser.add_argument("--rows", nargs="+", default=list(FIGURE_9_ROWS), help="with --table: the rows, one column each")
    parser.add_argument("--seed", type=int, default=0, help="with --table: which seed's runs")
    parser.add_argument("--zoom", type=int, default=1, help="enlarge each cell this many times (nearest neighbour)")
    parser.add_argument("--labels", nargs="*", default=None, help="a label per run, for the caption")
    parser.add_argument("--count", type=int, default=6, help="validation images, one row each")
    parser.add_argument("--out", type=Path, default=Path("results/figures/figure-9.png"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.count < 1:
        sys.exit(f"--count must be >= 1, got {args.count}")
    if args.zoom < 1:
        sys.exit(f"--zoom must be >= 1, got {args.zoom}")
    if bool(args.table) == bool(args.runs):
        sys.exit("name the runs either as folders or with --table, not both and not neither")
    try:
        runs = runs_of_table(args.table, args.rows, args.seed) if args.table else args.runs
    except FigureError as error:
        sys.exit(f"error: {error}")
    labels = args.labels or (args.rows if args.table else [str(r) for r in runs])
    if len(labels) != len(runs):
        sys.exit(f"--labels names {len(labels)} runs but {len(runs)} were given")
    path = figure(runs, args.count, args.out, args.device, args.zoom, labels)
    print(f"wrote {path} and {path.with_suffix('.md')}: columns masked input, {', '.join(labels)}, original")


if __name__ == "__main__":
    main()
