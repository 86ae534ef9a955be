"""ICCV 2019 Figure 9 from finished inpainting runs: one row per validation image (with its fixed mask), columns
masked input, each run's composited output, original.

    python scripts/inpainting_figure.py runs/inpainting/<baseline hash> runs/inpainting/<carafe hash> \
        --labels "Global&Local" "w/ CARAFE" --count 6 --out results/figures/figure-9.png

Each run folder must hold ``config.yaml`` and ``checkpoint.pt``; the runs must share their validation data (dataset,
image size, mask kind and seed), so every column shows the same holes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from tasks.common.distributed import World
from tasks.common.engine import load_weights, prepared_datasets
from tasks.common.experiment import CONFIG_NAME, task_class
from tasks.inpainting.figures import comparison_grid, masked_input, write_png

SHARED_DATA_KEYS = ("root", "image_size", "val_mask_kind", "val_mask_seed")


def figure(run_dirs: list[Path], count: int, out: Path, device: str = "cpu") -> Path:
    """Write the grid of ``count`` validation images for the runs in ``run_dirs`` (in that column order) to ``out``."""
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
    return write_png(out, comparison_grid([masked_input(images, masks), *columns, images]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished inpainting run folders, one output column each")
    parser.add_argument("--labels", nargs="*", default=None, help="a label per run, for the caption printed")
    parser.add_argument("--count", type=int, default=6, help="validation images, one row each")
    parser.add_argument("--out", type=Path, default=Path("results/figures/figure-9.png"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.count < 1:
        sys.exit(f"--count must be >= 1, got {args.count}")
    if args.labels is not None and len(args.labels) != len(args.runs):
        sys.exit(f"--labels names {len(args.labels)} runs but {len(args.runs)} were given")
    path = figure(args.runs, args.count, args.out, args.device)
    labels = args.labels or [str(r) for r in args.runs]
    print(f"wrote {path}: columns masked input, {', '.join(labels)}, original")


if __name__ == "__main__":
    main()
