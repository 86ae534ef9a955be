"""Places365 in torchvision's layout (``torchvision.datasets.Places365``, small images), with hole masks, and the
embedded default written in that same layout from scikit-image's bundled photographs.

    <root>/categories_places365.txt          "/a/airfield 0" per line
    <root>/places365_train_standard.txt      "/a/airfield/00000001.jpg 0" per line (paths under data_256/)
    <root>/places365_val.txt                 "Places365_val_00000001.jpg 0" per line (files in val_256/)
    <root>/data_256/a/airfield/00000001.jpg ...
    <root>/val_256/Places365_val_00000001.jpg ...

The papers train at 256 x 256 (Places' ``data_256`` images already are) without saying Standard or Challenge; this
reads the Standard list. Items: ``(image Tensor[3, S, S] in [-1, 1], mask Tensor[1, S, S], 1 = hole)`` with S =
``image_size`` (an image of another size is resized bilinearly). Training: a random horizontal flip and a fresh mask
per item (``mask_kind``, drawn from torch's global RNG, which the engine seeds per epoch and per worker, so a
resumed run draws the same masks); validation: the fixed mask ``validation_mask(val_mask_kind, S, mask_seed, i)``
for the i-th image of the list, the same for every model.

Embedded default: crops of scikit-image's bundled photographs (``skimage.data``; eight colour photographs and six
grey textures, one "category" each), side drawn from [S, 2S] (capped by the photo), resized to S, flipped and
rotated by a multiple of 90 degrees at random; training crops come from the left three quarters of each photograph
and validation crops from the right quarter, so no validation pixel was seen in training. Deterministic from the
seed (same bytes twice), written atomically (``ensure_generated_folder``).
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from carafe.ops import check_int
from tasks.common.data import read_rgb
from tasks.common.io import ensure_generated_folder
from tasks.common.progress import Progress
from tasks.inpainting.masks import draw_mask, validation_mask

CATEGORIES_FILE = "categories_places365.txt"
SPLIT_FILES = {"train": ("places365_train_standard.txt", "data_256"), "val": ("places365_val.txt", "val_256")}
LAYOUT = ("<root>/{categories_places365.txt, places365_train_standard.txt, places365_val.txt} and the images in "
          "<root>/data_256/ (train) and <root>/val_256/ (val)")
#: skimage.data photographs and the category name each gets in the embedded default
PHOTOGRAPHS = {"astronaut": "/a/astronaut", "chelsea": "/c/cat", "coffee": "/c/coffee", "rocket": "/l/launch_pad",
               "hubble_deep_field": "/g/galaxy", "immunohistochemistry": "/t/tissue", "retina": "/r/retina",
               "stereo_motorcycle": "/m/motorcycle", "brick": "/b/brick", "grass": "/g/grass", "gravel": "/g/gravel",
               "camera": "/c/cameraman", "coins": "/c/coins", "moon": "/m/moon_surface"}
TRAIN_SHARE = 0.75  # training crops from the left 3/4 of each photograph, validation crops from the rest
EMBEDDED_VERSION = 1
JPEG_QUALITY = 95


def places_split(root: str | Path, split: str) -> tuple[Path, Path]:
    """(file list, image folder) of ``split``; FileNotFoundError naming the expected layout."""
    if split not in SPLIT_FILES:
        raise ValueError(f"unknown Places365 split {split!r}; choose one of {', '.join(SPLIT_FILES)}")
    root = Path(root)
    listing, folder = root / SPLIT_FILES[split][0], root / SPLIT_FILES[split][1]
    for path, kind in ((listing, "file list"), (folder, "image folder")):
        if not path.exists():
            raise FileNotFoundError(f"Places365 {split} {kind} {str(path)!r} is missing. Expected {LAYOUT}; leave "
                                    "data.root unset to use the embedded default")
    return listing, folder


def read_file_list(listing: Path, folder: Path) -> list[Path]:
    """The image paths a Places365 list names ("<relative path> <label>" per line), under ``folder``."""
    paths = []
    for number, line in enumerate(listing.read_text().splitlines(), 1):
        if not line.strip():
            continue
        name = line.rsplit(" ", 1)[0] if " " in line else line
        if not name:
            raise ValueError(f"{listing}:{number}: expected '<path> <label>', got {line!r}")
        paths.append(folder / name.lstrip("/"))
    if not paths:
        raise FileNotFoundError(f"{listing} lists no images")
    return paths


def to_tensor(image: Image.Image, size: int) -> Tensor:
    """RGB PIL image -> Tensor[3, size, size] in [-1, 1] (bilinear resize when it is not size x size)."""
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return pixels.permute(2, 0, 1).contiguous()


class PlacesInpainting(Dataset):
    """One split of Places365 (or the embedded default) with hole masks; see the module doc."""

    def __init__(self, root: str | Path, split: str, image_size: int = 256, mask_kind: str = "free_form_and_box",
                 val_mask_kind: str = "free_form", mask_seed: int = 0, flip: bool = True) -> None:
        listing, folder = places_split(root, split)
        self.images = read_file_list(listing, folder)
        self.split, self.train = split, split == "train"
        self.image_size = check_int("image_size", image_size, 4)
        self.mask_kind, self.val_mask_kind, self.mask_seed, self.flip = mask_kind, val_mask_kind, mask_seed, flip

    def __len__(self) -> int:
        return len(self.images)

    def image_paths(self) -> list[Path]:
        return list(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        image = to_tensor(read_rgb(self.images[index]), self.image_size)
        size = self.image_size
        if self.train:
            if self.flip and random.random() < 0.5:
                image = image.flip(-1)
            rng = np.random.default_rng(int(torch.randint(0, 2 ** 62, ())))
            mask = draw_mask(self.mask_kind, size, size, rng)
        else:
            mask = validation_mask(self.val_mask_kind, size, self.mask_seed, index)
        return image, torch.from_numpy(np.ascontiguousarray(mask))[None]


def load_photograph(name: str) -> np.ndarray:
    """A bundled scikit-image photograph as uint8 RGB [H, W, 3] (grey ones repeated over the channels)."""
    import skimage.data

    pixels = getattr(skimage.data, name)()
    pixels = pixels[0] if isinstance(pixels, tuple) else pixels  # stereo_motorcycle: (left, right, disparity)
    return np.repeat(pixels[..., None], 3, axis=2) if pixels.ndim == 2 else pixels[..., :3]


def random_crop(photo: np.ndarray, size: int, x_range: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A square crop of side in [size, 2 size] (capped by the photo) with its columns inside ``x_range``, resized
    to ``size`` and randomly flipped and rotated by a multiple of 90 degrees: uint8 [size, size, 3]."""
    height = photo.shape[0]
    x0, x1 = x_range
    side = int(rng.integers(size, 2 * size + 1))
    side = max(1, min(side, height, x1 - x0))
    top, left = int(rng.integers(0, height - side + 1)), int(rng.integers(x0, x1 - side + 1))
    crop = Image.fromarray(np.ascontiguousarray(photo[top:top + side, left:left + side]))
    crop = np.asarray(crop.resize((size, size), Image.BILINEAR))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    return np.ascontiguousarray(np.rot90(crop, int(rng.integers(0, 4))))


