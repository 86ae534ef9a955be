"""The detection grid of ICCV 2019 Figure 4 / CARAFE++ Figure 6 from finished detection runs: one row per
validation image, one column per run, each run's own detections drawn over the image (boxes with class and score,
masks for Mask R-CNN).

    make figure-4      # = python scripts/detection_figure.py --table 1 (after make reproduce-table-1)
    python scripts/detection_figure.py --table 1 --rows "Faster R-CNN" "Faster R-CNN w/ CARAFE" --seed 1
    python scripts/detection_figure.py runs/detection/<baseline> runs/detection/<carafe> --labels base CARAFE

``--table`` takes the run folders of the named rows (default: Table 1's Mask R-CNN without and with CARAFE) and
seed from the rendered ``results/table-<name>.json``. The runs must share their validation data, so every row shows
one image. Detections with score >= ``--threshold`` are drawn, at most ``--max-per-image`` of them (the most
confident on top); mask pixels are those with probability >= the run's ``task.mask_threshold``. Beside the PNG,
``<name>.md`` records the runs (config hash, commit), the images, how many detections each run drew on each, and
the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from tasks.common.provenance import git_commit, utc_now
from tasks.common.qualitative import RUNS_ROOT, FigureError, runs_of_table, write_figure
from tasks.detection.figures import (DetectionRun, draw_detections, fit_scale, grid, kept_detections, load_run,
                                     runs_table, to_pixels)

FIGURE_4_ROWS = ("Mask R-CNN", "Mask R-CNN w/ CARAFE")  # ICCV 2019 Table 1: the same detector without / with


@torch.no_grad()
def figure(run_dirs: list[Path], out: Path, count: int = 4, threshold: float = 0.5, max_per_image: int = 20,
           cell: int = 320, device: str = "cpu", labels: list[str] | None = None) -> Path:
    """Write the grid of the first ``count`` validation images (rows) by the runs in ``run_dirs`` (columns) to
    ``out`` (PNG), each image fitted into ``cell`` x ``cell`` px, and its provenance to ``out.with_suffix('.md')``."""
    if not run_dirs:
        raise FigureError("name at least one run")
    labels = labels or [Path(r).name for r in run_dirs]
    if len(labels) != len(run_dirs):
        raise FigureError(f"{len(labels)} labels for {len(run_dirs)} runs")
    runs = [load_run(run_dir, device) for run_dir in run_dirs]
    for run in runs[1:]:
        if run.data_settings != runs[0].data_settings:
            raise FigureError(f"{run.run_dir} was validated on other data than {runs[0].run_dir} "
                              f"({run.data_settings} != {runs[0].data_settings}); the rows would not match")
    val_set = runs[0].val_set
    images = [val_set[i][0] for i in range(min(count, len(val_set)))]
    rows, drawn = [], []
    for image in images:
        pixels, scale = to_pixels(image), fit_scale(*image.shape[-2:], cell)
        row, counts = [], []
        for run in runs:
            output = run.model([image.to(next(run.model.parameters()).device)])[0]
            row.append(draw_detections(pixels, output, run.category_names(), scale, threshold, max_per_image,
                                       float(run.cfg.task.mask_threshold)))
            counts.append(len(kept_detections(output, threshold, max_per_image)))
        rows.append(row)
        drawn.append(counts)
    files = [p.name for p in val_set.image_paths()[:len(images)]]
    write_figure(out, grid(rows, labels, cell), provenance(runs, labels, files, drawn, threshold, max_per_image, out))
    return out


def provenance(runs: list[DetectionRun], labels: list[str], files: list[str], drawn: list[list[int]],
               threshold: float, max_per_image: int, out: Path) -> str:
    masks = any(run.cfg.model.arch == "mask_rcnn" for run in runs)
    lines = [f"# {out.name}", "",
             f"Rows: the first {len(files)} validation images; columns: each run's own detections with score >= "
             f"{threshold} (at most {max_per_image} per image, the most confident drawn on top): boxes with class "
             f"and score{', masks tinted in the class colour' if masks else ''}.", "", *runs_table(labels, runs), "",
             "| image | " + " | ".join(f"{label}: detections drawn" for label in labels) + " |",
             "|---|" + "---|" * len(labels)]
    lines += [f"| {name} | " + " | ".join(str(c) for c in counts) + " |" for name, counts in zip(files, drawn)]
    lines += ["", f"Written by `python scripts/detection_figure.py {shlex.join(sys.argv[1:])}` at commit "
              f"{git_commit()} on {utc_now()}."]
    if any(run.record.get("scale") == "tiny" for run in runs):
        lines += ["", f"Tiny scale: detectors trained for minutes, {how_trained(runs)}, on the embedded synthetic "
                  "shapes, not the paper's COCO models; the grid shows what these runs detect, not what the paper's "
                  "do, and a few images say little about CARAFE (the tables' seeds say what the runs show)."]
    return "\n".join(lines) + "\n"


def how_trained(runs: list[DetectionRun]) -> str:
    """How the runs' backbones started, for a figure's tiny-scale note."""
    started = {bool(run.cfg.model.get("backbone_weights")) for run in runs}
    if started == {True}:
        return "fine-tuned from a backbone pretrained by this project's classification task on its embedded images"
    return "from scratch" if started == {False} else "some from scratch, some from a pretrained backbone"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="finished detection run folders, one column each")
    parser.add_argument("--table", help="take the runs from results/table-<TABLE>.json (e.g. 1 or 2)")
    parser.add_argument("--rows", nargs="+", default=list(FIGURE_4_ROWS), help="with --table: the rows, one column "
                        "each")
    parser.add_argument("--seed", type=int, default=0, help="with --table: which seed's runs")
    parser.add_argument("--runs", dest="runs_root", type=Path, default=RUNS_ROOT,
                        help="with --table: the folder the table's runs must lie under (reproduce.py's --runs)")
    parser.add_argument("--labels", nargs="*", default=None, help="a label per run, for the column headers")
    parser.add_argument("--count", type=int, default=4, help="validation images, one row each")
    parser.add_argument("--threshold", type=float, default=0.5, help="draw detections with at least this score")
    parser.add_argument("--max-per-image", type=int, default=20, help="draw at most this many per image")
    parser.add_argument("--cell", type=int, default=320, help="each image's longer side in pixels")
    parser.add_argument("--out", type=Path, default=Path("results/figures/figure-4.png"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.count < 1 or args.max_per_image < 1 or args.cell < 16 or not 0 <= args.threshold <= 1:
        sys.exit("--count and --max-per-image must be >= 1, --cell >= 16 and --threshold in [0, 1]")
    if bool(args.table) == bool(args.runs):
        sys.exit("name the runs either as folders or with --table, not both and not neither")
    try:
        runs = runs_of_table(args.table, args.rows, args.seed, runs_root=args.runs_root) if args.table else args.runs
        labels = args.labels or (args.rows if args.table else [r.name for r in runs])
        path = figure(runs, args.out, args.count, args.threshold, args.max_per_image, args.cell, args.device, labels)
    except FigureError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {path} and {path.with_suffix('.md')}: columns {', '.join(labels)}")

