"""The detection task for the shared engine: config -> Faster / Mask R-CNN + COCO folders, torchvision's losses,
COCOeval AP (bbox, and segm for Mask R-CNN).

Metrics (``metrics.json``): ``bbox_AP``, ``bbox_AP50``, ``bbox_AP75``, ``bbox_APS``, ``bbox_APM``, ``bbox_APL``,
the same with ``segm_`` for Mask R-CNN, and ``images`` (how many validation images were scored). A size-range AP
that COCOeval leaves undefined (no ground-truth object of that size in the split) is left out rather than written
as a number.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.common.distributed import broadcast_object, gather_objects
from tasks.common.factories import build_operator
from tasks.common.resnet import RESNET_LAYERS, check_backbone_weights, load_backbone_weights
from tasks.common.speed import noise_image
from tasks.common.task import Task
from tasks.detection.data import CocoDetection, coco_paths, collate_detection
from tasks.detection.evaluation import collect_detections, summarize
from tasks.detection.model import ARCHS, LAYER_OF_STAGE, NORMS, build_detector
from tasks.detection.synthetic import CATEGORIES, ensure_synthetic_coco


class DetectionTask(Task):
    primary_metric = "bbox_AP"
    hash_defaults: ClassVar[dict[str, Any]] = {"model.dcn_stages": []}   # added with CARAFE++ Table I's DCNv2 backbones
    dataset_name = "COCO 2017"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m = cfg.model
        if m.arch not in ARCHS:
            raise ValueError(f"model.arch={m.arch!r} is not one of {', '.join(ARCHS)}")
        if m.depth not in RESNET_LAYERS:
            raise ValueError(f"model.depth={m.depth!r} is not one of {sorted(RESNET_LAYERS)}")
        if m.norm not in NORMS:
            raise ValueError(f"model.norm={m.norm!r} is not one of {', '.join(NORMS)}")
        unknown_stages = sorted(set(m.dcn_stages) - set(LAYER_OF_STAGE))
        if unknown_stages:
            raise ValueError(f"model.dcn_stages has {unknown_stages}; choose among {sorted(LAYER_OF_STAGE)}, "
                             "e.g. model.dcn_stages=[c3,c4,c5]")
        if not 0 <= m.trainable_backbone_layers <= 5:
            raise ValueError(f"model.trainable_backbone_layers must be in [0, 5], got {m.trainable_backbone_layers}")
        check_backbone_weights(m.backbone_weights)
        if m.norm == "frozen_bn" and not m.backbone_weights:
            raise ValueError("model.norm=frozen_bn without model.backbone_weights would leave a randomly "
                             "initialised ResNet without normalisation: give ImageNet weights with "
                             "model.backbone_weights=<path>, or train the BatchNorm with model.norm=bn")
        if not 0 <= cfg.task.mask_threshold <= 1:
            raise ValueError(f"task.mask_threshold must be in [0, 1], got {cfg.task.mask_threshold}")

    @property
    def with_masks(self) -> bool:
        return self.cfg.model.arch == "mask_rcnn"

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.with_masks else ("bbox",)

    def check_dataset(self, root: Path) -> None:
        for split in ("train", "val"):
            coco_paths(root, split)

    def write_embedded_dataset(self, embedded: Any) -> None:
        self.require_embedded_classes(len(CATEGORIES) + 1, f"{len(CATEGORIES)} categories (+ background = "
                                                           f"{len(CATEGORIES) + 1})")
        ensure_synthetic_coco(embedded.dir, embedded.seed, embedded.num_train, embedded.num_val, embedded.image_size,
                              embedded.version)

    def describe_embedded_dataset(self, embedded: Any) -> str:
        return (f"embedded COCO-format default ({len(CATEGORIES)} categories, {embedded.image_size} px, "
                f"{embedded.num_train}/{embedded.num_val} train/val images, seed {embedded.seed}, "
                f"version {embedded.version})")

    def build_model(self) -> nn.Module:
        m = self.cfg.model
        downsampler = self.cfg.get("downsampler")
        model = build_detector(
            arch=m.arch, depth=m.depth, num_classes=self.cfg.data.num_classes,
            fpn_upsampler=build_operator(self.cfg.fpn_upsampler, "fpn_upsampler"),
            mask_upsampler=build_operator(self.cfg.mask_upsampler, "mask_upsampler") if self.with_masks else None,
            backbone_downsampler=build_operator(downsampler, "downsampler"),
            min_size=m.min_size, max_size=m.max_size, size_divisible=m.size_divisible,
            trainable_backbone_layers=m.trainable_backbone_layers, norm=m.norm, dcn_stages=list(m.dcn_stages),
            **(m.options or {}))
        if m.backbone_weights:
            self.loaded_weights = {"path": str(m.backbone_weights),
                                   "sha256": load_backbone_weights(model.backbone.body, m.backbone_weights)}
        return model

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.cfg.data
        train = CocoDetection(self.root, "train", with_masks=self.with_masks, flip_prob=data.flip_prob)
        val = CocoDetection(self.root, "val", with_masks=False, train=False)
        if train.num_classes != data.num_classes:
            raise ValueError(f"{self.root} has {train.num_classes - 1} categories (+ background = "
                             f"{train.num_classes}) but data.num_classes={data.num_classes}")
        return train, val

    def image_files(self, dataset: Dataset) -> list[Path]:
        return dataset.image_paths()

    def collate_fn(self) -> Callable | None:
        return collate_detection

    def train_step(self, model: nn.Module, batch: tuple[list, list]) -> dict[str, torch.Tensor]:
        images, targets = batch
        losses = model(images, targets)
        return {"loss": sum(losses.values()), **losses}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        dataset = loader.dataset
        results, image_ids = collect_detections(model, loader, dataset.label_to_category, self.iou_types,
                                                self.world.device, self.cfg.task.mask_threshold)
        shards = gather_objects((results, image_ids))
        metrics: dict[str, float] = {}
        if self.world.is_main:
            all_ids = [i for _, ids in shards for i in ids]
            if not all_ids:
                raise ValueError("the validation set is empty")
            for iou_type in self.iou_types:
                entries = [e for shard, _ in shards for e in shard[iou_type]]
                for name, value in summarize(dataset.coco, entries, iou_type, all_ids).items():
                    if not math.isnan(value):  # undefined: no ground truth of that size in the split
                        metrics[f"{iou_type}_{name}"] = value
            metrics["images"] = float(len(set(all_ids)))
        return broadcast_object(metrics)

    def inference_input(self, height: int, width: int) -> Any:
        """A list of one noise image: torchvision's detectors take lists of Tensor[3, H, W]."""
        return [noise_image(height, width).to(self.world.device)]
