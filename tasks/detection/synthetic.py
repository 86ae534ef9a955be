"""The embedded default for detection: a small procedural dataset in COCO 2017's own on-disk layout.

    root/train2017/000000000001.jpg ...      root/val2017/...
    root/annotations/instances_train2017.json, instances_val2017.json
    root/synthetic.json                      (the generator's settings; marks the folder as this dataset)

Images are textured backgrounds (a colour gradient, two sinusoidal gratings and noise) with non-overlapping shapes of
five categories, each instance with its mask. Category ids are not contiguous, as COCO's are not. Squares, triangles
and crosses are stored as polygons, discs and rings (which have a hole) as compressed RLE, so the loader meets both of
COCO's non-crowd encodings. Every annotation's ``area`` and ``bbox`` are those of its rasterised mask (pycocotools'
``area`` / ``toBbox``), and the image pixels are painted from that same mask. Object sizes are drawn from COCO's three
ranges (area < 32^2, 32^2..96^2, > 96^2; large objects need ``image_size`` >= 128); every eighth image has no object.

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

CATEGORIES = ((2, "disc"), (5, "square"), (11, "triangle"), (17, "ring"), (24, "cross"))
POLYGON_SHAPES = ("square", "triangle", "cross")
SIZE_RANGES = {"small": (16, 32 ** 2), "medium": (32 ** 2, 96 ** 2), "large": (96 ** 2, 1 << 30)}  # mask area
SIZE_PROBABILITIES = {"small": 0.4, "medium": 0.35, "large": 0.25}
GENERATOR_VERSION = 1
JPEG_QUALITY = 92
EMPTY_EVERY = 8  # image i (0-based) has no object when i % EMPTY_EVERY == EMPTY_EVERY - 1


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


def _shape_segmentation(shape: str, box: tuple[int, int, int, int], rng: np.random.Generator,
                        size: int) -> tuple[object, dict]:
    """(COCO segmentation, its compressed RLE) of ``shape`` inscribed in ``box`` = (x0, y0, w, h) on the image."""
    x0, y0, w, h = box
    x1, y1 = x0 + w, y0 + h
    if shape in POLYGON_SHAPES:
        if shape == "square":
            poly = [x0, y0, x1, y0, x1, y1, x0, y1]
        elif shape == "triangle":
            apex = x0 + rng.uniform(0.2, 0.8) * w
            poly = [x0, y1, x1, y1, apex, y0]
        else:  # cross: a plus sign with arms a third of the box wide
            a0, a1 = x0 + w / 3, x0 + 2 * w / 3
            b0, b1 = y0 + h / 3, y0 + 2 * h / 3
            poly = [a0, y0, a1, y0, a1, b0, x1, b0, x1, b1, a1, b1, a1, y1, a0, y1, a0, b1, x0, b1, x0, b0, a0, b0]
        poly = [round(float(v), 2) for v in poly]
        rle = mask_utils.merge(mask_utils.frPyObjects([poly], size, size))
        return [poly], rle
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    cx, cy, rx, ry = x0 + w / 2, y0 + h / 2, w / 2, h / 2
    radius = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2
    mask = radius <= 1.0
    if shape == "ring":
        mask &= radius >= rng.uniform(0.35, 0.55) ** 2
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [size, size], "counts": rle["counts"].decode("ascii")}, rle


def _draw_object(rng: np.random.Generator, size: int, taken: list[tuple[int, int, int, int]]) -> dict | None:
    """Draw one object in a size range, placed clear of ``taken`` boxes; None when no placement fits."""
    wanted = rng.choice(list(SIZE_PROBABILITIES), p=list(SIZE_PROBABILITIES.values()))
    low, high = SIZE_RANGES[str(wanted)]
    max_extent = size - 3  # leaves room for a 1-pixel margin and a placement choice
    shortest, longest = {"small": (5, 31), "medium": (34, 96), "large": (100, max_extent)}[str(wanted)]
    longest = min(longest, max_extent)
    if shortest > longest:
        return None
    for _ in range(20):
        category_id, shape = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        w = int(rng.integers(shortest, longest + 1))
        h = int(np.clip(round(w * rng.uniform(0.75, 1.25)), 4, max_extent))
        x0, y0 = int(rng.integers(1, size - w)), int(rng.integers(1, size - h))
        if any(x0 < bx + bw + 2 and bx < x0 + w + 2 and y0 < by + bh + 2 and by < y0 + h + 2
               for bx, by, bw, bh in taken):
            continue
        segmentation, rle = _shape_segmentation(shape, (x0, y0, w, h), rng, size)
        area = int(mask_utils.area(rle))
        if not low <= area < high:
            continue
        taken.append((x0, y0, w, h))
        return {"category_id": category_id, "segmentation": segmentation, "area": area,
                "bbox": [float(v) for v in mask_utils.toBbox(rle)], "mask": mask_utils.decode(rle).astype(bool)}
    return None


def _render_split(folder: Path, rng: np.random.Generator, image_ids: range, first_annotation_id: int,
                  size: int) -> dict:
    """Write the split's JPEGs into ``folder``; return its instances JSON (as a dict)."""
    images, annotations = [], []
    annotation_id = first_annotation_id
    for index, image_id in enumerate(image_ids):
        image = _background(rng, size)
        objects: list[dict] = []
        if index % EMPTY_EVERY != EMPTY_EVERY - 1:
            taken: list[tuple[int, int, int, int]] = []
            for _ in range(int(rng.integers(1, 7))):
                obj = _draw_object(rng, size, taken)
                if obj is not None:
                    objects.append(obj)
        for obj in objects:
            colour = rng.uniform(0, 1, size=3).astype(np.float32)
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
                          image_size: int = 160) -> Path:
    """Write the synthetic COCO-format dataset at ``root`` unless it is already there; return ``root`` as a Path.

    ``num_train`` / ``num_val`` images of ``image_size`` x ``image_size`` pixels. A ``root`` that already holds
    this generator's dataset with the same settings is reused as is; with other settings, or a folder holding
    anything else, ``FolderConflictError`` (a ValueError; delete it or choose another root). Read it with
    ``tasks.detection.data.CocoDetection(root, split)``.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a path, got {root!r} ({type(root).__name__})")
    settings = _settings(check_int("seed", seed, 0), check_int("num_train", num_train, 1),
                         check_int("num_val", num_val, 1), check_int("image_size", image_size, 64))
    return ensure_generated_folder(root, settings, lambda folder: _write(folder, settings))
