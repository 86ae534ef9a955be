"""ImageNet in its standard layout (``<root>/train/<class>/*`` and ``<root>/val/<class>/*``), and the embedded
default: a small procedural dataset in that same layout, written on first use.

The embedded classes are 4 shapes x 4 fill textures (16 classes). Each image is one object (random size, position
and rotation, a two-colour fill texture of period 4-6 px and random phase, random colours) over a background
carrying a faint texture of a random kind, plus pixel noise. Colour says nothing about the class; telling
"vertical stripes" from "checker" needs detail a few pixels wide, which each downsampler keeps or loses. A ResNet-50
trained from scratch for 640 iterations of 32 images (the tiny scale) lands around 60-67% top-1 (chance: 6.25%), far
from both chance and 100%.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms

from tasks.common.data import read_rgb
from tasks.common.io import ensure_generated_folder
from tasks.common.progress import Progress

SHAPES = ("disc", "square", "triangle", "ring")
TEXTURES = ("hstripes", "vstripes", "checker", "dots")
CLASS_NAMES = tuple(f"c{index:02d}_{shape}_{texture}" for index, (shape, texture) in
                    enumerate((s, t) for s in SHAPES for t in TEXTURES))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SYNTHETIC_VERSION = 1


PERIOD = (4.0, 6.0)        # texture period in pixels
RADIUS = (0.28, 0.42)      # object size, a fraction of the image side
BACKGROUND_TINT = 0.04     # contrast of the background's texture
NOISE = 0.05               # pixel noise (std, on [0, 1])


def _texture(kind: str, yy: np.ndarray, xx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    period = rng.uniform(*PERIOD)
    phase_y, phase_x = rng.uniform(0, 2 * math.pi, size=2)
    wave_y = np.sin(2 * math.pi * yy / period + phase_y)
    wave_x = np.sin(2 * math.pi * xx / period + phase_x)
    if kind == "hstripes":
        return wave_y > 0
    if kind == "vstripes":
        return wave_x > 0
    if kind == "checker":
        return wave_x * wave_y > 0
    if kind == "dots":
        return wave_x + wave_y > 1.0
    raise ValueError(f"unknown texture {kind!r}")


def _shape_mask(kind: str, yy: np.ndarray, xx: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    cy, cx = rng.uniform(0.32, 0.68, size=2) * size
    radius = rng.uniform(*RADIUS) * size
    angle = rng.uniform(0, 2 * math.pi)
    u = math.cos(angle) * (xx - cx) + math.sin(angle) * (yy - cy)
    v = -math.sin(angle) * (xx - cx) + math.cos(angle) * (yy - cy)
    dist = np.hypot(u, v)
    if kind == "disc":
        return dist <= radius
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= radius * 0.8
    if kind == "triangle":
        inside = np.ones_like(u, dtype=bool)
        for k in range(3):  # three half-planes, the edges at distance r / 2 from the centre
            theta = 2 * math.pi * k / 3
            inside &= u * math.cos(theta) + v * math.sin(theta) <= radius * 0.5
        return inside
    if kind == "ring":
        return (dist <= radius) & (dist >= radius * 0.55)
    raise ValueError(f"unknown shape {kind!r}")


def render_image(class_index: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """One image of class ``class_index`` as uint8 [size, size, 3]."""
    shape, texture = SHAPES[class_index // len(TEXTURES)], TEXTURES[class_index % len(TEXTURES)]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    base = rng.uniform(0.2, 0.8, size=3)
    tint = rng.uniform(-BACKGROUND_TINT, BACKGROUND_TINT, size=3)
    background = _texture(TEXTURES[rng.integers(len(TEXTURES))], yy, xx, rng)
    image = base + np.where(background[..., None], tint, -tint)
    colour_a, colour_b = rng.uniform(0.0, 1.0, size=(2, 3))
    while np.abs(colour_a - colour_b).sum() < 0.6:
        colour_b = rng.uniform(0.0, 1.0, size=3)
    fill = np.where(_texture(texture, yy, xx, rng)[..., None], colour_a, colour_b)
    image = np.where(_shape_mask(shape, yy, xx, size, rng)[..., None], fill, image)
    image = image + rng.normal(0.0, NOISE, size=image.shape)
    return (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)


def ensure_synthetic_imagenet(root: str | Path, seed: int = 0, train_per_class: int = 320,
                              val_per_class: int = 64, image_size: int = 32) -> Path:
    """Write the embedded dataset under ``root`` unless the same one is already there; return ``root``.

    Deterministic from the arguments (the same bytes every time). Written to a temporary folder beside ``root``
    and renamed into place, so an interrupted write never leaves a half dataset behind to be reused; a ``root``
    holding another dataset raises ``FolderConflictError`` (see ``tasks.common.io.ensure_generated_folder``).
    """
    spec = {"version": SYNTHETIC_VERSION, "seed": seed, "train_per_class": train_per_class,
            "val_per_class": val_per_class, "image_size": image_size, "classes": list(CLASS_NAMES)}
    total = len(CLASS_NAMES) * (train_per_class + val_per_class)

    def write(staging: Path) -> None:
        progress = Progress(total, f"writing the embedded ImageNet-layout dataset to {root}", enabled=True)
        written = 0
        for split, per_class in (("train", train_per_class), ("val", val_per_class)):
            for class_index, name in enumerate(CLASS_NAMES):
                folder = staging / split / name
                folder.mkdir(parents=True)
                rng = np.random.default_rng([seed, class_index, 0 if split == "train" else 1])
                for index in range(per_class):
                    Image.fromarray(render_image(class_index, image_size, rng)).save(folder / f"{index:05d}.png")
                written += per_class
                progress.update(written)

    return ensure_generated_folder(root, spec, write)


def check_imagenet_layout(root: str | Path) -> Path:
    root = Path(root)
    missing = [split for split in ("train", "val") if not (root / split).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"ImageNet not found at data.root={root}: missing {', '.join(root.as_posix() + '/' + s for s in missing)}."
            " Expected the standard layout <root>/train/<wnid>/*.JPEG and <root>/val/<wnid>/*.JPEG (val sorted into"
            " class folders); leave data.root unset to use the embedded default")
    return root


def build_transforms(train: bool, crop_size: int, resize_size: int, min_crop_scale: float = 0.08,
                     hflip: bool = True) -> transforms.Compose:
    """Training: random-resized crop + flip (Goyal et al.); evaluation: resize the shorter side, centre crop."""
    normalize = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if train:
        augment = [transforms.RandomResizedCrop(crop_size, scale=(min_crop_scale, 1.0), antialias=True)]
        if hflip:
            augment.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(augment + normalize)
    return transforms.Compose([transforms.Resize(resize_size, antialias=True), transforms.CenterCrop(crop_size)]
                              + normalize)


def build_imagenet(root: str | Path, crop_size: int = 224, resize_size: int = 256, min_crop_scale: float = 0.08,
                   hflip: bool = True) -> tuple[datasets.ImageFolder, datasets.ImageFolder]:
    """(train, val) ImageFolders over ``root``; both must list the same classes."""
    root = check_imagenet_layout(root)
    train = datasets.ImageFolder(str(root / "train"), build_transforms(True, crop_size, resize_size,
                                                                        min_crop_scale, hflip), loader=read_rgb)
    val = datasets.ImageFolder(str(root / "val"), build_transforms(False, crop_size, resize_size), loader=read_rgb)
    if train.classes != val.classes:
        raise ValueError(f"{root}: train/ has {len(train.classes)} classes and val/ has {len(val.classes)}, "
                         "or their names differ; both splits must hold the same class folders")
    return train, val


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[int]:
    """How many of the targets are among the k highest logits, for each k (k capped at the class count)."""
    top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
    hits = top == targets[:, None]
    return [int(hits[:, :k].any(dim=1).sum()) for k in ks]
