"""COCO 2017 instances, read with pycocotools from the dataset's own layout, as torchvision detection targets.

    root/train2017/*.jpg   root/val2017/*.jpg   root/annotations/instances_{train,val}2017.json

The same code reads real COCO and the embedded synthetic default (``ensure_synthetic_coco``, re-exported here).
Each item is ``(image, target)``: image Tensor[3, H, W] float in [0, 1] at the file's own size, and

    target = {"boxes": Tensor[K, 4] float32 (x1, y1, x2, y2), "labels": Tensor[K] int64 in 1..num_classes - 1,
              "iscrowd": Tensor[K] int64, "image_id": int, "masks": Tensor[K, H, W] uint8 (with_masks only)}

Labels are contiguous: the COCO category ids sorted ascending map to 1, 2, ... (0 is torchvision's background); the
mapping depends only on the annotation file (``category_to_label``), so evaluation rebuilds it from the ground truth.
Resizing (shorter side 800, longer <= 1333), normalisation and padding to a multiple of 64 are the detector's job
(``GeneralizedRCNNTransform``; see ``build_detector``'s ``min_size``, ``max_size``, ``size_divisible``).
"""

from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.data import read_rgb
from tasks.detection.synthetic import ensure_synthetic_coco

SPLITS = {"train": "train2017", "val": "val2017"}
LAYOUT = ("<root>/train2017/<images>, <root>/val2017/<images>, "
          "<root>/annotations/instances_train2017.json, <root>/annotations/instances_val2017.json")


def coco_paths(root: str | os.PathLike, split: str) -> tuple[Path, Path]:
    """(image folder, instances JSON) of ``split`` under ``root``; FileNotFoundError naming the expected layout."""
    if split not in SPLITS:
        raise ValueError(f"unknown COCO split {split!r}; choose one of {', '.join(SPLITS)}")
    root = Path(root)
    image_dir = root / SPLITS[split]
    annotation_file = root / "annotations" / f"instances_{SPLITS[split]}.json"
    for path in (image_dir, annotation_file):
        if not path.exists():
            raise FileNotFoundError(f"COCO {split} data not found: {str(path)!r} is missing. Expected the COCO 2017 "
                                    f"layout: {LAYOUT}; or write the synthetic default with "
                                    "tasks.detection.data.ensure_synthetic_coco(root)")
    return image_dir, annotation_file


def load_coco(annotation_file: str | os.PathLike) -> COCO:
    """pycocotools' COCO index of an instances JSON, without its progress prints."""
    if not Path(annotation_file).is_file():
        raise FileNotFoundError(f"COCO annotation file {str(annotation_file)!r} does not exist")
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return COCO(str(annotation_file))
    except ValueError as error:  # json.JSONDecodeError, UnicodeDecodeError: a truncated or damaged file
        raise ValueError(f"COCO annotation file {str(annotation_file)!r} is not valid JSON ({error}); it may be "
                         "truncated: replace it (the embedded default is written again if you delete its "
                         "folder)") from None
    except (AssertionError, TypeError, KeyError, AttributeError) as error:  # pycocotools' checks of the layout
        raise ValueError(f"COCO annotation file {str(annotation_file)!r} is not an instances file of the COCO "
                         f"format ({type(error).__name__}: {error or 'unexpected layout'})") from None


def category_to_label(coco: COCO) -> dict[int, int]:
    """COCO category id -> contiguous training label: the sorted ids map to 1, 2, ... (0 is the background)."""
    return {category_id: label for label, category_id in enumerate(sorted(coco.getCatIds()), start=1)}


def _flip_horizontal(image: Tensor, target: dict) -> tuple[Tensor, dict]:
    width = image.shape[-1]
    boxes = target["boxes"].clone()
    boxes[:, [0, 2]] = width - target["boxes"][:, [2, 0]]
    flipped = {**target, "boxes": boxes}
    if "masks" in target:
        flipped["masks"] = target["masks"].flip(-1)
    return image.flip(-1), flipped


