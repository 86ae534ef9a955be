"""COCO evaluation: ``coco_evaluate`` on a hand-made ground truth gives exactly what pycocotools' COCOeval gives on a
results file written here by hand (xywh boxes, category ids, RLE of the intended masks), 100 AP for perfect
predictions, 0 AP without detections; plus the speed measurement and a real detector end to end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pycocotools.mask as mask_utils
import pytest
import torch
from pycocotools.cocoeval import COCOeval
from torch import nn

from tasks.detection.data import CocoDetection, collate_detection, load_coco
from tasks.detection.evaluation import METRICS, coco_evaluate, detections_to_coco, measure_inference_speed
from tasks.detection.model import build_detector
from tasks.detection.synthetic import ensure_synthetic_coco

CATEGORY_IDS = (4, 9)  # labels 1 and 2
IMAGES = {1: (40, 60), 2: (80, 90), 3: (120, 120)}  # image id -> (H, W)
# Ground truth rectangles (image id, category id, x, y, w, h): small, medium and large objects.
GT_BOXES = [(1, 4, 5, 5, 10, 8), (1, 9, 30, 10, 20, 20), (1, 4, 40, 28, 12, 10),
            (2, 9, 10, 10, 40, 35), (2, 4, 60, 50, 25, 25), (2, 9, 5, 60, 12, 12),
            (3, 4, 10, 10, 100, 100), (3, 9, 112, 3, 6, 6)]


def _rectangle(h: int, w: int, x: float, y: float, bw: float, bh: float) -> np.ndarray:
    mask = np.zeros((h, w), np.uint8)
    mask[math.floor(y):math.ceil(y + bh), math.floor(x):math.ceil(x + bw)] = 1
    return mask


@pytest.fixture(scope="module")
def coco_gt(tmp_path_factory: pytest.TempPathFactory):
    annotations = []
    for ann_id, (image_id, category_id, x, y, w, h) in enumerate(GT_BOXES, start=1):
        annotations.append({"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h],
                            "area": float(w * h), "iscrowd": 0,
                            "segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    data = {"images": [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in IMAGES.items()],
            "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in CATEGORY_IDS]}
    path = tmp_path_factory.mktemp("gt") / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return load_coco(path)


class ReplayModel(nn.Module):
    """Returns prepared detections, one dict per image, in the order the loader yields the images."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.outputs = list(outputs)

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        assert not self.training, "coco_evaluate must put the model in eval mode"
        out = [self.outputs.pop(0) for _ in images]
        for image, o in zip(images, out):
            if "masks" in o:
                assert o["masks"].shape[-2:] == image.shape[-2:]
        return out


def _loader(image_ids: list[int], batch_size: int = 2) -> list[tuple[list[torch.Tensor], list[dict]]]:
    items = [(torch.zeros(3, *IMAGES[i]), {"image_id": i}) for i in image_ids]
    return [collate_detection(items[k:k + batch_size]) for k in range(0, len(items), batch_size)]


