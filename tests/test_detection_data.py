"""COCO data: the synthetic default (layout, determinism, categories, sizes, atomic writing) and the loader (labels,
masks against boxes, crowd / degenerate / empty handling, flips, missing paths), checked against the JSON itself."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from PIL import Image

from tasks.detection import synthetic
from tasks.detection.data import CocoDetection, category_to_label, collate_detection, load_coco
from tasks.detection.synthetic import ensure_synthetic_coco

SETTINGS = {"seed": 3, "num_train": 24, "num_val": 8, "image_size": 160}


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_synthetic_coco(tmp_path_factory.mktemp("coco") / "synthetic", **SETTINGS)


def _instances(root: Path, split: str) -> dict:
    return json.loads((root / "annotations" / f"instances_{split}2017.json").read_text())


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---- the synthetic dataset ------------------------------------------------------------------------------------

def test_synthetic_layout(synthetic_root: Path) -> None:
    assert (synthetic_root / "train2017").is_dir() and (synthetic_root / "val2017").is_dir()
    for split, count in (("train", SETTINGS["num_train"]), ("val", SETTINGS["num_val"])):
        data = _instances(synthetic_root, split)
        assert set(data) >= {"images", "annotations", "categories"}
        assert len(data["images"]) == count
        on_disk = {p.name for p in (synthetic_root / f"{split}2017").iterdir()}
        assert on_disk == {im["file_name"] for im in data["images"]}
        for im in data["images"][:3]:
            with Image.open(synthetic_root / f"{split}2017" / im["file_name"]) as pixels:
                assert pixels.format == "JPEG" and pixels.mode == "RGB"
                assert pixels.size == (im["width"], im["height"])
        for ann in data["annotations"]:
            assert ann["iscrowd"] == 0
            assert set(ann) >= {"id", "image_id", "category_id", "segmentation", "area", "bbox"}
    train_ids = {im["id"] for im in _instances(synthetic_root, "train")["images"]}
    val_ids = {im["id"] for im in _instances(synthetic_root, "val")["images"]}
    assert not train_ids & val_ids


def test_synthetic_categories_are_not_contiguous(synthetic_root: Path) -> None:
    ids = sorted(c["id"] for c in _instances(synthetic_root, "train")["categories"])
    assert len(ids) >= 4
    assert ids != list(range(1, len(ids) + 1))
    used = {a["category_id"] for split in ("train", "val") for a in _instances(synthetic_root, split)["annotations"]}
    assert used == set(ids)


def test_synthetic_sizes_span_coco_ranges_and_some_images_are_empty(synthetic_root: Path) -> None:
    for split in ("train", "val"):
        data = _instances(synthetic_root, split)
        areas = [a["area"] for a in data["annotations"]]
        assert any(a < 32 ** 2 for a in areas) and any(32 ** 2 <= a < 96 ** 2 for a in areas), split
        with_objects = {a["image_id"] for a in data["annotations"]}
        assert len(with_objects) < len(data["images"]), f"{split}: no image without objects"
    train_areas = [a["area"] for a in _instances(synthetic_root, "train")["annotations"]]
    assert any(a > 96 ** 2 for a in train_areas)


def test_synthetic_annotations_agree_with_their_masks(synthetic_root: Path) -> None:
    data = _instances(synthetic_root, "train")
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    kinds = set()
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        kinds.add("polygon" if isinstance(seg, list) else "rle")
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        mask = mask_utils.decode(rle)
        ys, xs = np.nonzero(mask)
        assert ann["area"] == mask.sum()
        assert ann["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
    assert kinds == {"polygon", "rle"}


def test_synthetic_is_deterministic(tmp_path: Path, synthetic_root: Path) -> None:
    again = ensure_synthetic_coco(tmp_path / "again", **SETTINGS)
    assert _files(again) == _files(synthetic_root)
    other = ensure_synthetic_coco(tmp_path / "other", **{**SETTINGS, "seed": 4, "num_train": 2, "num_val": 1})
    assert _files(other)["annotations/instances_val2017.json"] != _files(again)[
        "annotations/instances_val2017.json"]


def test_synthetic_is_reused_and_checked(tmp_path: Path, synthetic_root: Path) -> None:
    marker = synthetic_root / "train2017" / "000000000001.jpg"
    stamp = marker.stat().st_mtime_ns
    assert ensure_synthetic_coco(synthetic_root, **SETTINGS) == synthetic_root
    assert marker.stat().st_mtime_ns == stamp  # reused, not rewritten
    with pytest.raises(ValueError, match="other settings|written with"):
        ensure_synthetic_coco(synthetic_root, **{**SETTINGS, "seed": 9})
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        ensure_synthetic_coco(foreign)
    empty = tmp_path / "empty"
    empty.mkdir()
    ensure_synthetic_coco(empty, seed=0, num_train=2, num_val=1, image_size=64)
    assert (empty / "annotations" / "instances_val2017.json").is_file()


def test_synthetic_interrupted_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = synthetic._render_split
    calls = []

    def fail_on_second_split(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_render_split", fail_on_second_split)
    root = tmp_path / "coco"
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_coco(root, seed=0, num_train=2, num_val=1, image_size=64)
    assert len(calls) == 2  # the train split was written before the interruption
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "_render_split", real)
    ensure_synthetic_coco(root, seed=0, num_train=2, num_val=1, image_size=64)
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "synthetic.json", "train2017", "val2017"]


@pytest.mark.parametrize("kwargs,error", [
    ({"seed": -1}, ValueError), ({"num_train": 0}, ValueError), ({"image_size": 32}, ValueError),
    ({"image_size": 96.0}, TypeError), ({"root": 5}, TypeError),
])
def test_synthetic_bad_arguments(tmp_path: Path, kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error, match=str(next(iter(kwargs.values())))):
        ensure_synthetic_coco(**{"root": tmp_path / "x", **kwargs})


def _masks_by_image(data: dict) -> dict[int, list[tuple[str, np.ndarray]]]:
    names = {c["id"]: c["name"] for c in data["categories"]}
    sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
    masks: dict[int, list[tuple[str, np.ndarray]]] = {im["id"]: [] for im in data["images"]}
    for ann in data["annotations"]:
        h, w = sizes[ann["image_id"]]
        seg = ann["segmentation"]
        rle = mask_utils.merge(mask_utils.frPyObjects(seg, h, w)) if isinstance(seg, list) else seg
        masks[ann["image_id"]].append((names[ann["category_id"]], mask_utils.decode(rle).astype(bool)))
    return masks


def _runs(line: np.ndarray) -> int:
    """How many separate runs of True a 1-D bool array has."""
    return int(np.count_nonzero(np.diff(np.concatenate([[0], line.astype(np.int8), [0]])) == 1))


def _has_hole(mask: np.ndarray) -> bool:
    """Whether some background pixel is cut off from the image border (4-connected flood fill from the border)."""
    outside = np.zeros_like(mask)
    stack = [(y, x) for y in range(mask.shape[0]) for x in (0, mask.shape[1] - 1)]
    stack += [(y, x) for x in range(mask.shape[1]) for y in (0, mask.shape[0] - 1)]
    while stack:
        y, x = stack.pop()
        if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and not mask[y, x] and not outside[y, x]:
            outside[y, x] = True
            stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return bool((~mask & ~outside).any())


def test_synthetic_shapes_have_holes_concavities_and_thin_parts(synthetic_root: Path) -> None:
    """Version 2's point: each category's masks have the structure named for it, checked on the decoded masks of
    every object at least 16 px across (smaller ones are a handful of pixels)."""
    checked = set()
    images = [objects for split in ("train", "val") for objects in _masks_by_image(_instances(synthetic_root,
                                                                                               split)).values()]
    for objects in images:
        for name, mask in objects:
            ys, xs = np.nonzero(mask)
            if min(np.ptp(ys), np.ptp(xs)) < 16:
                continue
            mask = np.pad(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1], 1)  # the box and a border
            rows = max(_runs(row) for row in mask)
            cols = max(_runs(col) for col in mask.T)
            if name == "disc":
                assert rows == cols == 1 and not _has_hole(mask)
            elif name == "ring":
                assert _has_hole(mask)
            elif name == "comb":  # three or four prongs: a scanline across them crosses each
                assert max(rows, cols) >= 3 and not _has_hole(mask)
            elif name in ("star", "crescent"):  # a concavity: some scanline leaves the shape and re-enters
                assert max(rows, cols) >= 2 and not _has_hole(mask), name
            elif name == "cross":  # arms at most a third of the box wide
                assert rows == cols == 1 and mask.sum() < 0.6 * (np.ptp(ys) + 1) * (np.ptp(xs) + 1)
            checked.add(name)
    assert checked == {name for _, name in synthetic.CATEGORIES}


def test_synthetic_masks_keep_a_clear_pixel_and_small_objects_cluster(synthetic_root: Path) -> None:
    """No two masks of an image are 8-neighbours (brute force over pixel pairs), while some boxes come closer than
    version 1's two-pixel box gap: overlapping (an object in another's hole or concavity) or a pixel apart."""
    closest_box_gap = 1 << 30
    for objects in _masks_by_image(_instances(synthetic_root, "train")).values():
        points = [np.argwhere(mask) for _, mask in objects]
        for i in range(len(points)):
            for j in range(i + 1, len(points)):
                chebyshev = np.abs(points[i][:, None, :] - points[j][None, :, :]).max(-1).min()
                assert chebyshev >= 2
                low = np.maximum(points[i].min(0), points[j].min(0))
                high = np.minimum(points[i].max(0), points[j].max(0))
                closest_box_gap = min(closest_box_gap, int((low - high).max()) - 1)  # < 0: the boxes overlap
    assert closest_box_gap < 2


def test_synthetic_version_is_checked(tmp_path: Path) -> None:
    assert synthetic.GENERATOR_VERSION == 2
    with pytest.raises(ValueError, match="version=1"):
        ensure_synthetic_coco(tmp_path / "v1", seed=0, num_train=2, num_val=1, image_size=64, version=1)
    assert not (tmp_path / "v1").exists()


# ---- the loader -----------------------------------------------------------------------------------------------

def _tight_box(mask: torch.Tensor) -> list[float]:
    ys, xs = torch.nonzero(mask, as_tuple=True)
    return [xs.min().item(), ys.min().item(), xs.max().item() + 1.0, ys.max().item() + 1.0]


def test_loader_reads_synthetic_with_masks_matching_boxes(synthetic_root: Path) -> None:
    dataset = CocoDetection(synthetic_root, "val", with_masks=True)
    data = _instances(synthetic_root, "val")
    assert len(dataset) == len(data["images"])  # evaluation keeps images without objects
    cat_ids = sorted(c["id"] for c in data["categories"])
    assert dataset.category_to_label == {cid: i + 1 for i, cid in enumerate(cat_ids)}
    assert dataset.num_classes == len(cat_ids) + 1
    by_image: dict[int, list[dict]] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    for index in range(len(dataset)):
        image, target = dataset[index]
        anns = by_image.get(target["image_id"], [])
        assert image.dtype == torch.float32 and image.shape == (3, 160, 160)
        assert 0 <= image.min() and image.max() <= 1
        assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (len(anns), 160, 160)
        assert target["labels"].tolist() == [dataset.category_to_label[a["category_id"]] for a in anns]
        for ann, box, mask in zip(anns, target["boxes"], target["masks"]):
            x, y, w, h = ann["bbox"]
            assert box.tolist() == [x, y, x + w, y + h]
            assert _tight_box(mask) == box.tolist()
            assert mask.sum().item() == ann["area"]


def test_training_split_drops_empty_images_and_flips(synthetic_root: Path) -> None:
    plain = CocoDetection(synthetic_root, "train", with_masks=True, flip_prob=0.0)
    flipped = CocoDetection(synthetic_root, "train", with_masks=True, flip_prob=1.0)
    data = _instances(synthetic_root, "train")
    with_objects = sorted({a["image_id"] for a in data["annotations"]})
    assert plain.train and plain.image_ids == with_objects
    for index in range(3):
        image, target = plain[index]
        image_f, target_f = flipped[index]
        width = image.shape[-1]
        torch.testing.assert_close(image_f, image.flip(-1))
        torch.testing.assert_close(target_f["masks"], target["masks"].flip(-1))
        x1, y1, x2, y2 = target["boxes"].unbind(1)
        torch.testing.assert_close(target_f["boxes"], torch.stack([width - x2, y1, width - x1, y2], 1))
        for box, mask in zip(target_f["boxes"], target_f["masks"]):
            assert _tight_box(mask) == box.tolist()
        torch.testing.assert_close(target_f["labels"], target["labels"])


def _write_handmade_coco(root: Path) -> None:
    """Two 20 x 30 images: one with a crowd region, a zero-width box and a normal object; one with only a crowd."""
    for split in ("train", "val"):
        (root / f"{split}2017").mkdir(parents=True)
        for name in ("a.png", "b.png"):  # grayscale, as some COCO images are: the loader gives 3 channels
            Image.fromarray(np.full((20, 30), 100, dtype=np.uint8)).save(root / f"{split}2017" / name)
    crowd_mask = np.zeros((20, 30), np.uint8, order="F")
    crowd_mask[2:6, 3:9] = 1
    crowd = mask_utils.encode(crowd_mask)
    uncompressed = {"size": [20, 30], "counts": _uncompressed_counts(crowd_mask)}
    annotations = [
        {"id": 1, "image_id": 10, "category_id": 7, "bbox": [3, 2, 6, 4], "area": 24.0, "iscrowd": 1,
         "segmentation": uncompressed},
        {"id": 2, "image_id": 10, "category_id": 3, "bbox": [12, 5, 0, 4], "area": 0.0, "iscrowd": 0,
         "segmentation": [[12, 5, 12, 5, 12, 9, 12, 9]]},
        {"id": 3, "image_id": 10, "category_id": 3, "bbox": [10, 8, 10, 6], "area": 60.0, "iscrowd": 0,
         "segmentation": [[10, 8, 20, 8, 20, 14, 10, 14]]},
        {"id": 4, "image_id": 11, "category_id": 7, "bbox": [3, 2, 6, 4], "area": 24.0, "iscrowd": 1,
         "segmentation": uncompressed},
    ]
    assert mask_utils.area(crowd) == 24
    instances = {"images": [{"id": 10, "file_name": "a.png", "height": 20, "width": 30},
                            {"id": 11, "file_name": "b.png", "height": 20, "width": 30}],
                 "annotations": annotations,
                 "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}
    (root / "annotations").mkdir()
    for split in ("train", "val"):
        (root / "annotations" / f"instances_{split}2017.json").write_text(json.dumps(instances))


def _uncompressed_counts(mask: np.ndarray) -> list[int]:
    """COCO's uncompressed RLE (crowd regions): run lengths of the column-major mask, starting with zeros."""
    flat = mask.flatten(order="F")
    counts, current, run = [], 0, 0
    for value in flat:
        if value == current:
            run += 1
        else:
            counts.append(run)
            current, run = value, 1
    counts.append(run)
    return counts


