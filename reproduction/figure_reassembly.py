"""ICCV 2019 Figure 5 from a finished detection run with CARAFE in its FPN: "Red units are reassembled into the green
center unit by CARAFE in the top-down pathway of a FPN structure."

    make figure-5      # = python scripts/figure5.py --table 1 (after make reproduce-table-1)
    python scripts/figure5.py --table 1 --row "Faster R-CNN w/ CARAFE" --seed 1
    python scripts/figure5.py runs/detection/<hash> --image 3 --points 120,80 200,150

One row per chosen point (a unit on P2), one column per level: the image with the P2 unit in green, then P3, P4,
P5 with, in red, the units whose features the P2 unit is reassembled from: a unit's opacity is its effective
weight (products of the reassembly kernels along every top-down path to it, summed over paths;
``tasks.detection.figures.reassembly_sources``) relative to the level's largest. The points default to the centres
and left edges of the largest annotated objects of the chosen validation image (``--points x,y ...`` in the image's
pixels instead). A run whose FPN has no CARAFE is refused. Beside the PNG, ``<name>.md`` records the run (config
hash, commit), the image, the points and the largest weights per level, and the command.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from reproduction.figure_detections import how_trained
from tasks.common.provenance import git_commit, utc_now
from tasks.common.qualitative import RUNS_ROOT, FigureError, runs_of_table, write_figure
from tasks.detection.figures import (DetectionRun, ReassemblySources, default_points, draw_reassembly,
                                     first_annotated, fpn_carafes, grid, load_run, reassembly_sources,
                                     runs_table, to_pixels, top_units)

FIGURE_5_ROW = "Mask R-CNN w/ CARAFE"  # ICCV 2019 Table 1; Table 2's "CARAFE" row is another with CARAFE in the FPN
DEFAULT_LEVELS = ("p3", "p4", "p5")


def figure(run_dir: Path, out: Path, image: int | None = None, points: list[tuple[float, float]] | None = None,
           count: int = 4, levels: tuple[str, ...] = DEFAULT_LEVELS, cell: int = 256, device: str = "cpu",
           label: str | None = None) -> Path:
    """Write Figure 5 for the run in ``run_dir`` to ``out`` (PNG) and its provenance to ``out.with_suffix('.md')``.

    ``image``: validation image index (default: the first with an annotated object); ``points``: (x, y) in that
    image's pixels (default: ``count`` points on its largest objects); ``levels``: the coarser levels to draw;
    ``cell``: each panel's longer side in pixels."""
    run = load_run(run_dir, device)
    fpn_carafes(run.model, str(run_dir))  # refuse a run without CARAFE before any work
    index = first_annotated(run.val_set) if image is None else image
    if not 0 <= index < len(run.val_set):
        raise FigureError(f"--image {index} is not a validation image index (0..{len(run.val_set) - 1})")
    picture, _ = run.val_set[index]
    chosen = points or default_points(run.val_set, index, count)
    sources = reassembly_sources(run.model, picture, chosen, str(run_dir))
    unknown = [level for level in levels if level not in sources.weights]
    if unknown:
        raise FigureError(f"level(s) {unknown} are not reassembled into P2 in this FPN; choose among "
                          f"{', '.join(sources.weights)}")
    pixels = to_pixels(picture)
    rows = [[draw_reassembly(pixels, sources, p, None, cell),
             *(draw_reassembly(pixels, sources, p, level, cell) for level in levels)] for p in range(len(chosen))]
    headers = [f"P2 (stride {sources.strides['p2']})",
               *(f"{level.upper()} (stride {sources.strides[level]})" for level in levels)]
    file_name = run.val_set.image_paths()[index].name
    write_figure(out, grid(rows, headers, cell), provenance(run, label or str(run_dir), file_name, index, chosen,
                                                         points is None, sources, levels, out))
    return out


