"""The embedded default for detection: a small procedural dataset in COCO 2017's own on-disk layout.

    root/train2017/000000000001.jpg ...      root/val2017/...
    root/annotations/instances_train2017.json, instances_val2017.json
    root/synthetic.json                      (the generator's settings; marks the folder as this dataset)

Images are textured backgrounds (a colour gradient, two sinusoidal gratings and noise) with non-touching shapes of
six categories, each instance with its mask. The shapes are chosen so that how a mask or feature map is upsampled
shows: a ring has a hole (its width 0.2-0.35 of the radius), a crescent a deep concavity with two thin horns, a
star five to seven thin spikes between concavities, a cross arms a fifth to a third of its box wide, a comb three or
four prongs with gaps as wide between them, and a disc is the convex reference. On the mask head's 14 x 14 RoI
grid a ring's rim is 1.4-2.5 cells wide, a comb's prongs and gaps 2-3, and star spikes taper to a point, so what the
head's 2x upsampling to the 28 x 28 mask makes of them decides the mask's boundary. Masks keep one clear pixel between them, but boxes may overlap: objects sit in
one another's holes and concavities, and a third of the images hold a cluster of two to five small objects whose
corners lie in a 24-pixel window, a pixel or more apart (neighbours that a coarse P3 / P4 map merges, the case an
FPN upsampler has to separate at P2). Category ids are not contiguous, as COCO's are not. Stars, crosses and combs are stored as polygons, discs, rings and crescents as compressed RLE, so the loader
meets both of COCO's non-crowd encodings. Every annotation's ``area`` and ``bbox`` are those of its rasterised mask
(pycocotools' ``area`` / ``toBbox``), and the image pixels are painted from that same mask; each object's colour is
drawn apart from the background under it. Object sizes are drawn from COCO's three ranges (area < 32^2,
32^2..96^2, > 96^2; large objects need ``image_size`` >= 128); every eighth image has no object.

Version 1 drew five convex or nearly convex shapes (disc, square, triangle, ring, cross) at least two pixels apart
box to box, and 64 validation images; at tiny scale no detection table separated its upsamplers (ICCV Table 3:
every row within about two seed stds of another), although those runs were also short and trained from scratch.

The output depends only on the arguments (same bytes twice); it is written to a temporary folder beside ``root`` and
renamed into place, so an interrupted run never leaves a partial dataset at ``root``.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
from PIL import Image

from carafe.ops import check_int
from tasks.common.io import ensure_generated_folder

CATEGORIES = ((2, "disc"), (5, "ring"), (11, "star"), (17, "crescent"), (24, "cross"), (31, "comb"))
POLYGON_SHAPES = ("star", "cross", "comb")
SIZE_RANGES = {"small": (16, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1 << 30)}  # mask area
SIZE_PROBABILITIES = {"small": 0.45, "medium": 0.4, "large": 0.15}
EXTENTS = {"small": (8, 40), "medium": (30, 100), "large": (90, 1 << 30)}  # box side in pixels, per size range
GENERATOR_VERSION = 2  # 1: five convex shapes two pixels apart (see the module doc)
JPEG_QUALITY = 92
EMPTY_EVERY = 8  # image i (0-based) has no object when i % EMPTY_EVERY == EMPTY_EVERY - 1
OBJECTS_PER_IMAGE = (1, 6)  # objects placed anywhere, inclusive range
CLUSTER_PROBABILITY = 1 / 3  # an image also holds a cluster of small objects close together
CLUSTER_SIZE = (2, 5)
GAP = 1  # clear pixels between two masks
MIN_CONTRAST = 0.45  # summed absolute RGB difference between an object's colour and the background under it


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Float32 [size, size, 3] in [0, 1]: colour gradient + two gratings + noise."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy)[..., None]
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    c0, c1 = rng.uniform(0.1, 0.9, size=(2, 3)).astype(np.float32)
    image = c0 + (c1 - c0) * ramp
    for _ in range(2):
        theta, freq, phase = rng.uniform(0, np.pi), rng.uniform(3, 12), rng.uniform(0, 2 * np.pi)
        grating = np.sin(2 * np.pi * freq * (np.cos(theta) * xx + np.sin(theta) * yy) + phase)
        image = image + rng.uniform(0.03, 0.12) * grating[..., None] * rng.uniform(0.3, 1.0, size=3)
    image = image + rng.normal(0, 0.03, size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _rotate_quarter(points: np.ndarray, turns: int) -> np.ndarray:
    """Points [N, 2] in the unit box [0, 1]^2 turned by ``turns`` quarter turns about its centre."""
    for _ in range(turns % 4):
        points = np.stack([1.0 - points[:, 1], points[:, 0]], axis=1)
    return points


def _polygon(shape: str, rng: np.random.Generator) -> np.ndarray:
    """The outline of ``shape`` as points [N, 2] in the unit box (x, y in [0, 1])."""
    if shape == "star":
        points = int(rng.integers(5, 8))
        inner = rng.uniform(0.3, 0.45)
        start = rng.uniform(0, 2 * np.pi)
        angles = start + np.pi * np.arange(2 * points) / points
        radii = np.where(np.arange(2 * points) % 2 == 0, 0.5, 0.5 * inner)
        return np.stack([0.5 + radii * np.cos(angles), 0.5 + radii * np.sin(angles)], axis=1)
    if shape == "cross":  # a plus sign, arms 0.2-0.34 of the box wide, the crossing anywhere in the middle third
        arm = rng.uniform(0.2, 0.34)
        a0 = rng.uniform(1 / 3, 2 / 3 - arm) if arm < 1 / 3 else 1 / 3
        b0 = rng.uniform(1 / 3, 2 / 3 - arm) if arm < 1 / 3 else 1 / 3
        a1, b1 = a0 + arm, b0 + arm
        return np.array([[a0, 0], [a1, 0], [a1, b0], [1, b0], [1, b1], [a1, b1], [a1, 1], [a0, 1], [a0, b1],
                         [0, b1], [0, b0], [a0, b0]], dtype=np.float64)
    if shape == "comb":  # a back bar along the bottom and 3-4 prongs up, prongs and gaps alike wide; then turned
        prongs = int(rng.integers(3, 5))
        bar = rng.uniform(0.2, 0.3)
        width = 1.0 / (2 * prongs - 1)
        outline = [[0.0, 1.0]]
        for k in range(prongs):
            left, right = 2 * k * width, (2 * k + 1) * width
            top = rng.uniform(0.0, 0.15)
            outline += [[left, top], [right, top]]
            if k < prongs - 1:
                outline += [[right, 1.0 - bar], [right + width, 1.0 - bar]]
        outline.append([1.0, 1.0])
        return _rotate_quarter(np.array(outline, dtype=np.float64), int(rng.integers(4)))
    raise ValueError(f"unknown polygon shape {shape!r}")


def _raster(shape: str, box: tuple[int, int, int, int], rng: np.random.Generator, size: int) -> np.ndarray:
    """The bool mask [size, size] of a disc, ring or crescent inscribed in ``box`` = (x0, y0, w, h)."""
    x0, y0, w, h = box
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    u, v = (xx - (x0 + w / 2)) / (w / 2), (yy - (y0 + h / 2)) / (h / 2)  # the box as [-1, 1]^2
    radius = u ** 2 + v ** 2
    mask = radius <= 1.0
    if shape == "ring":  # the rim 0.2-0.35 of the radius wide
        mask &= radius >= (1.0 - rng.uniform(0.2, 0.35)) ** 2
    elif shape == "crescent":  # the disc less an offset disc: a concavity between two thin horns
        angle = rng.uniform(0, 2 * np.pi)
        offset = rng.uniform(0.35, 0.55)
        cut = rng.uniform(0.7, 0.85)
        mask &= (u - offset * np.cos(angle)) ** 2 + (v - offset * np.sin(angle)) ** 2 > cut ** 2
    elif shape != "disc":
        raise ValueError(f"unknown raster shape {shape!r}")
    return mask


def _shape_segmentation(shape: str, box: tuple[int, int, int, int], rng: np.random.Generator,
                        size: int) -> tuple[object, dict]:
    """(COCO segmentation, its compressed RLE) of ``shape`` inscribed in ``box`` = (x0, y0, w, h) on the image."""
    x0, y0, w, h = box
    if shape in POLYGON_SHAPES:
        unit = _polygon(shape, rng)
        poly = [round(float(value), 2) for point in unit * (w, h) + (x0, y0) for value in point]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], size, size))
        return [poly], rle
    mask = _raster(shape, box, rng, size)
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}, rle


def _dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """``mask`` grown by ``pixels`` in the 8-neighbourhood (a square structuring element)."""
    grown = mask.copy()
    for _ in range(pixels):
        padded = np.pad(grown, 1)
        grown = np.zeros_like(grown)
        for dy in (0, 1, 2):
            for dx in (0, 1, 2):
                grown |= padded[dy:dy + mask.shape[0], dx:dx + mask.shape[1]]
    return grown


def _draw_object(rng: np.random.Generator, size: int, occupied: np.ndarray, wanted: str | None = None,
                 near: tuple[int, int, int] | None = None) -> dict | None:
    """Draw one object in a size range (``wanted``, or drawn from ``SIZE_PROBABILITIES``) whose mask keeps ``GAP``
    clear pixels from ``occupied`` (updated in place); None when no placement fits. ``near`` = (cx, cy, reach) puts
    the box's corner within ``reach`` pixels of (cx, cy) (a cluster)."""
    if wanted is None:
        wanted = str(rng.choice(list(SIZE_PROBABILITIES), p=list(SIZE_PROBABILITIES.values())))
    low, high = SIZE_RANGES[wanted]
    max_extent = size - 3  # leaves room for a 1-pixel margin and a placement choice
    shortest, longest = EXTENTS[wanted]
    longest = min(longest, max_extent)
    if shortest > longest:
        return None
    for _ in range(20):
        category_id, shape = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        w = int(rng.integers(shortest, longest + 1))
        h = int(np.clip(round(w * rng.uniform(0.75, 1.25)), shortest, max_extent))
        if near is None:
            x0, y0 = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
        else:
            cx, cy, reach = near
            x0 = int(np.clip(cx + rng.integers(-reach, reach + 1), 1, size - w - 1))
            y0 = int(np.clip(cy + rng.integers(-reach, reach + 1), 1, size - h - 1))
        segmentation, rle = _shape_segmentation(shape, (x0, y0, w, h), rng, size)
        area = int(mask_utils.area(rle))
        if not low <= area < high:
            continue
        mask = mask_utils.decode(rle).astype(bool)
        if (_dilate(mask, GAP) & occupied).any():
            continue
        occupied |= mask
        return {"category_id": category_id, "segmentation": segmentation, "area": area,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "mask": mask}
    return None