def ensure_embedded_places(root: str | Path, seed: int = 0, num_train: int = 256, num_val: int = 32,
                           image_size: int = 64) -> Path:
    """Write the embedded default (module doc) under ``root`` unless the same one is already there; return it."""
    num_train, num_val = check_int("num_train", num_train, 1), check_int("num_val", num_val, 1)
    image_size = check_int("image_size", image_size, 8)
    spec = {"version": EMBEDDED_VERSION, "seed": seed, "num_train": num_train, "num_val": num_val,
            "image_size": image_size, "photographs": sorted(PHOTOGRAPHS)}
    names = sorted(PHOTOGRAPHS)

    def write(staging: Path) -> None:
        progress = Progress(num_train + num_val, f"writing the embedded Places365-layout dataset to {root}", True)
        photos = {name: load_photograph(name) for name in names}
        categories = sorted(PHOTOGRAPHS[name] for name in names)
        label = {category: index for index, category in enumerate(categories)}
        (staging / CATEGORIES_FILE).write_text("".join(f"{c} {label[c]}\n" for c in categories))
        written = 0
        for split, count in (("train", num_train), ("val", num_val)):
            listing, folder = SPLIT_FILES[split]
            rng = np.random.default_rng([seed, 0 if split == "train" else 1])
            lines = []
            for index in range(1, count + 1):
                name = names[(index - 1) % len(names)]
                photo = photos[name]
                split_x = int(photo.shape[1] * TRAIN_SHARE)
                x_range = (0, split_x) if split == "train" else (split_x, photo.shape[1])
                crop = random_crop(photo, image_size, x_range, rng)
                category = PHOTOGRAPHS[name]
                relative = f"{category}/{index:08d}.jpg" if split == "train" else f"Places365_val_{index:08d}.jpg"
                path = staging / folder / relative.lstrip("/")
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(path, quality=JPEG_QUALITY)
                lines.append(f"{relative} {label[category]}\n")
                written += 1
                progress.update(written)
            (staging / listing).write_text("".join(lines))

    return ensure_generated_folder(root, spec, write)
