"""ADE20k (SceneParsing, ``ADEChallengeData2016``) in its own layout, with the papers' augmentation.

    <root>/ADEChallengeData2016/images/{training,validation}/*.jpg
    <root>/ADEChallengeData2016/annotations/{training,validation}/*.png   (same stem; 0 = other, 1..150 = classes)

``data.root`` may name the folder that holds ``ADEChallengeData2016/`` or that folder itself. The same code reads the
embedded default (``tasks.segmentation.synthetic``), written in that layout.

Training (ICCV 2019 section 4.3, CSAIL's ``TrainDataset``): the shorter side is drawn from ``train_scales`` (papers:
300, 375, 450, 525, 600), the longer side capped at ``max_size`` (papers: 1200), image bilinear and label nearest,
random horizontal flip; ``collate_segmentation`` zero-pads the batch to a multiple of ``pad_to`` (32), labels with 0
(ignored). The scale is drawn per image, where CSAIL draws one per batch; padding makes the two equivalent in what
the network sees. Evaluation: the shorter side resized to ``test_size`` (papers: 450, longer <= ``max_size``), the
label kept at its own size: predictions are resized to it before scoring, as CSAIL's evaluation does.

Items: ``(image Tensor[3, h, w] normalised with ImageNet's mean / std, label Tensor[H, W] int64 in 0..num_classes)``;
for training (h, w) = (H, W).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from tasks.common.data import CorruptImageError, read_rgb

ADE_FOLDER = "ADEChallengeData2016"
SPLIT_FOLDERS = {"train": "training", "val": "validation"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUT = (f"<root>/{ADE_FOLDER}/images/{{training,validation}}/*.jpg and "
          f"<root>/{ADE_FOLDER}/annotations/{{training,validation}}/*.png")


def ade_split_folders(root: str | Path, split: str) -> tuple[Path, Path]:
    """(image folder, annotation folder) of ``split`` under ``root``; FileNotFoundError naming the layout."""
    if split not in SPLIT_FOLDERS:
        raise ValueError(f"unknown ADE20k split {split!r}; choose one of {', '.join(SPLIT_FOLDERS)}")
    root = Path(root)
    base = root if root.name == ADE_FOLDER else root / ADE_FOLDER
    folders = (base / "images" / SPLIT_FOLDERS[split], base / "annotations" / SPLIT_FOLDERS[split])
    for folder in folders:
        if not folder.is_dir():
            raise FileNotFoundError(f"ADE20k {split} data not found: {str(folder)!r} is missing. Expected the "
                                    f"layout {LAYOUT}; leave data.root unset to use the embedded default")
    return folders


def read_label(path: str | Path) -> np.ndarray:
    """An annotation PNG as uint8 [H, W]; an unreadable file raises ``CorruptImageError`` naming it."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "P"):
                raise ValueError(f"mode {image.mode}, expected an 8-bit single-channel PNG")
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise CorruptImageError(f"cannot read annotation {str(path)!r}: {error}") from error