def _draw_objects(rng: np.random.Generator, size: int) -> list[dict]:
    """The objects of one image: a few anywhere, and with ``CLUSTER_PROBABILITY`` a cluster of small ones."""
    occupied = np.zeros((size, size), bool)
    objects = []
    for _ in range(int(rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1))):
        obj = _draw_object(rng, size, occupied)
        if obj is not None:
            objects.append(obj)
    if rng.uniform() < CLUSTER_PROBABILITY:
        cx, cy = (int(v) for v in rng.integers(4, size - 24, size=2))
        for _ in range(int(rng.integers(CLUSTER_SIZE[0], CLUSTER_SIZE[1] + 1))):
            obj = _draw_object(rng, size, occupied, "small", near=(cx, cy, 12))
            if obj is not None:
                objects.append(obj)
    return objects


def _object_colour(rng: np.random.Generator, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A colour at least ``MIN_CONTRAST`` from the mean background under ``mask`` (the best of a few draws)."""
    under = image[mask].mean(axis=0)
    best, best_distance = None, -1.0
    for _ in range(8):
        colour = rng.uniform(0, 1, size=3).astype(np.float32)
        distance = float(np.abs(colour - under).sum())
        if distance > best_distance:
            best, best_distance = colour, distance
        if distance >= MIN_CONTRAST:
            break
    return best


def _render_split(folder: Path, rng: np.random.Generator, image_ids: range, first_annotation_id: int,
                  size: int) -> dict:
    """Write the split's JPEGs into ``folder``; return its instances JSON (as a dict)."""
    images, annotations = [], []
    annotation_id = first_annotation_id
    for index, image_id in enumerate(image_ids):
        image = _background(rng, size)
        objects = _draw_objects(rng, size) if index % EMPTY_EVERY != EMPTY_EVERY - 1 else []
        for obj in objects:
            colour = _object_colour(rng, image, obj["mask"])
            fill = np.clip(colour + rng.normal(0, 0.05, size=(size, size, 3)), 0, 1).astype(np.float32)
            image[obj["mask"]] = fill[obj["mask"]]
            annotations.append({"id": annotation_id, "image_id": image_id, "category_id": obj["category_id"],
                                "segmentation": obj["segmentation"], "area": obj["area"], "bbox": obj["bbox"],
                                "iscrowd": 0})
            annotation_id += 1
        file_name = f"{image_id:012d}.jpg"
        encoded = io.BytesIO()
        Image.fromarray(np.round(image * 255).astype(np.uint8)).save(encoded, format="JPEG", quality=JPEG_QUALITY)
        (folder / file_name).write_bytes(encoded.getvalue())
        images.append({"id": image_id, "file_name": file_name, "width": size, "height": size})
    return {
        "info": {"description": "procedural shapes in COCO layout (tasks.detection.synthetic)",
                 "version": str(GENERATOR_VERSION)},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": "shape"} for cid, name in CATEGORIES],
    }


def _settings(seed: int, num_train: int, num_val: int, image_size: int) -> dict:
    return {"generator": "tasks.detection.synthetic", "version": GENERATOR_VERSION, "seed": seed,
            "num_train": num_train, "num_val": num_val, "image_size": image_size}


def _write(folder: Path, settings: dict) -> None:
    rng = np.random.default_rng(settings["seed"])
    (folder / "annotations").mkdir(parents=True)
    num_train = settings["num_train"]
    splits = {"train": range(1, num_train + 1), "val": range(num_train + 1, num_train + settings["num_val"] + 1)}
    annotation_id = 1
    for split, image_ids in splits.items():
        (folder / f"{split}2017").mkdir()
        instances = _render_split(folder / f"{split}2017", rng, image_ids, annotation_id, settings["image_size"])
        annotation_id += len(instances["annotations"])
        (folder / "annotations" / f"instances_{split}2017.json").write_text(
            json.dumps(instances, separators=(",", ":")))


def ensure_synthetic_coco(root: str | os.PathLike, seed: int = 0, num_train: int = 64, num_val: int = 16,
                          image_size: int = 160, version: int = GENERATOR_VERSION) -> Path:
    """Write the synthetic COCO-format dataset at ``root`` unless it is already there; return ``root`` as a Path.

    ``num_train`` / ``num_val`` images of ``image_size`` x ``image_size`` pixels. ``version``
    (``data.embedded.version``, so that it is part of a run's config) must be this generator's own. A ``root`` that
    already holds this generator's dataset with the same settings is reused as is; with other settings, or a folder
    holding anything else, ``FolderConflictError`` (a ValueError; delete it or choose another root). Read it with
    ``tasks.detection.data.CocoDetection(root, split)``.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {root!r} ({type(root).__name__})")
    if isinstance(version, bool) or version != GENERATOR_VERSION:
        raise ValueError(f"data.embedded.version={version!r}: this code writes version {GENERATOR_VERSION} of the "
                         "embedded detection data only (earlier versions are in the repository's history)")
    settings = _settings(check_int("seed", seed, 0), check_int("num_train", num_train, 1),
                         check_int("num_val", num_val, 1), check_int("image_size", image_size, 64))
    return ensure_generated_folder(root, settings, lambda folder: _write(folder, settings))
