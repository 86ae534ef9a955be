"""The interface between the shared engine and a task (classification, detection, segmentation, inpainting).

A task turns its part of the config into plain keyword arguments for its model and datasets, says how a batch
becomes losses, and how a model is evaluated. Everything else (devices, DDP, AMP, schedules, checkpoints, logging,
resuming) is the engine's.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from tasks.common.distributed import World
from tasks.common.io import generated_folder_digest
from tasks.common.speed import noise_image


#: The fields every task's data config (``conf/data/<dataset>.yaml``) has, because the shared code reads them: the
#: real dataset's name and folder (null: the embedded default), whether to decode every file before training, and
#: the folder the embedded default is written to. Anything else under ``data`` is the task's own.
DATA_FIELDS = ("name", "root", "verify", "embedded.dir")


class Task:
    """Base class; subclasses implement the methods that raise ``NotImplementedError`` below.
    ``tasks.classification.task.ClassificationTask`` is the template a new task copies."""

    #: the metric a table row reports first and the progress bar shows, e.g. ``"top1"``
    primary_metric: str = ""
    #: config keys (dotted) this task added after runs were recorded, with the value that reproduces those runs:
    #: the config hash keeps such a key only when a config sets another value, so that a new option does not rename
    #: every finished experiment (``tasks.common.experiment.config_hash``)
    hash_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, cfg: Any, world: World) -> None:
        self.cfg = cfg
        self.world = world
        #: the pretrained weights ``build_model`` loaded, for the run's record: ``{"path": <as configured>,
        #: "sha256": <content digest of the file's weights>}`` (``tasks.common.resnet.load_backbone_weights``)
        self.loaded_weights: dict[str, str] | None = None

    @classmethod
    def check_config(cls, cfg: Any) -> None:
        """Raise ``ValueError`` naming the key of a task-specific value that cannot work (run before any work)."""

    @property
    def root(self) -> Path:
        """The dataset's folder: ``data.root`` (the real dataset) or, when it is null, the embedded default's."""
        data = self.cfg.data
        return Path(data.root) if data.root is not None else Path(data.embedded.dir)

    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def build_datasets(self) -> tuple[Dataset, Dataset]:
        """(train, val); called once on each rank after rank 0 has prepared the data (``prepare_data``)."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        """Rank 0 only, before ``build_datasets``: check the real dataset's layout (``data.root``) or write the
        embedded default (``data.embedded``) if it is not there yet."""
        data = self.cfg.data
        if data.root is not None:
            self.check_dataset(Path(data.root))
        else:
            self.write_embedded_dataset(data.embedded)

    def dataset_description(self) -> str:
        """One line for provenance: which dataset, embedded or real, and where. For the embedded default, once
        written, the digest of its files' content (``tasks.common.io.generated_folder_digest``), so a changed
        folder cannot pass for the one its settings describe."""
        data = self.cfg.data
        if data.root is not None:
            return f"{self.dataset_name} at {data.root}"
        description = self.describe_embedded_dataset(data.embedded)
        digest = generated_folder_digest(Path(data.embedded.dir))
        return f"{description}, content sha256 {digest[:16]}" if digest else description

    #: the real dataset's name, for provenance, e.g. ``"ImageNet"``
    dataset_name: str = ""

    def check_dataset(self, root: Path) -> None:
        """Raise ``FileNotFoundError`` saying what is expected when ``root`` does not hold the real dataset's layout."""
        raise NotImplementedError

    def write_embedded_dataset(self, embedded: Any) -> None:
        """Write the embedded default described by the ``data.embedded`` node unless it is already there."""
        raise NotImplementedError

    def require_embedded_classes(self, count: int, what: str) -> None:
        """Raise ``ValueError`` unless ``data.num_classes`` is ``count``, the embedded default's class count
        (``what`` says it in words, e.g. ``"16 classes"``)."""
        if self.cfg.data.num_classes != count:
            raise ValueError(f"the embedded dataset has {what} but data.num_classes={self.cfg.data.num_classes}")

    def describe_embedded_dataset(self, embedded: Any) -> str:
        """One line saying what the embedded default described by ``data.embedded`` is."""
        raise NotImplementedError

    def image_files(self, dataset: Dataset) -> list[Path]:
        """Every image file ``dataset`` reads, for ``data.verify=true``."""
        raise NotImplementedError(f"{type(self).__name__} does not list its image files, so data.verify is not "
                                  "available for it")

    def label_files(self, dataset: Dataset) -> list[Path]:
        """Every label file ``dataset`` decodes (such as segmentation annotation PNGs), for ``data.verify=true``,
        which reads each with ``read_label_file``; tasks whose labels are not files of their own keep this
        default, which lists none."""
        return []

    def read_label_file(self, path: Path) -> object:
        """Decode one of ``label_files``; raise ``tasks.common.data.CorruptImageError`` naming it if it cannot be."""
        raise NotImplementedError(f"{type(self).__name__} lists label files but does not say how to read them")

    def collate_fn(self) -> Callable | None:
        return None

    def train_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Losses for one batch; the key ``"loss"`` is what is minimised, the others are logged."""
        raise NotImplementedError

    #: The parts of the model with an optimizer each, stepped in this order on every batch (a GAN:
    #: ``("discriminator", "generator")``); empty: one optimizer over all parameters and ``train_step``.
    optimizer_parts: tuple[str, ...] = ()

    def part_parameters(self, model: nn.Module, part: str) -> list[nn.Parameter]:
        """The parameters ``part`` (one of ``optimizer_parts``) optimises; the parts must not share any."""
        raise NotImplementedError

    def train_part(self, model: nn.Module, batch: Any, part: str, carry: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Losses of ``part``'s step on one batch (tasks with ``optimizer_parts``); ``"loss"`` is what that part's
        optimizer minimises. The engine steps that optimizer before calling the next part, so a later part sees the
        earlier parts' updated weights; ``carry`` (empty at each batch) hands values from one part to the next, e.g.
        the generator's output, computed once per batch."""
        raise NotImplementedError

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Metrics over this rank's shard of ``loader``, combined over ranks: the same dict on every rank."""
        raise NotImplementedError

    def log_images(self, model: nn.Module, val_set: Dataset, writer: Any, step: int) -> None:
        """After each evaluation, on the main process: pictures for TensorBoard (``writer.add_image``). Tasks with
        nothing to picture keep this default, which writes none. Must not draw from the global RNGs (a resumed run
        would then train differently)."""

    def inference_input(self, height: int, width: int) -> Any:
        """What ``model(...)`` takes in eval mode for one image of ``height`` x ``width`` (speed measurements):
        here a Tensor[1, 3, H, W] of noise on the run's device; detectors take a list of images instead."""
        return noise_image(height, width).unsqueeze(0).to(self.world.device)

    def to_device(self, batch: Any) -> Any:
        """Move a batch (tensors, or lists / tuples / dicts of them) to the run's device."""
        return move_to(batch, self.world.device)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch
