"""The segmentation task for the shared engine: config -> UperNet / PSPNet / PSANet + ADE20k folders, per-pixel
cross-entropy (label 0 ignored), pixel accuracy and mIoU (ICCV 2019 Tables 5, 6; CARAFE++ Tables VIII, IX).

Metrics (``metrics.json``): ``mIoU``, ``pixel_acc``, ``IoU/<class>`` for each class with a non-empty union, ``loss``
(mean per-pixel cross-entropy at label resolution) and ``pixels`` (labelled pixels scored); see
``tasks.segmentation.metrics``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.common.distributed import all_reduce_sum
from tasks.common.factories import build_slot
from tasks.common.resnet import RESNET_LAYERS, check_backbone_weights, load_backbone_weights
from tasks.common.task import Task
from tasks.segmentation.data import (ADE20kSegmentation, ade_class_names, ade_split_folders,
                                     collate_segmentation, read_label)
from tasks.segmentation.metrics import confusion_matrix, segmentation_scores
from tasks.segmentation.model import ARCHS, DILATED_ARCHS, PPM_PLACEMENTS, build_segmenter
from tasks.segmentation.synthetic import CLASS_NAMES, ensure_synthetic_ade

LOSS_RESOLUTIONS = ("quarter", "full")
PSA_KEYS = ("psa_mask_size", "psa_shrink_factor", "psa_softmax")  # in model=psanet_* only


class SegmentationTask(Task):
    primary_metric = "mIoU"
    dataset_name = "ADE20k (ADEChallengeData2016)"

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m, data, task = cfg.model, cfg.data, cfg.task
        if m.arch not in ARCHS:
            raise ValueError(f"model.arch={m.arch!r} is not one of {', '.join(ARCHS)}")
        if m.depth not in RESNET_LAYERS:
            raise ValueError(f"model.depth={m.depth!r} is not one of {sorted(RESNET_LAYERS)}")
        if m.ppm_placement not in PPM_PLACEMENTS:
            raise ValueError(f"model.ppm_placement={m.ppm_placement!r} is not one of {', '.join(PPM_PLACEMENTS)}")
        for key in ("fpn_dim", "head_dim"):
            if isinstance(m[key], bool) or not isinstance(m[key], int) or m[key] < 1:
                raise ValueError(f"model.{key} must be an integer >= 1, got {m[key]!r}")
        check_backbone_weights(m.backbone_weights)
        if isinstance(m.aux_weight, bool) or not isinstance(m.aux_weight, (int, float)) or m.aux_weight < 0:
            raise ValueError(f"model.aux_weight must be a number >= 0 (0: no auxiliary head), got {m.aux_weight!r}")
        if m.arch in DILATED_ARCHS:
            slots = ("ppm_upsampler",) * (m.arch == "psanet") + ("fpn_upsampler", "fuse_upsampler", "downsampler")
            used = [k for k in slots if cfg.get(k) is not None]
            if used:
                raise ValueError(f"model.arch={m.arch} has no {', '.join(used)} slot; set them to null")
        if m.arch == "psanet":
            missing = [k for k in PSA_KEYS if k not in m]
            if missing:
                raise ValueError(f"model.arch=psanet needs model.{', model.'.join(missing)}: start from "
                                 "model=psanet_r50 (or psanet_r101)")
            size = m.psa_mask_size
            if (not isinstance(size, Sequence) or len(size) != 2
                    or any(not isinstance(s, int) or s < 3 or s % 2 == 0 for s in size)):
                raise ValueError(f"model.psa_mask_size must be two odd integers >= 3 (rows, columns), got {size}")
            if not isinstance(m.psa_shrink_factor, int) or m.psa_shrink_factor < 1:
                raise ValueError(f"model.psa_shrink_factor must be an integer >= 1, got {m.psa_shrink_factor!r}")
            if not isinstance(m.psa_softmax, bool):
                raise ValueError(f"model.psa_softmax must be true or false, got {m.psa_softmax!r}")
        scales = list(data.train_scales)
        if not scales or any(not isinstance(s, int) or s < 1 for s in scales):
            raise ValueError(f"data.train_scales must be a non-empty list of integers >= 1, got {scales}")
        for key in ("test_size", "max_size", "pad_to"):
            if not isinstance(data[key], int) or data[key] < 1:
                raise ValueError(f"data.{key} must be an integer >= 1, got {data[key]!r}")
        if data.pad_to % 32:
            raise ValueError(f"data.pad_to={data.pad_to} must be a multiple of 32 (the ResNet's output stride), "
                             "so that the padded batch maps onto C5 without a remainder")
        if task.loss_resolution not in LOSS_RESOLUTIONS:
            raise ValueError(f"task.loss_resolution={task.loss_resolution!r} is not one of "
                             f"{', '.join(LOSS_RESOLUTIONS)}")

    def check_dataset(self, root: Path) -> None:
        for split in ("train", "val"):
            ade_split_folders(root, split)

    def write_embedded_dataset(self, embedded: Any) -> None:
        self.require_embedded_classes(len(CLASS_NAMES), f"{len(CLASS_NAMES)} classes")
        ensure_synthetic_ade(embedded.dir, embedded.seed, embedded.num_train, embedded.num_val, embedded.image_size,
                             embedded.version)

    def describe_embedded_dataset(self, embedded: Any) -> str:
        return (f"embedded ADE20k-layout default ({len(CLASS_NAMES)} classes, {embedded.image_size} px scenes, "
                f"{embedded.num_train}/{embedded.num_val} train/val images, seed {embedded.seed}, generator "
                f"version {embedded.version})")

    def class_names(self) -> list[str]:
        if self.cfg.data.root is None:
            return list(CLASS_NAMES)
        return ade_class_names(self.root, self.cfg.data.num_classes)

    def build_model(self) -> nn.Module:
        m = self.cfg.model

        def slot(key: str) -> object:
            return build_slot(self.cfg, key)

        model = build_segmenter(arch=m.arch, depth=m.depth, num_classes=self.cfg.data.num_classes,
                                fpn_dim=m.fpn_dim, head_dim=m.head_dim, pool_scales=tuple(m.pool_scales),
                                ppm_upsampler=slot("ppm_upsampler"), fpn_upsampler=slot("fpn_upsampler"),
                                fuse_upsampler=slot("fuse_upsampler"), backbone_downsampler=slot("downsampler"),
                                ppm_placement=m.ppm_placement, aux_head=m.aux_weight > 0,
                                **({k: m[k] for k in PSA_KEYS} if m.arch == "psanet" else {}))
        if m.backbone_weights:
            self.loaded_weights = {"path": str(m.backbone_weights),
                                   "sha256": load_backbone_weights(model.body, m.backbone_weights)}
        return model

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.cfg.data
        common = {"num_classes": data.num_classes, "train_scales": tuple(data.train_scales),
                  "test_size": data.test_size, "max_size": data.max_size}
        return (ADE20kSegmentation(self.root, "train", train=True, flip=data.flip, **common),
                ADE20kSegmentation(self.root, "val", train=False, **common))

    def image_files(self, dataset: Dataset) -> list[Path]:
        return dataset.image_paths()

    def label_files(self, dataset: Dataset) -> list[Path]:
        return dataset.annotation_paths()

    def read_label_file(self, path: Path) -> object:
        return read_label(path)

    def collate_fn(self) -> Callable | None:
        return partial(collate_segmentation, pad_to=self.cfg.data.pad_to)

    def train_step(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Cross-entropy over labelled pixels; ``task.loss_resolution``: ``quarter`` compares the head's logits
        (1/4 for UperNet) with the labels nearest-subsampled to that size (CSAIL's ``segm_downsampling_rate``),
        ``full`` resizes the logits bilinearly to the labels' size. With ``model.aux_weight`` > 0 the auxiliary
        head's logits (C4) are resized bilinearly to the size of the labels the main loss uses and scored with the
        same cross-entropy: ``loss = main + aux_weight * aux`` (``loss_main`` and ``loss_aux`` logged too)."""
        images, labels = batch["images"], batch["labels"]
        aux_weight = self.cfg.model.aux_weight
        logits, aux_logits = model(images, with_aux=True) if aux_weight > 0 else (model(images), None)
        if self.cfg.task.loss_resolution == "full":
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        else:
            labels = F.interpolate(labels[:, None].float(), size=logits.shape[-2:], mode="nearest")[:, 0].long()
        loss = F.cross_entropy(logits.float(), labels - 1, ignore_index=-1)
        if aux_logits is None:
            return {"loss": loss}
        aux_logits = F.interpolate(aux_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        aux_loss = F.cross_entropy(aux_logits.float(), labels - 1, ignore_index=-1)
        return {"loss": loss + aux_weight * aux_loss, "loss_main": loss, "loss_aux": aux_loss}

    @torch.no_grad()
    def label_scores(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per image of a collated batch (on the run's device): its class scores Tensor[1, num_classes, lh, lw] at
        its label's size, as CSAIL's evaluation makes them: the logits resized bilinearly to the padded batch,
        cropped to the image (before padding), resized bilinearly to the label. Channel c is class c + 1."""
        logits = model(batch["images"])
        padded = batch["images"].shape[-2:]
        logits = F.interpolate(logits.float(), size=padded, mode="bilinear", align_corners=False)
        scores = []
        for index in range(len(logits)):
            (h, w), (lh, lw) = batch["image_sizes"][index].tolist(), batch["label_sizes"][index].tolist()
            scores.append(F.interpolate(logits[index:index + 1, :, :h, :w], size=(lh, lw), mode="bilinear",
                                        align_corners=False))
        return scores

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Each image's ``label_scores``; the confusion matrix summed over images and ranks."""
        num_classes = self.cfg.data.num_classes
        confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=self.world.device)
        loss_sum = torch.zeros(2, dtype=torch.float64, device=self.world.device)  # loss sum, labelled pixels
        for batch in loader:
            batch = self.to_device(batch)
            for index, scores in enumerate(self.label_scores(model, batch)):
                lh, lw = scores.shape[-2:]
                label = batch["labels"][index, :lh, :lw]
                confusion += confusion_matrix(scores[0].argmax(0), label, num_classes)
                loss_sum += torch.stack([F.cross_entropy(scores, label[None] - 1, ignore_index=-1, reduction="sum"),
                                         (label > 0).sum()]).double()
        confusion = all_reduce_sum(confusion)
        loss, pixels = all_reduce_sum(loss_sum).tolist()
        metrics = segmentation_scores(confusion, self.class_names())
        metrics["loss"] = loss / max(pixels, 1.0)
        return metrics
