"""ICCV 2019 Figure 8 from finished segmentation runs: one row per validation image, columns input image, ground
truth, each run's prediction (the paper: UperNet, then UperNet w/ CARAFE).

    make figure-8      # = python scripts/segmentation_figure.py --table 5 (after make reproduce-table-5)
    python scripts/segmentation_figure.py --table pp-8 --rows "UperNet R50" "UperNet R50 w/ CARAFE++"
    python scripts/segmentation_figure.py runs/segmentation/<baseline hash> runs/segmentation/<carafe hash> \
        --labels UperNet "w/ CARAFE" --count 6 --out results/figures/figure-8.png

``--table`` takes the run folders of the named rows (default: the paper's pair, UperNet and UperNet w/ CARAFE) and
seed from the rendered ``results/table-<name>.json``. Each run folder must hold ``config.yaml`` and
``checkpoint.pt``; the runs must share their validation data (dataset, class count, test size), so every column
shows the same images.

Each prediction is made as the task's evaluation makes it (``SegmentationTask.label_scores`` on the validation
set's own test transform: shorter side ``data.test_size``, padded to ``data.pad_to``), one image per batch, and
shown at the label's size: the class of the highest score at every pixel, also where the ground truth is 0
("other", ignored by the metrics). Label maps use ``tasks.segmentation.figures.PALETTE``: label 0 black. The input
and ground truth are the stored image and annotation. Beside the PNG, ``<name>.md`` records the runs (column, config
hash, commit), the validation images, the palette's colours and the command.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.common.distributed import World
from tasks.common.qualitative import (enlarge, figure_main, image_grid, provenance, runs_on_the_same_data,
                                      validation_data, write_figure)
from tasks.segmentation.figures import PALETTE, colour_labels

SHARED_DATA_KEYS = ("root", "num_classes", "test_size", "max_size")
FIGURE_8_ROWS = ("UperNet", "UperNet w/ CARAFE")  # ICCV 2019 Figure 8's last two columns
TINY_NOTE = ("UperNets with a narrower decoder trained from scratch for minutes on the embedded 64 px street "
             "scenes (8 classes), not the paper's ImageNet-initialised ADE20k models; the figure shows what these "
             "runs do, not what the paper's show.")


def figure(run_dirs: list[Path], count: int, out: Path, device: str = "cpu", zoom: int = 1,
           labels: list[str] | None = None) -> Path:
    """Write the grid of the first ``count`` validation images (input, ground truth, one prediction per run in
    ``run_dirs``, in that column order) to ``out``, enlarged ``zoom`` times (nearest neighbour, so pixels stay
    exact), and its provenance beside it."""
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    rows, names, reference = [], [], None
    for cfg, task, model, val_set in runs_on_the_same_data(run_dirs, "segmentation", SHARED_DATA_KEYS,
                                                           "the columns would show different images or classes",
                                                           world):
        if reference is None:
            reference = validation_data(cfg, SHARED_DATA_KEYS)
            originals = [val_set.original(i) for i in range(min(count, len(val_set)))]
            rows = [[np.asarray(image), colour_labels(label)] for image, label in originals]
            names = task.class_names()
        collate = task.collate_fn()
        for index, row in enumerate(rows):
            batch = task.to_device(collate([val_set[index]]))
            scores = task.label_scores(model, batch)[0]
            row.append(colour_labels((scores[0].argmax(0) + 1).cpu().numpy()))
    labels = labels or [r.name for r in run_dirs]
    summary = (f"Rows: the first {len(rows)} validation images, predicted at the single test scale (shorter side "
               f"{reference['test_size']}, longer at most {reference['max_size']}) and shown at the annotation's "
               f"size; columns: input image, ground truth, {', '.join(labels)}.")
    shown = [path.name for path in val_set.image_paths()[:len(rows)]]
    colours = "; ".join(f"{name} {tuple(int(v) for v in PALETTE[c])}" for c, name in enumerate(names, start=1))
    details = [f"Validation images: {', '.join(shown)}.",
               "Label 0 (other, ignored by the metrics) is black in the ground truth; the predictions give every "
               "pixel a class, those the metrics ignore too. Class colours (R, G, B), the PASCAL VOC devkit's "
               f"palette: {colours}."]
    caption = provenance(out, summary, labels, run_dirs, "scripts/segmentation_figure.py", details, TINY_NOTE)
    return write_figure(out, enlarge(image_grid(rows), zoom), caption)


def main() -> None:
    figure_main(__doc__, FIGURE_8_ROWS, "results/figures/figure-8.png", figure,
                lambda labels: f"input, ground truth, {', '.join(labels)}")