def _predictions(seed: int = 0) -> dict[int, list[tuple[int, list[float], float, np.ndarray]]]:
    """Per image: (category id, xywh box, score, intended binary mask): jittered ground truth, wrong classes, false
    positives. Coordinates are multiples of 1/4 and scores of 1/64, exact in float32 as in float64."""
    rng = np.random.default_rng(seed)
    preds: dict[int, list] = {i: [] for i in IMAGES}
    for image_id, category_id, x, y, w, h in GT_BOXES:
        jitter = rng.integers(-8, 9, size=4) / 4
        box = [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)]
        if rng.random() < 0.25:
            category_id = CATEGORY_IDS[1 - CATEGORY_IDS.index(category_id)]
        preds[image_id].append((category_id, box, int(rng.integers(8, 64)) / 64, None))
    for image_id, (h, w) in IMAGES.items():
        for _ in range(2):
            bw, bh = int(rng.integers(4, w // 2)), int(rng.integers(4, h // 2))
            box = [float(rng.integers(0, w - bw)), float(rng.integers(0, h - bh)), float(bw), float(bh)]
            preds[image_id].append((int(rng.choice(CATEGORY_IDS)), box, int(rng.integers(1, 40)) / 64, None))
    for image_id, entries in preds.items():
        h, w = IMAGES[image_id]
        preds[image_id] = [(c, b, s, _rectangle(h, w, *b)) for c, b, s, _ in entries]
    return preds


def _as_model_output(entries: list, h: int, w: int) -> dict:
    """What a torchvision detector returns for ``entries``: xyxy boxes, contiguous labels, mask probabilities
    (0.9 inside, 0.1 outside; one inside pixel at exactly the 0.5 threshold, one outside pixel just below it)."""
    label = {c: i + 1 for i, c in enumerate(sorted(CATEGORY_IDS))}
    probabilities = []
    for _, _, _, mask in entries:
        p = np.where(mask > 0, 0.9, 0.1).astype(np.float32)
        inside, outside = np.argwhere(mask > 0), np.argwhere(mask == 0)
        p[tuple(inside[0])] = 0.5
        p[tuple(outside[-1])] = 0.4999
        probabilities.append(p)
    return {
        "boxes": torch.tensor([[x, y, x + bw, y + bh] for _, (x, y, bw, bh), _, _ in entries],
                              dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor([label[c] for c, _, _, _ in entries], dtype=torch.int64),
        "scores": torch.tensor([s for _, _, s, _ in entries], dtype=torch.float32),
        "masks": torch.from_numpy(np.stack(probabilities)[:, None]) if probabilities else torch.zeros(0, 1, h, w),
    }


def _cocoeval_on_file(coco_gt, results: list[dict], iou_type: str, path: Path) -> dict[str, float]:
    path.write_text(json.dumps(results))
    evaluator = COCOeval(coco_gt, coco_gt.loadRes(str(path)), iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return dict(zip(METRICS, (100 * v for v in evaluator.stats[:6])))


def test_matches_cocoeval_on_handwritten_results(coco_gt, tmp_path: Path) -> None:
    preds = _predictions()
    image_ids = sorted(IMAGES)
    outputs = [_as_model_output(preds[i], *IMAGES[i]) for i in image_ids]
    got = coco_evaluate(ReplayModel(outputs), _loader(image_ids), coco_gt, iou_types=("bbox", "segm"))

    bbox_results, segm_results = [], []
    for image_id in image_ids:
        for category_id, box, score, mask in preds[image_id]:
            bbox_results.append({"image_id": image_id, "category_id": category_id, "bbox": box, "score": score})
            rle = mask_utils.encode(np.asfortranarray(mask))
            segm_results.append({"image_id": image_id, "category_id": category_id, "score": score,
                                 "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}})
    want = {"bbox": _cocoeval_on_file(coco_gt, bbox_results, "bbox", tmp_path / "bbox.json"),
            "segm": _cocoeval_on_file(coco_gt, segm_results, "segm", tmp_path / "segm.json")}
    assert got == want
    assert 0 < got["bbox"]["AP"] < 100 and 0 < got["segm"]["AP"] < 100  # a case that says something
    assert all(not math.isnan(v) for v in got["bbox"].values())


def _perfect_outputs(coco_gt, image_ids: list[int]) -> list[dict]:
    outputs = []
    for image_id in image_ids:
        anns = coco_gt.imgToAnns[image_id]
        entries = [(a["category_id"], a["bbox"], 1.0, coco_gt.annToMask(a)) for a in anns]
        outputs.append(_as_model_output(entries, *IMAGES[image_id]))
    return outputs


def test_perfect_predictions_give_100(coco_gt) -> None:
    image_ids = sorted(IMAGES)
    got = coco_evaluate(ReplayModel(_perfect_outputs(coco_gt, image_ids)), _loader(image_ids, batch_size=3),
                        coco_gt, iou_types=("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        assert got[iou_type] == pytest.approx({name: 100.0 for name in METRICS}, abs=1e-9), iou_type


def test_only_the_visited_images_are_evaluated(coco_gt) -> None:
    got = coco_evaluate(ReplayModel(_perfect_outputs(coco_gt, [1, 2])), _loader([1, 2]), coco_gt)
    assert set(got) == {"bbox"}
    assert got["bbox"]["AP"] == pytest.approx(100.0, abs=1e-9)
    assert math.isnan(got["bbox"]["APL"])  # no large object in images 1 and 2: undefined, not 0


def test_no_detections_give_zero(coco_gt) -> None:
    empty = [_as_model_output([], *IMAGES[i]) for i in sorted(IMAGES)]
    got = coco_evaluate(ReplayModel(empty), _loader(sorted(IMAGES)), coco_gt, iou_types=("bbox", "segm"))
    assert got == {"bbox": {name: 0.0 for name in METRICS}, "segm": {name: 0.0 for name in METRICS}}


def test_detections_to_coco_conversion() -> None:
    mask = torch.zeros(1, 1, 4, 5)
    mask[0, 0, 1:3, 2:4] = 0.7
    mask[0, 0, 0, 0] = 0.5
    output = {"boxes": torch.tensor([[1.0, 2.0, 5.0, 10.0]]), "labels": torch.tensor([2]),
              "scores": torch.tensor([0.25]), "masks": mask}
    got = detections_to_coco(output, 7, {1: 4, 2: 9}, ("bbox", "segm"))
    assert got["bbox"] == [{"image_id": 7, "category_id": 9, "bbox": [1.0, 2.0, 4.0, 8.0], "score": 0.25}]
    (segm,) = got["segm"]
    assert segm["category_id"] == 9 and segm["score"] == 0.25 and isinstance(segm["segmentation"]["counts"], str)
    want = np.zeros((4, 5), np.uint8)
    want[1:3, 2:4] = 1
    want[0, 0] = 1
    np.testing.assert_array_equal(mask_utils.decode(segm["segmentation"]), want)
    with pytest.raises(ValueError, match=r"\[3\]"):
        detections_to_coco({**output, "labels": torch.tensor([3])}, 7, {1: 4, 2: 9})
    with pytest.raises(ValueError, match="masks"):
        detections_to_coco({k: v for k, v in output.items() if k != "masks"}, 7, {1: 4, 2: 9}, ("segm",))


def test_bad_iou_types(coco_gt) -> None:
    for bad in (("keypoints",), "bbox", ()):
        with pytest.raises(ValueError, match="iou_types"):
            coco_evaluate(ReplayModel([]), _loader([1]), coco_gt, iou_types=bad)


class SleepyModel(nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.calls = seconds, []

    def forward(self, images: list[torch.Tensor]) -> list[dict]:
        self.calls.append(tuple(images[0].shape))
        time.sleep(self.seconds)
        return [{}]


def test_measure_inference_speed() -> None:
    model = SleepyModel(0.01)
    model.train()
    speed = measure_inference_speed(model, image_size=(30, 40), warmup=2, iterations=5)
    assert len(model.calls) == 7 and set(model.calls) == {(3, 30, 40)} and not model.training
    assert 0 < speed.images_per_second <= 100.0 and speed.images_per_second > 20
    ips, device = speed
    assert ips == speed.images_per_second and isinstance(device, str) and device
    with pytest.raises(ValueError, match="image_size"):
        measure_inference_speed(model, image_size=(30,))
    with pytest.raises(ValueError, match="iterations"):
        measure_inference_speed(model, image_size=(30, 40), iterations=0)


def test_real_detector_end_to_end(tmp_path: Path) -> None:
    root = ensure_synthetic_coco(tmp_path / "coco", seed=1, num_train=1, num_val=3, image_size=96)
    dataset = CocoDetection(root, "val", with_masks=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=collate_detection)
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", num_classes=dataset.num_classes, fpn_upsampler="carafe",
                           mask_upsampler="carafe", min_size=96, max_size=96, box_detections_per_img=5,
                           rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    got = coco_evaluate(model, loader, dataset.coco, iou_types=("bbox", "segm"))
    for iou_type in ("bbox", "segm"):
        assert set(got[iou_type]) == set(METRICS)
        assert all(math.isnan(v) or 0 <= v <= 100 for v in got[iou_type].values())
