"""Pixel accuracy and mIoU as CSAIL's evaluation computes them (``mit_semseg/utils.py``): over labelled pixels only
(label 0, "other", is ignored), intersection and union summed over the whole validation set per class (not averaged
per image), mIoU = the mean of the per-class IoUs.

The counts are one confusion matrix, summed over ranks (``all_reduce``) before any ratio is taken. A class with an
empty union (absent from both the ground truth and the predictions of the whole set) has no IoU and is left out of
the mean; CSAIL would count it as 0, which makes no difference on ADE20k's validation set, where every class occurs.
"""

from __future__ import annotations

import torch
from torch import Tensor


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """Tensor[num_classes, num_classes] int64, rows = ground truth, columns = prediction, over pixels with label > 0.

    predictions: Tensor[...] of class indices 0..num_classes - 1 (logit channels); labels: Tensor[...] of the same
    shape in the annotation's numbering, 0 = ignored, c = class index c - 1.
    """
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} differ in shape")
    if labels.numel() and int(labels.max()) > num_classes:
        raise ValueError(f"a label is {int(labels.max())} but there are only {num_classes} classes (1..{num_classes})")
    labelled = labels > 0
    index = (labels[labelled].long() - 1) * num_classes + predictions[labelled].long()
    return torch.bincount(index, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def segmentation_scores(confusion: Tensor, class_names: list[str] | None = None) -> dict[str, float]:
    """``{"mIoU", "pixel_acc", "IoU/<class>" for every class with a non-empty union, "pixels"}``, in percent."""
    confusion = confusion.double()
    labelled = float(confusion.sum())
    if labelled == 0:
        raise ValueError("the validation set has no labelled pixel (every label is 0, 'other')")
    intersection = confusion.diagonal()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    defined = union > 0
    iou = intersection[defined] / union[defined]
    names = class_names or [str(c + 1) for c in range(confusion.shape[0])]
    scores = {"mIoU": 100.0 * float(iou.mean()), "pixel_acc": 100.0 * float(intersection.sum()) / labelled}
    for name, value in zip((n for n, d in zip(names, defined.tolist()) if d), iou.tolist()):
        scores[f"IoU/{name}"] = 100.0 * value
    scores["pixels"] = labelled
    return scores
