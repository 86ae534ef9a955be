"""COCO evaluation (pycocotools' COCOeval) of a torchvision detector, and its inference speed.

``coco_evaluate`` runs the model over a loader of ``(images, targets)`` batches (``collate_detection``), converts the
detections to COCO results (contiguous label -> category id, boxes xyxy -> xywh, mask probabilities >= 0.5 ->
compressed RLE) and returns COCOeval's AP, AP50, AP75, APS, APM, APL in percent. Only the images the loader visited
are evaluated (``params.imgIds``), so a subset of a split can be scored. A metric COCOeval leaves undefined (-1: no
ground truth in that size range) is returned as NaN.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
import pycocotools.mask as mask_utils
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from torch import Tensor, nn

from carafe.ops import check_int
from tasks.common.provenance import device_name
from tasks.common.speed import measure_speeds, noise_image
from tasks.detection.data import category_to_label

IOU_TYPES = ("bbox", "segm")
METRICS = ("AP", "AP50", "AP75", "APS", "APM", "APL")  # COCOeval.stats[0:6]


def detections_to_coco(output: Mapping[str, Tensor], image_id: int, label_to_category: Mapping[int, int],
                       iou_types: Sequence[str] = ("bbox",), mask_threshold: float = 0.5) -> dict[str, list[dict]]:
    """One image's detections as COCO result entries per IoU type.

    ``output``: a torchvision detector's eval output: ``boxes`` Tensor[D, 4] (x1, y1, x2, y2), ``labels``
    Tensor[D], ``scores`` Tensor[D] and, for ``"segm"``, ``masks`` Tensor[D, 1, H, W] of probabilities.
    Returns ``{"bbox": [{"image_id", "category_id", "bbox": [x, y, w, h], "score"}, ...], "segm": [... with
    "segmentation": compressed RLE (counts as str)]}``.
    """
    boxes = output["boxes"].detach().float().cpu()
    labels = output["labels"].detach().cpu().tolist()
    scores = output["scores"].detach().float().cpu().tolist()
    unknown = sorted(set(labels) - set(label_to_category))
    if unknown:
        raise ValueError(f"detected label(s) {unknown} have no COCO category; known labels: "
                         f"{sorted(label_to_category)}")
    categories = [int(label_to_category[label]) for label in labels]
    results: dict[str, list[dict]] = {}
    if "bbox" in iou_types:
        xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
        results["bbox"] = [{"image_id": image_id, "category_id": c, "bbox": b, "score": s}
                           for c, b, s in zip(categories, xywh, scores)]
    if "segm" in iou_types:
        if "masks" not in output:
            raise ValueError("iou_types has 'segm' but the model's output has no 'masks' (not a Mask R-CNN?)")
        binary = (output["masks"].detach()[:, 0] >= mask_threshold).cpu().numpy().astype(np.uint8)
        rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0))) if len(binary) else []
        results["segm"] = [{"image_id": image_id, "category_id": c, "score": s,
                            "segmentation": {"size": [int(v) for v in rle["size"]],
                                             "counts": rle["counts"].decode("ascii")}}
                           for c, s, rle in zip(categories, scores, rles)]
    return results


def _results_index(coco_gt: COCO, results: list[dict]) -> COCO:
    """pycocotools' index of ``results``; an empty list (``loadRes`` cannot take one) gives an empty index."""
    if results:
        with contextlib.redirect_stdout(io.StringIO()):
            return coco_gt.loadRes(results)
    coco_dt = COCO()
    coco_dt.dataset = {"images": list(coco_gt.dataset["images"]), "categories": list(coco_gt.dataset["categories"]),
                       "annotations": []}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt.createIndex()
    return coco_dt


