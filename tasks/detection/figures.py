"""Qualitative detection figures from finished runs: ICCV 2019 Figure 5 (where CARAFE in the FPN reassembles a unit
from) and the detection grid of ICCV 2019 Figure 4 / CARAFE++ Figure 6. The command lines are
``scripts/figure5.py`` (``make figure-5``) and ``scripts/detection_figure.py`` (``make figure-4``).

Figure 5: for an output unit l' on P2 of a trained detector with CARAFE in its FPN, the top-down path computed
M_l = L_l + CARAFE(M_{l+1}), so l' holds a kernel-weighted sum of units of M3, each of those a weighted sum of units
of M4, and so on. ``reassembly_sources`` takes a one-hot map at l' back through every top-down CARAFE with the
adjoint of reassembly (``carafe.analysis``): the weight of every coarser unit in l' is the product of the kernels
along each path to it, summed over the paths (the lateral terms L_l add to, not reassemble, the value, and are not
part of it). ``draw_reassembly`` paints those units red over the image, their opacity the weight relative to the
level's largest, with l' in green, as the paper's figure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor, nn

from carafe import CARAFEPack
from carafe.analysis import chained_reassembly_adjoint, reassembly_kernels
from tasks.common.distributed import World
from tasks.common.engine import prepared_datasets
from tasks.common.provenance import REPO_ROOT
from tasks.common.qualitative import FigureError, load_finished_run
from tasks.common.run_folder import read_metrics
from tasks.detection.data import CocoDetection

GAP = 4  # px of white between cells
HEADER = 20  # px of the caption strip above each column
RED, GREEN, WHITE, BLACK = (230, 20, 20), (0, 200, 0), (255, 255, 255), (0, 0, 0)
# Distinct colours for class labels 1, 2, ... (label 0 is torchvision's background and never detected).
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40), (128, 0, 0), (0, 0, 128)]


@dataclass
class DetectionRun:
    """A finished detection run, its model loaded in eval mode, and its validation set."""

    run_dir: Path
    cfg: DictConfig
    model: nn.Module
    val_set: CocoDetection
    record: dict[str, Any]

    @property
    def data_settings(self) -> dict[str, Any]:
        """What decides the validation images: two runs with equal settings show the same images."""
        return OmegaConf.to_container(OmegaConf.create({"root": self.cfg.data.get("root"),
                                                        "embedded": self.cfg.data.get("embedded")}))

    def category_names(self) -> dict[int, str]:
        """Contiguous label -> COCO category name."""
        cats = self.val_set.coco.cats
        return {label: cats[cid]["name"] for label, cid in self.val_set.label_to_category.items()}


def load_run(run_dir: str | Path, device: str = "cpu") -> DetectionRun:
    """A finished detection run folder (``config.yaml`` and ``checkpoint.pt``) with its model and validation set."""
    run_dir = Path(run_dir)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    try:
        cfg, task, model = load_finished_run(run_dir, "detection", world)
    except (FileNotFoundError, ValueError) as error:
        raise FigureError(str(error)) from error
    _, val_set = prepared_datasets(task, world)
    record = read_metrics(run_dir) or {}
    return DetectionRun(run_dir, cfg, model, val_set, record)


def runs_table(labels: Sequence[str], runs: Sequence[DetectionRun]) -> list[str]:
    """Markdown table lines: each run's label, folder, config hash, commit, scale and when it finished."""
    lines = ["| label | run | config hash | commit | scale | finished |", "|---|---|---|---|---|---|"]
    for label, run in zip(labels, runs):
        folder = run.run_dir.absolute()
        shown = folder.relative_to(REPO_ROOT) if folder.is_relative_to(REPO_ROOT) else run.run_dir.name
        record = run.record
        lines.append(f"| {label} | {shown} | {record.get('config_hash', '?')} | {str(record.get('commit', '?'))[:12]} "
                     f"| {record.get('scale', '?')} | {record.get('finished_at', '?')} |")
    return lines


