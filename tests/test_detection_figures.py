"""make figure-5 / figure-4 on one-step detection runs: ICCV Figure 5's reassembly sources (and the refusal of a run
without CARAFE in its FPN), and the detection grid drawn from each model's own predictions."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from experiment_helpers import detection_smoke
import reproduction.figure_detections
import reproduction.figure_reassembly
from tasks.common.distributed import World
from tasks.common.engine import load_weights
from tasks.common.experiment import compose, run_experiment, task_class
from tasks.detection.data import CocoDetection
from tasks.detection.figures import GAP, GREEN, HEADER, FigureError, class_colour, load_run, reassembly_sources


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """One training step each: Faster R-CNN (nearest FPN) and Mask R-CNN with CARAFE in the FPN and mask head.

    The two run folders hold ~0.7 GB of checkpoints; they are removed when the module is done.
    """
    root = tmp_path_factory.mktemp("figures")
    folders = {}
    for name, experiment in (("nearest", "faster_rcnn_r50"), ("carafe", "mask_rcnn_r50_carafe")):
        folders[name] = root / name
        cfg = compose([*detection_smoke(root / "data", num_val=2), f"experiment=detection/{experiment}"])
        assert run_experiment(cfg, folders[name]) is not None
    yield folders
    shutil.rmtree(root, ignore_errors=True)


def test_figure_5_draws_the_reassembly_sources_and_refuses_a_run_without_carafe(runs: dict[str, Path],
                                                                                tmp_path: Path) -> None:
    script = reproduction.figure_reassembly
    out = script.figure(runs["carafe"], tmp_path / "figure-5.png", image=0, points=[(33.0, 30.0), (2.0, 61.0)],
                        cell=64)
    panel = np.asarray(Image.open(out))
    assert panel.shape == (HEADER + 2 * (64 + GAP) - GAP, 4 * (64 + GAP) - GAP, 3)  # 2 points x (P2, P3, P4, P5)
    # The 64 px image fills a 64 px panel unscaled: point (33, 30) is P2 unit (7, 8), pixels 28..31 x 32..35.
    assert tuple(panel[HEADER + 29, 33]) == GREEN
    caption = out.with_suffix(".md").read_text()
    assert json.loads((runs["carafe"] / "metrics.json").read_text())["config_hash"] in caption
    assert "33.0, 30.0 | (7, 8)" in caption and "Tiny scale" in caption

    run = load_run(runs["carafe"])
    sources = reassembly_sources(run.model, run.val_set[0][0], [(33.0, 30.0), (2.0, 61.0)])
    assert sources.units == [(7, 8), (15, 0)]
    assert [tuple(sources.weights[level].shape) for level in ("p3", "p4", "p5", "p6")] == [
        (2, 8, 8), (2, 4, 4), (2, 2, 2), (2, 1, 1)]
    # Interior P2 unit (7, 8) is centred on P3 (3, 4): its softmax kernel's 25 taps all land inside and sum to 1.
    p3 = sources.weights["p3"][0]
    assert torch.isclose(p3.sum(), torch.tensor(1.0), atol=1e-5)
    assert (p3[1:6, 2:7] > 0).all() and p3.count_nonzero() == 25
    # The corner unit's taps partly fall off the map: less weight arrives, never more.
    assert 0 < float(sources.weights["p3"][1].sum()) < 1 and (sources.weights["p5"] <= 1 + 1e-6).all()

    with pytest.raises(FigureError, match="upsamples with InterpolateUpsample, not CARAFE"):
        script.figure(runs["nearest"], tmp_path / "refused.png")
    assert not (tmp_path / "refused.png").exists()


def test_detection_grid_draws_each_models_own_boxes(runs: dict[str, Path], tmp_path: Path) -> None:
    columns = [runs["nearest"], runs["carafe"]]
    cell = 128
    out = reproduction.figure_detections.figure(columns, tmp_path / "figure-4.png", count=2, threshold=0.0,
                                                 max_per_image=3, cell=cell, labels=["Faster", "w/ CARAFE"])
    grid = np.asarray(Image.open(out))
    assert grid.shape == (HEADER + 2 * (cell + GAP) - GAP, 2 * (cell + GAP) - GAP, 3)
    caption = out.with_suffix(".md").read_text()
    assert "| Faster | nearest |" in caption and "| w/ CARAFE | carafe |" in caption

    for column, run_dir in enumerate(columns):
        cfg = OmegaConf.load(run_dir / "config.yaml")
        task = task_class(cfg)(cfg, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
        model = load_weights(task.build_model(), run_dir / "checkpoint.pt").eval()
        val_set = CocoDetection(cfg.data.embedded.dir, "val", train=False)
        for row in range(2):
            image = val_set[row][0]
            with torch.no_grad():
                output = model([image])[0]
            best = int(output["scores"].argmax())  # drawn last, so on top of every other detection
            x1, y1, _, y2 = (float(v) * cell / 64 for v in output["boxes"][best])
            top, left = HEADER + row * (cell + GAP), column * (cell + GAP)
            pixel = grid[top + round((y1 + y2) / 2), left + round(x1)]
            assert tuple(pixel) == class_colour(int(output["labels"][best])), (column, row)