def test_crowd_and_degenerate_annotations(tmp_path: Path) -> None:
    _write_handmade_coco(tmp_path)
    train = CocoDetection(tmp_path, "train", with_masks=True, flip_prob=0.0)
    assert train.image_ids == [10]  # image 11 has only a crowd region: no usable object for training
    image, target = train[0]
    assert image.shape == (3, 20, 30) and torch.allclose(image, torch.tensor(100 / 255))
    assert target["boxes"].tolist() == [[10.0, 8.0, 20.0, 14.0]]  # the crowd and the zero-width box are gone
    assert target["labels"].tolist() == [1]  # category 3 -> label 1, category 7 -> label 2
    assert target["masks"].shape == (1, 20, 30) and target["masks"][0, 8:14, 10:20].all()
    val = CocoDetection(tmp_path, "val", with_masks=True)
    assert val.image_ids == [10, 11] and not val.train
    _, target = val[0]
    assert target["iscrowd"].tolist() == [1, 0] and target["labels"].tolist() == [2, 1]
    assert target["masks"][0].sum().item() == 24 and target["masks"][0, 2:6, 3:9].all()
    _, crowd_only = val[1]
    assert crowd_only["boxes"].shape == (1, 4)
    forced = CocoDetection(tmp_path, "train", drop_images_without_objects=False)
    _, empty = forced[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert category_to_label(load_coco(tmp_path / "annotations" / "instances_val2017.json")) == {3: 1, 7: 2}


def test_missing_dataset_names_the_layout(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train2017.*annotations/instances_train2017\.json"):
        CocoDetection(tmp_path / "nowhere", "train")
    (tmp_path / "val2017").mkdir()
    with pytest.raises(FileNotFoundError, match="instances_val2017.json"):
        CocoDetection(tmp_path, "val")
    with pytest.raises(ValueError, match="test"):
        CocoDetection(tmp_path, "test")


def test_bad_flip_probability(synthetic_root: Path) -> None:
    with pytest.raises(ValueError, match="1.5"):
        CocoDetection(synthetic_root, "train", flip_prob=1.5)


def test_collate_and_data_loader(synthetic_root: Path) -> None:
    dataset = CocoDetection(synthetic_root, "val")
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 3
    assert [t["image_id"] for t in targets] == dataset.image_ids[:3]
    assert "masks" not in targets[0]
    with pytest.raises(TypeError, match="pairs"):
        collate_detection([torch.zeros(3)])
    assert math.isclose(sum(len(b[0]) for b in loader), len(dataset))