# Drawing.

def _font(size: int = 11) -> ImageFont.ImageFont:
    return ImageFont.load_default(size)


def to_pixels(image: Tensor) -> np.ndarray:
    """Tensor[3, H, W] in [0, 1] -> uint8 [H, W, 3]."""
    return (image.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()


def fit_scale(height: int, width: int, cell: int) -> float:
    """The factor that makes the longer side of an image ``cell`` pixels."""
    return cell / max(height, width)


def resized(pixels: np.ndarray, scale: float) -> Image.Image:
    """uint8 [H, W, 3] scaled by ``scale`` (nearest neighbour when enlarging, so pixels stay visible)."""
    height, width = pixels.shape[:2]
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return Image.fromarray(pixels).resize(size, Image.NEAREST if scale >= 1 else Image.BILINEAR)


def class_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def kept_detections(output: Mapping[str, Tensor], threshold: float, max_count: int) -> list[int]:
    """Indices of the ``max_count`` highest-scoring detections with score >= ``threshold``, lowest score first (the
    order they are drawn in, so the most confident is on top)."""
    scores = output["scores"].detach().cpu()
    order = [int(i) for i in torch.argsort(scores, descending=True) if scores[i] >= threshold][:max_count]
    return order[::-1]


def draw_detections(pixels: np.ndarray, output: Mapping[str, Tensor], names: Mapping[int, str], scale: float,
                    threshold: float, max_count: int, mask_threshold: float = 0.5) -> Image.Image:
    """One image (uint8 [H, W, 3]) scaled by ``scale`` with a detector's output drawn over it: for each kept
    detection (``kept_detections``) its mask (probability >= ``mask_threshold``, Mask R-CNN) tinted in its class
    colour, then its box (2 px, edges at ``round(coordinate * scale)``) and ``<class> <score>`` above it."""
    canvas = resized(pixels, scale).convert("RGB")
    kept = kept_detections(output, threshold, max_count)
    if "masks" in output and kept:
        tint = np.asarray(canvas).astype(np.float32)
        for i in kept:
            mask = output["masks"][i, 0].detach().cpu().numpy() >= mask_threshold
            mask = np.asarray(Image.fromarray(mask).resize(canvas.size, Image.NEAREST))
            tint[mask] = 0.55 * tint[mask] + 0.45 * np.asarray(class_colour(int(output["labels"][i])), np.float32)
        canvas = Image.fromarray(tint.round().astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for i in kept:
        label, score = int(output["labels"][i]), float(output["scores"][i])
        colour = class_colour(label)
        x1, y1, x2, y2 = (round(float(v) * scale) for v in output["boxes"][i])
        draw.rectangle([x1, y1, x2, y2], outline=colour, width=2)
        text = f"{names.get(label, label)} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        ty = y1 - (bottom - top) - 3 if y1 - (bottom - top) - 3 >= 0 else y1 + 2
        draw.rectangle([x1, ty, x1 + right - left + 3, ty + bottom - top + 2], fill=colour)
        draw.text((x1 + 2 - left, ty + 1 - top), text, fill=WHITE, font=font)
    return canvas


def grid(cells: Sequence[Sequence[Image.Image]], headers: Sequence[str], cell: int) -> np.ndarray:
    """Rows of cells (each at most ``cell`` x ``cell``, placed top-left in its slot) under one header per column,
    separated by ``GAP`` px of white -> uint8 [HEADER + rows (cell + GAP) - GAP, columns (cell + GAP) - GAP, 3]."""
    rows, columns = len(cells), len(headers)
    if rows == 0 or any(len(row) != columns for row in cells):
        raise ValueError(f"every row needs {columns} cells (one per header), got {[len(r) for r in cells]}")
    canvas = Image.new("RGB", (columns * (cell + GAP) - GAP, HEADER + rows * (cell + GAP) - GAP), WHITE)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for j, header in enumerate(headers):
        draw.text((j * (cell + GAP) + 2, 3), header, fill=BLACK, font=font)
        for i, row in enumerate(cells):
            canvas.paste(row[j], (j * (cell + GAP), HEADER + i * (cell + GAP)))
    return np.asarray(canvas)


# ICCV 2019 Figure 5.

@dataclass
class ReassemblySources:
    """Where P2 units reassemble from, for one image.

    ``weights[level]``: Tensor[P, H_l, W_l], the effective weight of every unit of ``level`` (``p3``, ``p4``, ...)
    in each of the P chosen P2 units (averaged over CARAFE's channel groups). ``units``: the P2 unit (row, column)
    of each point. ``strides[level]``: its stride in the resized image, ``p2``'s included. ``resize``: (y, x)
    factor from the image's pixels to the resized image the network saw.
    """

    weights: dict[str, Tensor]
    units: list[tuple[int, int]]
    strides: dict[str, int]
    resize: tuple[float, float]


def fpn_carafes(model: nn.Module, what: str) -> list[CARAFEPack]:
    """The top-down upsamplers of a detector's FPN, finest first, if they are all CARAFE; else FigureError."""
    fpn = getattr(getattr(model, "backbone", None), "fpn", None)
    upsamplers = list(getattr(fpn, "upsamplers", []))
    kinds = sorted({type(up).__name__ for up in upsamplers if not isinstance(up, CARAFEPack)})
    if not upsamplers or kinds:
        raise FigureError(f"{what}: its FPN upsamples with {', '.join(kinds) or 'nothing'}, not CARAFE; Figure 5 "
                          "shows the reassembly kernels of CARAFE in the FPN, so name a run trained with "
                          "upsampler@fpn_upsampler=carafe (e.g. Table 1's 'Mask R-CNN w/ CARAFE')")
    return upsamplers


@torch.no_grad()
def reassembly_sources(model: nn.Module, image: Tensor, points: Sequence[tuple[float, float]],
                       what: str = "the model") -> ReassemblySources:
    """Run ``model``'s transform and backbone on ``image`` (Tensor[3, H, W] in [0, 1]), capture every top-down
    CARAFE's input, and take a one-hot map at the P2 unit of each point (x, y in image pixels) back to every coarser
    level (``carafe.analysis.chained_reassembly_adjoint``)."""
    upsamplers = fpn_carafes(model, what)
    height, width = image.shape[-2:]
    for x, y in points:
        if not (0 <= x < width and 0 <= y < height):
            raise FigureError(f"point ({x}, {y}) lies outside the {width} x {height} image")
    device = next(model.parameters()).device
    batch, _ = model.transform([image.to(device)])
    resized_h, resized_w = batch.image_sizes[0]
    inputs: dict[int, Tensor] = {}
    hooks = [up.register_forward_hook(lambda module, args, out, i=i: inputs.__setitem__(i, args[0]))
             for i, up in enumerate(upsamplers)]
    try:
        levels = model.backbone(batch.tensors)
    finally:
        for hook in hooks:
            hook.remove()
    names = list(levels)
    finest = levels[names[0]]
    stride = batch.tensors.shape[-1] // finest.shape[-1]
    resize = (resized_h / height, resized_w / width)
    units = [(int(y * resize[0]) // stride, int(x * resize[1]) // stride) for x, y in points]
    one_hot = finest.new_zeros(len(points), 1, *finest.shape[-2:], dtype=torch.float64)
    for p, (row, col) in enumerate(units):
        one_hot[p, 0, row, col] = 1.0
    steps = [(reassembly_kernels(up, inputs[i]).double().expand(len(points), -1, -1, -1), up.up_kernel,
              up.scale_factor, up.up_group) for i, up in enumerate(upsamplers)]
    maps = chained_reassembly_adjoint(one_hot, steps)
    weights = {name: m.mean(dim=1).float().cpu() for name, m in zip(names[1:], maps)}
    strides = {name: stride * 2 ** i for i, name in enumerate(names)}
    return ReassemblySources(weights, units, strides, resize)


def draw_reassembly(pixels: np.ndarray, sources: ReassemblySources, point: int, level: str | None, cell: int,
                    floor: float = 0.01) -> Image.Image:
    """The image (uint8 [H, W, 3]) fitted into ``cell`` px with the units of ``level`` that P2 unit ``point``
    reassembles from in red, opacity = weight / the level's largest weight (units under ``floor`` of it left out),
    outlined; the P2 unit itself in green on top. ``level=None`` draws only the green unit."""
    height, width = pixels.shape[:2]
    scale = fit_scale(height, width, cell)
    canvas = resized(pixels, scale).convert("RGBA")
    overlay = Image.new("RGBA", canvas.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)

    def square(row: int, col: int, stride: int) -> list[float]:
        # Unit (row, col) covers resized pixels [row * stride, (row + 1) * stride); back to image pixels, then scaled.
        (ry, rx) = sources.resize
        return [col * stride / rx * scale, row * stride / ry * scale,
                (col + 1) * stride / rx * scale - 1, (row + 1) * stride / ry * scale - 1]

    if level is not None:
        weights = sources.weights[level][point]
        top = float(weights.max())
        stride = sources.strides[level]
        if top > 0:
            for row, col in (weights >= floor * top).nonzero().tolist():
                alpha = float(weights[row, col]) / top
                draw.rectangle(square(row, col, stride), fill=(*RED, round(20 + 140 * alpha)),
                               outline=(*RED, round(80 + 175 * alpha)), width=1)
    row, col = sources.units[point]
    draw.rectangle(square(row, col, next(iter(sources.strides.values()))), fill=(*GREEN, 255),
                   outline=(*GREEN, 255), width=1)
    return Image.alpha_composite(canvas, overlay).convert("RGB")


def default_points(val_set: CocoDetection, index: int, count: int, spacing: float = 4.0
                   ) -> list[tuple[float, float]]:
    """Points on the largest annotated objects of validation image ``index``: for each, the centre of its mask's
    bounding box and the mask's left boundary on that row (the paper picks units inside objects and on their
    edges); ``count`` points in all, each at least ``spacing`` px (P2's stride) from the others in x or y, so no
    two fall on the same P2 unit. FigureError if the image has no annotation."""
    image_id = val_set.image_ids[index]
    annotations = sorted(val_set.coco.imgToAnns.get(image_id, []), key=lambda a: -a["area"])
    if not annotations:
        raise FigureError(f"validation image {index} ({val_set.coco.imgs[image_id]['file_name']}) has no annotated "
                          "object to pick points on; choose another with --image or give --points")
    points: list[tuple[float, float]] = []
    for annotation in annotations:
        mask = val_set.coco.annToMask(annotation).astype(bool)
        x, y, w, h = annotation["bbox"]
        cy = min(int(y + h / 2), mask.shape[0] - 1)
        columns = np.flatnonzero(mask[cy])
        candidates = [(x + w / 2, y + h / 2)] + ([(float(columns[0]), float(cy))] if columns.size else [])
        for p in candidates:
            if all(max(abs(p[0] - q[0]), abs(p[1] - q[1])) >= spacing for q in points):
                points.append(p)
        if len(points) >= count:
            break
    return points[:count]


def first_annotated(val_set: CocoDetection) -> int:
    for index, image_id in enumerate(val_set.image_ids):
        if val_set.coco.imgToAnns.get(image_id):
            return index
    raise FigureError("no validation image has an annotated object; give --image and --points")


def top_units(weights: Tensor, count: int = 3) -> list[tuple[int, int, float]]:
    """The ``count`` largest entries of a Tensor[H, W] as (row, column, weight)."""
    values, flat = weights.flatten().topk(min(count, weights.numel()))
    return [(int(i) // weights.shape[1], int(i) % weights.shape[1], float(v)) for v, i in zip(values, flat)
            if v > 0 and math.isfinite(float(v))]