def provenance(run: DetectionRun, label: str, file_name: str, index: int, points: list[tuple[float, float]],
               defaulted: bool, sources: ReassemblySources, levels: tuple[str, ...], out: Path) -> str:
    how = ("centres and left mask edges of its largest annotated objects" if defaulted else "given with --points")
    lines = [f"# {out.name}", "",
             "ICCV 2019 Figure 5: red units are reassembled into the green centre unit by CARAFE in the top-down "
             "pathway of the FPN. Rows: chosen units on P2; columns: the P2 unit, then the units of "
             f"{', '.join(level.upper() for level in levels)} it is reassembled from. Opacity: a unit's effective "
             "weight (the products of the reassembly kernels along every top-down path to it, summed over paths, "
             "averaged over kernel groups) relative to the level's largest; units under 1% of it are not drawn. "
             "Only the reassembled part of a P2 unit is traced: the lateral (1x1 conv) terms the top-down path adds "
             "at every level, and the 3x3 output convs, are not drawn.", "", *runs_table([label], [run]), "",
             f"Image: validation image {index}, {file_name}. Points (x, y in image pixels; {how}):", "",
             "| point | x, y | P2 unit (row, col) | " + " | ".join(f"largest {level.upper()} weights (row, col: w)"
                                                          for level in levels) + " |",
             "|---|---|---|" + "---|" * len(levels)]
    for p, ((x, y), unit) in enumerate(zip(points, sources.units)):
        tops = [", ".join(f"({r}, {c}): {w:.3f}" for r, c, w in top_units(sources.weights[level][p]))
                for level in levels]
        lines.append(f"| {p} | {x:.1f}, {y:.1f} | {unit} | " + " | ".join(tops) + " |")
    k = run.model.backbone.fpn.upsamplers[0].up_kernel
    lines += ["", f"For comparison, a uniform {k} x {k} kernel (where the papers' near-zero encoder initialisation "
              f"starts) gives each of the {k * k} P3 units of an interior P2 unit the weight {1 / k ** 2:.3f}."]
    lines += ["", f"Written by `python scripts/figure5.py {shlex.join(sys.argv[1:])}` at commit {git_commit()} on "
              f"{utc_now()}."]
    if run.record.get("scale") == "tiny":
        lines += ["", f"Tiny scale: these are the kernels of a detector trained for minutes, {how_trained([run])}, "
                  "on the embedded synthetic shapes (small images, few iterations), not the paper's COCO model. The "
                  "figure shows how this run's CARAFE reassembles; it cannot show whether trained kernels gather "
                  "semantically related units as the paper's do, and kernels close to uniform (the papers' "
                  f"near-zero encoder initialisation) would look like a plain {k} x {k} blur at every level."]
    return "\n".join(lines) + "\n"


def parse_point(text: str) -> tuple[float, float]:
    try:
        x, y = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"a point is x,y in image pixels (e.g. 120,80), got {text!r}") from None
    return x, y


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", type=Path, help="a finished detection run folder with CARAFE in its FPN")
    parser.add_argument("--table", help="take the run from results/table-<TABLE>.json (e.g. 1 or 2)")
    parser.add_argument("--row", default=FIGURE_5_ROW, help="with --table: the row (default %(default)r)")
    parser.add_argument("--seed", type=int, default=0, help="with --table: which seed's run")
    parser.add_argument("--runs", dest="runs_root", type=Path, default=RUNS_ROOT,
                        help="with --table: the folder the table's runs must lie under (reproduce.py's --runs)")
    parser.add_argument("--image", type=int, default=None, help="validation image index (default: the first "
                        "with an annotated object)")
    parser.add_argument("--points", nargs="+", type=parse_point, default=None, help="x,y points in image pixels")
    parser.add_argument("--count", type=int, default=4, help="without --points: how many points to pick")
    parser.add_argument("--levels", nargs="+", default=list(DEFAULT_LEVELS), help="coarser levels to draw")
    parser.add_argument("--cell", type=int, default=256, help="each panel's longer side in pixels")
    parser.add_argument("--out", type=Path, default=Path("results/figures/figure-5.png"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.count < 1 or args.cell < 16:
        sys.exit(f"--count must be >= 1 and --cell >= 16, got {args.count} and {args.cell}")
    if bool(args.table) == bool(args.run):
        sys.exit("name the run either as a folder or with --table, not both and not neither")
    try:
        run = runs_of_table(args.table, [args.row], args.seed, runs_root=args.runs_root)[0] if args.table else args.run
        path = figure(run, args.out, args.image, args.points, args.count, tuple(args.levels), args.cell,
                      args.device, args.row if args.table else None)
    except FigureError as error:
        sys.exit(f"error: {error}")
    print(f"wrote {path} and {path.with_suffix('.md')}")