def summarize(coco_gt: COCO, results: list[dict], iou_type: str, image_ids: Iterable[int] | None = None
              ) -> dict[str, float]:
    """COCOeval's six headline metrics of ``results`` (COCO result entries) in percent; -1 (undefined) -> NaN."""
    if iou_type not in IOU_TYPES:
        raise ValueError(f"unknown iou_type {iou_type!r}; choose from {IOU_TYPES}")
    evaluator = COCOeval(coco_gt, _results_index(coco_gt, results), iou_type)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(set(image_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {name: float(v) * 100 if v >= 0 else float("nan") for name, v in zip(METRICS, evaluator.stats[:6])}


def check_iou_types(iou_types: Sequence[str]) -> tuple[str, ...]:
    if isinstance(iou_types, str) or not iou_types or not set(iou_types) <= set(IOU_TYPES):
        raise ValueError(f"iou_types must be a non-empty subset of {IOU_TYPES}, got {iou_types!r}")
    return tuple(iou_types)


@torch.no_grad()
def collect_detections(model: nn.Module, data_loader: Iterable, label_to_category: Mapping[int, int],
                       iou_types: Sequence[str] = ("bbox",), device: str | torch.device = "cpu",
                       mask_threshold: float = 0.5) -> tuple[dict[str, list[dict]], list[int]]:
    """Run ``model`` (put in eval mode, and left so) over ``data_loader``; return the COCO result entries per IoU
    type (``detections_to_coco``) and the ids of the images visited, in order. Under DDP each rank collects its own
    shard; ``summarize`` scores the union."""
    iou_types = check_iou_types(iou_types)
    device = torch.device(device)
    model.eval()
    results: dict[str, list[dict]] = {iou_type: [] for iou_type in iou_types}
    image_ids: list[int] = []
    for images, targets in data_loader:
        outputs = model([image.to(device) for image in images])
        for output, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            for iou_type, entries in detections_to_coco(output, image_id, label_to_category, iou_types,
                                                        mask_threshold).items():
                results[iou_type].extend(entries)
    return results, image_ids


def coco_evaluate(model: nn.Module, data_loader: Iterable, coco_gt: COCO, iou_types: Sequence[str] = ("bbox",),
                  device: str | torch.device = "cpu", label_to_category: Mapping[int, int] | None = None,
                  mask_threshold: float = 0.5) -> dict[str, dict[str, float]]:
    """COCO AP of ``model`` on the images of ``data_loader`` against ``coco_gt``.

    Args:
        model: a torchvision detector on ``device`` (eval output: list of dicts with ``boxes``, ``labels``,
            ``scores``, ``masks``), put in eval mode here and left in eval mode.
        data_loader: yields ``(images, targets)``: lists of Tensor[3, H, W] and dicts with ``image_id``.
        coco_gt: the ground truth, e.g. ``CocoDetection.coco``.
        iou_types: a subset of ``("bbox", "segm")``.
        label_to_category: contiguous label -> COCO category id; default: the ground truth's sorted category ids
            (the mapping ``CocoDetection`` trains with).
        mask_threshold: a pasted mask probability >= this is foreground (0.5, as the papers' code).

    Returns: ``{iou_type: {"AP", "AP50", "AP75", "APS", "APM", "APL"}}`` in percent.
    """
    iou_types = check_iou_types(iou_types)
    if label_to_category is None:
        label_to_category = {label: cid for cid, label in category_to_label(coco_gt).items()}
    results, image_ids = collect_detections(model, data_loader, label_to_category, iou_types, device,
                                            mask_threshold)
    if not image_ids:
        raise ValueError("data_loader yielded no images to evaluate")
    return {iou_type: summarize(coco_gt, results[iou_type], iou_type, image_ids) for iou_type in iou_types}


class InferenceSpeed(NamedTuple):
    """What ``measure_inference_speed`` returns."""

    images_per_second: float
    device: str


@torch.no_grad()
def measure_inference_speed(model: nn.Module, image_size: tuple[int, int] = (800, 1333),
                            device: str | torch.device = "cpu", warmup: int = 5, iterations: int = 20,
                            seed: int = 0) -> InferenceSpeed:
    """Images per second of ``model`` in eval mode on one image of ``image_size`` = (H, W), and the device name.

    The image is uniform noise from ``seed`` (so the number of detections, and the time of the post-processing, is
    whatever the model makes of it). ``warmup`` untimed calls, then the median of ``iterations`` timed calls; on a
    GPU each timed call is bracketed by ``torch.cuda.synchronize``. The model's own transform resizes the image.
    The model must already be on ``device``; it is left in eval mode.
    """
    if (not isinstance(image_size, Sequence) or len(image_size) != 2
            or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in image_size)):
        raise ValueError(f"image_size must be (height, width) with positive ints, got {image_size!r}")
    device = torch.device(device)
    image = noise_image(*image_size, seed=check_int("seed", seed, 0)).to(device)
    model.eval()
    speed = measure_speeds({"model": lambda: model([image])}, warmup, iterations, device)["model"]
    return InferenceSpeed(speed, device_name(device))
