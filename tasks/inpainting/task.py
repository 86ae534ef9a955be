"""The inpainting task for the shared engine: config -> the Global&Local (or Partial Conv) generator with an SN-PatchGAN
discriminator, Places365 with free-form masks, alternating discriminator / generator steps (ICCV 2019 Table 7,
CARAFE++ Table X).

Losses (the papers name reconstruction and adversarial terms without weights):

- generator: ``l1_hole_weight`` x mean |y_hat - x| over the hole + ``l1_valid_weight`` x the same mean over the
  valid pixels (of the raw prediction y_hat, so the valid pixels teach the network too, as PConv's valid / hole
  terms do) + ``adversarial_weight`` x the hinge generator loss -mean D(y) over the counted patches;
- discriminator: hinge, mean relu(1 - D(x)) + mean relu(1 + D(y)) over the counted patches (DeepFill v2).

Which patches count (``task.discriminator_region``): see ``tasks.inpainting.model.patch_weights`` (``hole``: those
overlapping the hole, the default; ``image``: all of them).

Metrics (``metrics.json``): ``l1`` (primary: whole composite, %), ``l1_hole`` (%), ``psnr`` (dB), ``ssim``, on the
fixed validation masks; see ``tasks.inpainting.metrics``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.common.distributed import all_reduce_sum
from tasks.common.factories import build_slot
from tasks.common.task import Task
from tasks.inpainting.data import PHOTOGRAPHS, PlacesInpainting, ensure_embedded_places, places_split
from tasks.inpainting.figures import first_validation_grid
from tasks.inpainting.masks import MASK_KINDS
from tasks.inpainting.metrics import inpainting_scores
from tasks.inpainting.model import (DISCRIMINATOR_REGIONS, GENERATORS, build_inpainting_model, masked_mean,
                                    patch_weights)

METRIC_NAMES = ("l1", "l1_hole", "psnr", "ssim")


class InpaintingTask(Task):
    primary_metric = "l1"
    dataset_name = "Places365 (Standard, small images)"
    optimizer_parts = ("discriminator", "generator")

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        m, data, task = cfg.model, cfg.data, cfg.task
        if not isinstance(m.base_channels, int) or m.base_channels < 2 or m.base_channels % 2:
            raise ValueError(f"model.base_channels must be an even integer >= 2, got {m.base_channels!r}")
        if m.generator not in GENERATORS:
            raise ValueError(f"model.generator={m.generator!r} is not one of {', '.join(GENERATORS)}")
        channels = list(m.discriminator_channels)
        if not channels or any(not isinstance(c, int) or c < 1 for c in channels):
            raise ValueError(f"model.discriminator_channels must be a non-empty list of integers >= 1, got {channels}")
        if not isinstance(data.image_size, int) or data.image_size < 2 ** len(channels) or data.image_size % 4:
            raise ValueError(f"data.image_size must be a multiple of 4 and >= 2^{len(channels)} (the discriminator's "
                             f"{len(channels)} stride-2 layers), got {data.image_size!r}")
        for key in ("mask_kind", "val_mask_kind"):
            if data[key] not in MASK_KINDS:
                raise ValueError(f"data.{key}={data[key]!r} is not one of {', '.join(MASK_KINDS)}")
        if task.discriminator_region not in DISCRIMINATOR_REGIONS:
            raise ValueError(f"task.discriminator_region={task.discriminator_region!r} is not one of "
                             f"{', '.join(DISCRIMINATOR_REGIONS)}")
        if not isinstance(task.tensorboard_images, int) or task.tensorboard_images < 0:
            raise ValueError(f"task.tensorboard_images must be an integer >= 0, got {task.tensorboard_images!r}")
        for key in ("l1_hole_weight", "l1_valid_weight", "adversarial_weight"):
            if not isinstance(task[key], (int, float)) or task[key] < 0:
                raise ValueError(f"task.{key} must be a number >= 0, got {task[key]!r}")

    def check_dataset(self, root: Path) -> None:
        for split in ("train", "val"):
            places_split(root, split)

    def write_embedded_dataset(self, embedded: Any) -> None:
        if embedded.image_size != self.cfg.data.image_size:
            raise ValueError(f"data.embedded.image_size={embedded.image_size} differs from data.image_size="
                             f"{self.cfg.data.image_size}; the embedded crops are written at the training size")
        ensure_embedded_places(embedded.dir, embedded.seed, embedded.num_train, embedded.num_val,
                               embedded.image_size)

    def describe_embedded_dataset(self, embedded: Any) -> str:
        return (f"embedded Places365-layout default (crops of {len(PHOTOGRAPHS)} scikit-image photographs, "
                f"{embedded.image_size} px, {embedded.num_train}/{embedded.num_val} train/val images, seed "
                f"{embedded.seed})")

    def build_model(self) -> nn.Module:
        m = self.cfg.model

        def slot(key: str) -> object:
            return build_slot(self.cfg, key)

        return build_inpainting_model(base_channels=m.base_channels, upsampler=slot("upsampler"),
                                      downsampler=slot("downsampler"), partial=m.generator == "partial_conv",
                                      discriminator_channels=tuple(m.discriminator_channels))

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        data = self.cfg.data
        common = {"image_size": data.image_size, "mask_kind": data.mask_kind, "val_mask_kind": data.val_mask_kind,
                  "mask_seed": data.val_mask_seed}
        return (PlacesInpainting(self.root, "train", flip=data.flip, **common),
                PlacesInpainting(self.root, "val", **common))

    def image_files(self, dataset: Dataset) -> list[Path]:
        return dataset.image_paths()

    def log_images(self, model: nn.Module, val_set: Dataset, writer: Any, step: int) -> None:
        """The Figure 9 layout (masked input, output, original) for the first ``task.tensorboard_images``
        validation images and their fixed masks."""
        count = self.cfg.task.tensorboard_images
        if count:
            grid = first_validation_grid(model, val_set, count, self.world.device)
            writer.add_image("val/inpainting", grid, step, dataformats="HWC")

    def part_parameters(self, model: nn.Module, part: str) -> list[nn.Parameter]:
        return list(getattr(model, part).parameters())

    def train_part(self, model: nn.Module, batch: Any, part: str, carry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """``discriminator`` first (it runs the generator once per batch and leaves its output in ``carry``),
        then ``generator`` against the just-updated discriminator."""
        images, masks = batch
        task = self.cfg.task
        weights = patch_weights(masks, model.discriminator.downsampling, task.discriminator_region)
        if part == "discriminator":
            carry["composite"], carry["predicted"] = model.generator(images, masks)
            real = model.discriminator(images, masks)
            fake = model.discriminator(carry["composite"].detach(), masks)
            loss = masked_mean(F.relu(1 - real), weights) + masked_mean(F.relu(1 + fake), weights)
            return {"loss": loss, "real_score": masked_mean(real.detach(), weights),
                    "fake_score": masked_mean(fake.detach(), weights)}
        if part != "generator":
            raise ValueError(f"unknown part {part!r}; the inpainting task optimises {self.optimizer_parts}")
        predicted = carry["predicted"]
        error = (predicted - images).abs()
        l1_hole, l1_valid = masked_mean(error, masks), masked_mean(error, 1 - masks)
        adversarial = -masked_mean(model.discriminator(carry["composite"], masks), weights)
        loss = task.l1_hole_weight * l1_hole + task.l1_valid_weight * l1_valid + task.adversarial_weight * adversarial
        return {"loss": loss, "l1_hole": l1_hole.detach(), "l1_valid": l1_valid.detach(),
                "adversarial": adversarial.detach()}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Per-image scores of the composite on the fixed validation masks, averaged over images and ranks."""
        sums = torch.zeros(len(METRIC_NAMES) + 1, dtype=torch.float64, device=self.world.device)
        for images, masks in loader:
            images, masks = self.to_device((images, masks))
            composite = model(images, masks)
            scores = inpainting_scores(composite, images, masks)
            sums += torch.stack([*(scores[name].sum() for name in METRIC_NAMES),
                                 torch.tensor(float(len(images)), dtype=torch.float64, device=sums.device)])
        *totals, count = all_reduce_sum(sums).tolist()
        if count == 0:
            raise ValueError("the validation set is empty")
        return {name: total / count for name, total in zip(METRIC_NAMES, totals)}
