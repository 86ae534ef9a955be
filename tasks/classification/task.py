"""The classification task for the shared engine: config -> ResNet + ImageNet folders, cross-entropy, top-1/5."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.classification.data import (CLASS_NAMES, build_imagenet, check_imagenet_layout,
                                       ensure_synthetic_imagenet, topk_correct)
from tasks.classification.model import build_classifier
from tasks.common.distributed import all_reduce_sum
from tasks.common.factories import build_operator
from tasks.common.task import Task


class ClassificationTask(Task):
    """ImageNet classification (CARAFE++ Tables II, XII). The template for a new task: a ``Task`` subclass named by
    ``_target_`` in ``conf/task/<name>.yaml``, which turns the config into plain keyword arguments for its model
    (``model.py``) and datasets (``data.py``), says what a batch's loss is and what the metrics are."""

    primary_metric = "top1"
    dataset_name = "ImageNet"

    def check_dataset(self, root: Path) -> None:
        check_imagenet_layout(root)

    def write_embedded_dataset(self, embedded: Any) -> None:
        self.require_embedded_classes(len(CLASS_NAMES), f"{len(CLASS_NAMES)} classes")
        ensure_synthetic_imagenet(embedded.dir, embedded.seed, embedded.train_per_class, embedded.val_per_class,
                                  embedded.image_size)

    def describe_embedded_dataset(self, embedded: Any) -> str:
        return (f"embedded ImageNet-layout default ({len(CLASS_NAMES)} classes, {embedded.image_size} px, "
                f"{embedded.train_per_class}/{embedded.val_per_class} train/val images per class, "
                f"seed {embedded.seed})")

    def build_model(self) -> nn.Module:
        downsampler = self.cfg.get("downsampler")
        return build_classifier(depth=self.cfg.model.depth, num_classes=self.cfg.data.num_classes,
                                downsampler=build_operator(downsampler, "downsampler"),
                                zero_init_residual=self.cfg.model.zero_init_residual)

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.cfg.data
        train, val = build_imagenet(self.root, data.crop_size, data.resize_size, data.min_crop_scale, data.hflip)
        if len(train.classes) != data.num_classes:
            raise ValueError(f"{self.root}/train has {len(train.classes)} class folders but data.num_classes="
                             f"{data.num_classes}")
        return train, val

    def image_files(self, dataset: Dataset) -> list[Path]:
        return [Path(path) for path, _ in dataset.samples]

    def train_step(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        images, targets = batch
        loss = F.cross_entropy(model(images), targets, label_smoothing=self.cfg.task.label_smoothing)
        return {"loss": loss}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        counts = torch.zeros(4, dtype=torch.float64, device=self.world.device)  # top-1, top-5, loss sum, images
        for images, targets in loader:
            images, targets = self.to_device((images, targets))
            logits = model(images).float()
            top1, top5 = topk_correct(logits, targets, (1, 5))
            counts += torch.tensor([top1, top5, float(F.cross_entropy(logits, targets, reduction="sum")),
                                    len(targets)], dtype=torch.float64, device=counts.device)
        top1, top5, loss_sum, total = all_reduce_sum(counts).tolist()
        if total == 0:
            raise ValueError("the validation set is empty")
        return {"top1": 100.0 * top1 / total, "top5": 100.0 * top5 / total, "loss": loss_sum / total,
                "images": total}