def shorter_side_size(height: int, width: int, shorter: int, max_size: int) -> tuple[int, int]:
    """(h, w) with the shorter side ``shorter`` and the longer side at most ``max_size``, aspect kept."""
    scale = min(shorter / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


class ADE20kSegmentation(Dataset):
    """One split of ADE20k (or the embedded default) with the papers' training or test transform."""

    def __init__(self, root: str | Path, split: str, train: bool, num_classes: int,
                 train_scales: tuple[int, ...] = (300, 375, 450, 525, 600), test_size: int = 450,
                 max_size: int = 1200, flip: bool = True) -> None:
        self.image_dir, self.annotation_dir = ade_split_folders(root, split)
        self.split, self.train, self.num_classes = split, train, num_classes
        self.train_scales, self.test_size, self.max_size, self.flip = tuple(train_scales), test_size, max_size, flip
        self.images = sorted(self.image_dir.glob("*.jpg"))
        if not self.images:
            raise FileNotFoundError(f"no .jpg images in {str(self.image_dir)!r} (expected {LAYOUT})")
        missing = [p.name for p in self.images if not (self.annotation_dir / f"{p.stem}.png").is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {str(self.image_dir)!r} have no annotation in "
                                    f"{str(self.annotation_dir)!r}, e.g. {missing[0]} (expected <stem>.png)")

    def __len__(self) -> int:
        return len(self.images)

    def image_paths(self) -> list[Path]:
        return list(self.images)

    def annotation_paths(self) -> list[Path]:
        """The annotation PNG of each image, in ``image_paths`` order."""
        return [self.annotation_dir / f"{path.stem}.png" for path in self.images]

    def original(self, index: int) -> tuple[Image.Image, np.ndarray]:
        """Item ``index`` as stored: (RGB image, uint8 label map [H, W] of the image's size, 0 = other), checked."""
        path = self.images[index]
        image = read_rgb(path)
        label = read_label(self.annotation_dir / f"{path.stem}.png")
        if label.shape != (image.height, image.width):
            raise ValueError(f"{path.name}: image is {image.height}x{image.width} but its annotation is "
                             f"{label.shape[0]}x{label.shape[1]}")
        if label.max() > self.num_classes:
            raise ValueError(f"{path.stem}.png holds label {label.max()} but data.num_classes={self.num_classes}")
        return image, label

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image, label = self.original(index)
        shorter = random.choice(self.train_scales) if self.train else self.test_size
        size = shorter_side_size(image.height, image.width, shorter, self.max_size)
        image = image.resize(size[::-1], Image.BILINEAR)
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
        pixels = (pixels - mean) / std
        target = torch.from_numpy(label).long()
        if self.train:
            target = F.interpolate(target[None, None].float(), size=size, mode="nearest")[0, 0].long()
            if self.flip and random.random() < 0.5:
                pixels, target = pixels.flip(-1), target.flip(-1)
        return pixels, target


def pad_to_multiple(tensors: list[Tensor], multiple: int, value: float = 0) -> Tensor:
    """Stack tensors [..., h_i, w_i], zero-padded (``value``) at the bottom/right to (H, W) = the largest size rounded
    up to ``multiple``."""
    height = -(-max(t.shape[-2] for t in tensors) // multiple) * multiple
    width = -(-max(t.shape[-1] for t in tensors) // multiple) * multiple
    return torch.stack([F.pad(t, (0, width - t.shape[-1], 0, height - t.shape[-2]), value=value) for t in tensors])


def collate_segmentation(batch: list[tuple[Tensor, Tensor]], pad_to: int = 32) -> dict[str, Tensor]:
    """``{"images": Tensor[N, 3, H, W], "labels": Tensor[N, H', W'] (0-padded, 0 = ignored), "image_sizes":
    Tensor[N, 2], "label_sizes": Tensor[N, 2]}``; H, W multiples of ``pad_to``."""
    images, labels = zip(*batch)
    return {"images": pad_to_multiple(list(images), pad_to), "labels": pad_to_multiple(list(labels), 1),
            "image_sizes": torch.tensor([t.shape[-2:] for t in images]),
            "label_sizes": torch.tensor([t.shape[-2:] for t in labels])}


def ade_class_names(root: str | Path, num_classes: int) -> list[str]:
    """Class names from ``objectInfo150.txt`` (ADE20k's tab-separated list: Idx, Ratio, Train, Val, Name), the first
    synonym of each; the class numbers ``"1"``.. when the file is absent or does not list ``num_classes`` names."""
    root = Path(root)
    base = root if root.name == ADE_FOLDER else root / ADE_FOLDER
    path = base / "objectInfo150.txt"
    if path.is_file():
        rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
        names = [row[-1].split(";")[0].strip() for row in rows]
        if len(names) == num_classes:
            return names
    return [str(c) for c in range(1, num_classes + 1)]
