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

from pathlib import Path

import torch

from tasks.common.distributed import World
from tasks.common.qualitative import (enlarge, figure_main, provenance, runs_on_the_same_data, validation_data,
                                      write_figure)
from tasks.inpainting.figures import comparison_grid, masked_input

SHARED_DATA_KEYS = ("root", "image_size", "val_mask_kind", "val_mask_seed")
FIGURE_9_ROWS = ("Global&Local", "Global&Local w/ CARAFE")  # ICCV 2019 Figure 9's columns
TINY_NOTE = ("small generators trained for minutes on 64 px crops of the embedded default, not the paper's Places "
             "models; the figure shows what these runs do, not what the paper's show.")


def figure(run_dirs: list[Path], count: int, out: Path, device: str = "cpu", zoom: int = 1,
           labels: list[str] | None = None) -> Path:
    """Write the grid of ``count`` validation images for the runs in ``run_dirs`` (in that column order) to ``out``,
    each cell enlarged ``zoom`` times (nearest neighbour, so pixels stay exact), and its provenance beside it."""
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    columns, images, masks, reference = [], None, None, None
    for cfg, _, model, val_set in runs_on_the_same_data(run_dirs, "inpainting", SHARED_DATA_KEYS,
                                                        "the columns would show different holes", world):
        if reference is None:
            reference = validation_data(cfg, SHARED_DATA_KEYS)
            items = [val_set[i] for i in range(min(count, len(val_set)))]
            images, masks = (torch.stack(t).to(world.device) for t in zip(*items))
        with torch.no_grad():
            columns.append(model(images, masks))
    grid = comparison_grid([masked_input(images, masks), *columns, images])
    labels = labels or [r.name for r in run_dirs]
    summary = ("Rows: the first {} validation images with their fixed masks ({} masks, seed {}); columns: masked "
               "input (holes white), {}, original.".format(len(images), reference["val_mask_kind"],
                                                           reference["val_mask_seed"], ", ".join(labels)))
    shown = [Path(p).name for p in val_set.image_paths()[:len(images)]]
    caption = provenance(out, summary, labels, run_dirs, "scripts/inpainting_figure.py",
                         [f"Validation images: {', '.join(shown)}."], TINY_NOTE)
    return write_figure(out, enlarge(grid, zoom), caption)


def main() -> None:
    figure_main(__doc__, FIGURE_9_ROWS, "results/figures/figure-9.png", figure,
                lambda labels: f"masked input, {', '.join(labels)}, original")