class CocoDetection(Dataset):
    """COCO instances of one split as ``(image, target)`` pairs for torchvision's detectors (see the module doc).

    Args:
        root: the dataset root (COCO 2017 layout).
        split: ``"train"`` or ``"val"``.
        with_masks: add ``target["masks"]`` (Mask R-CNN), decoded from polygons or RLE by pycocotools.
        train: training mode (default: ``split == "train"``): drops crowd annotations and flips horizontally with
            probability ``flip_prob`` (boxes and masks with the image; drawn from torch's global generator, which
            ``DataLoader`` seeds per worker). Boxes with no extent after clipping to the image are dropped always.
        flip_prob: the flip probability in training mode.
        drop_images_without_objects: leave out images with no usable object (default: ``train``), as the papers'
            training set-up (mmdetection) does; evaluation keeps every image.

    Attributes: ``coco`` (the pycocotools index, the ground truth for ``coco_evaluate``), ``image_ids``,
    ``category_to_label``, ``label_to_category``, ``num_classes`` (categories + background).
    """

    def __init__(self, root: str | os.PathLike, split: str = "train", with_masks: bool = False,
                 train: bool | None = None, flip_prob: float = 0.5,
                 drop_images_without_objects: bool | None = None) -> None:
        self.image_dir, self.annotation_file = coco_paths(root, split)
        self.split = split
        self.with_masks = bool(with_masks)
        self.train = split == "train" if train is None else bool(train)
        if isinstance(flip_prob, bool) or not isinstance(flip_prob, (int, float)) or not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be a number in [0, 1], got {flip_prob!r}")
        self.flip_prob = float(flip_prob)
        self.coco = load_coco(self.annotation_file)
        if "annotations" not in self.coco.dataset:
            raise ValueError(f"{str(self.annotation_file)!r} holds no 'annotations' list (an image-info file, like "
                             "test-dev's?): the {split} split needs COCO instance annotations to be trained or scored "
                             "on".replace("{split}", split))
        self.category_to_label = category_to_label(self.coco)
        self.label_to_category = {label: cid for cid, label in self.category_to_label.items()}
        self.num_classes = len(self.category_to_label) + 1
        image_ids = sorted(self.coco.getImgIds())
        if self.train if drop_images_without_objects is None else drop_images_without_objects:
            image_ids = [i for i in image_ids if self._usable_annotations(i)]
        self.image_ids = image_ids

    def image_paths(self) -> list[Path]:
        """The files of every image of the split (for ``data.verify``)."""
        return [self.image_dir / self.coco.imgs[i]["file_name"] for i in self.image_ids]

    def __len__(self) -> int:
        return len(self.image_ids)

    def _usable_annotations(self, image_id: int) -> list[tuple[dict, list[float]]]:
        """(annotation, clipped xyxy box) of the image's annotations that the split keeps."""
        info = self.coco.imgs[image_id]
        width, height = info["width"], info["height"]
        kept = []
        for ann in self.coco.imgToAnns.get(image_id, []):
            if self.train and ann.get("iscrowd", 0):
                continue
            x, y, w, h = ann["bbox"]
            box = [max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)]
            if box[2] > box[0] and box[3] > box[1]:
                kept.append((ann, box))
        return kept

    def __getitem__(self, index: int) -> tuple[Tensor, dict]:
        image_id = self.image_ids[index]
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        image = torch.from_numpy(np.array(read_rgb(path))).permute(2, 0, 1)
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            raise ValueError(f"{str(path)!r} is {tuple(image.shape[-2:])} (H, W) but its annotation says "
                             f"{(info['height'], info['width'])}")
        image = image.float().div_(255)
        annotations = self._usable_annotations(image_id)
        target: dict = {
            "boxes": torch.tensor([box for _, box in annotations], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([self.category_to_label[a["category_id"]] for a, _ in annotations],
                                   dtype=torch.int64),
            "iscrowd": torch.tensor([int(a.get("iscrowd", 0)) for a, _ in annotations], dtype=torch.int64),
            "image_id": int(image_id),
        }
        if self.with_masks:
            masks = [torch.from_numpy(self.coco.annToMask(a)) for a, _ in annotations]
            target["masks"] = (torch.stack(masks) if masks
                               else torch.zeros(0, info["height"], info["width"], dtype=torch.uint8))
        if self.train and self.flip_prob > 0 and torch.rand(()) < self.flip_prob:
            image, target = _flip_horizontal(image, target)
        return image, target


def collate_detection(batch: list[tuple[Tensor, dict]]) -> tuple[list[Tensor], list[dict]]:
    """Batch ``(image, target)`` pairs as two lists (the detectors take lists: images differ in size)."""
    images, targets = [], []
    for item in batch:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise TypeError(f"expected (image, target) pairs, got {type(item).__name__}")
        images.append(item[0])
        targets.append(item[1])
    return images, targets


__all__ = ["CocoDetection", "category_to_label", "coco_paths", "collate_detection", "ensure_synthetic_coco",
           "load_coco"]
