"""The training engine every task uses: ``fit`` = resume if a checkpoint exists, then for each epoch
``train_one_epoch`` and ``evaluate``, an atomic checkpoint, and TensorBoard logs.

Devices, data parallelism under ``torchrun`` (``DistributedDataParallel`` for a task with one optimizer; for a task
with several, such as the inpainting GAN, which calls its sub-networks directly, the same synchronisation done by
hand: rank 0's weights at the start, gradients averaged before each step, buffers from rank 0 after it), SyncBN, AMP (CUDA only), gradient clipping, the per-iteration LR schedule and
deterministic per-epoch seeding are handled here; what a batch means is the ``Task``'s business.
"""

from __future__ import annotations

import logging
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from tasks.common.data import build_loader, reseed_loader, verify_images
from tasks.common.distributed import World, all_reduce_sum, average_gradients, barrier, broadcast_module
from tasks.common.io import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint
from tasks.common.progress import Progress
from tasks.common.run_folder import CHECKPOINT_NAME, TENSORBOARD_NAME
from tasks.common.reproducibility import derive_seed, seed_everything, set_deterministic
from tasks.common.schedule import build_lr_scheduler, build_optimizer, scaled_lr, weight_decay_groups
from tasks.common.task import Task

SINGLE_PART = ""  # the one optimizer of a task without ``optimizer_parts``
log = logging.getLogger(__name__)


@dataclass
class Schedule:
    """The ``schedule`` config group, as plain values (see ``tasks.common.schedule``)."""
    epochs: int
    batch_size: int                 # global, over all ranks
    lr: float                       # for base_batch_size images
    base_batch_size: int = 256
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    weight_decay_on: str = "all"    # all | conv_linear_weights (CSAIL's segmentation code)
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    policy: str = "step"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    power: float = 0.9
    warmup_epochs: float = 0.0
    warmup_factor: float = 0.001
    clip_grad_norm: float | None = None


@dataclass
class RunSettings:
    """The ``run`` config group: how to run, not what (none of it changes a result beyond noise). This dataclass is
    the group's only definition: ``tasks.common.experiment`` registers it as ``run=default`` with Hydra, so these
    defaults are the config's and an override of the wrong type (``run.num_workers=abc``) fails when composing.
    Which keys enter the config hash: ``tasks.common.experiment.NOT_HASHED``."""
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"            # auto | cpu | cuda
    amp: bool = True                # float16 autocast + grad scaling; CUDA only, ignored on the CPU
    sync_bn: bool = False           # SyncBatchNorm under torchrun (CUDA only)
    num_workers: int = 8            # DataLoader worker processes per rank
    eval_every: int = 1             # epochs
    log_every: int = 20             # iterations, for TensorBoard
    progress: bool = True
    find_unused_parameters: bool = False
    max_iters_per_epoch: Optional[int] = None   # tests and smoke runs only
    max_eval_batches: Optional[int] = None      # tests and smoke runs only
    stop_after_epochs: Optional[int] = None     # stop (as if interrupted) after this many epochs; for tests


@dataclass
class FitResult:
    metrics: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    #: One entry per process that trained this run (the first and every resume): its wall and training seconds.
    segments: list[dict[str, float]] = field(default_factory=list)
    finished: bool = True


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def data_parallel(task: Task, model: nn.Module, world: World, settings: RunSettings) -> nn.Module:
    """``model`` ready for data-parallel training on ``world``: unchanged in a single process; wrapped in
    ``DistributedDataParallel`` for a task with one optimizer; for a task with ``optimizer_parts`` (whose parts are
    called directly, bypassing a wrapper's forward) left unwrapped with rank 0's parameters and buffers, and
    ``train_one_epoch`` then averages each part's gradients and broadcasts the buffers itself."""
    if not world.distributed:
        return model
    if task.optimizer_parts:
        broadcast_module(model)
        return model
    ddp_ids = [world.device.index] if world.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ddp_ids, find_unused_parameters=settings.find_unused_parameters)


def train_one_epoch(task: Task, model: nn.Module, loader: DataLoader, optimizers: dict[str, torch.optim.Optimizer],
                    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler], scaler: torch.amp.GradScaler,
                    world: World, epoch: int, settings: RunSettings, clip_grad_norm: float | None,
                    writer: Any = None) -> dict[str, float]:
    """One pass over this rank's shard; returns the losses averaged over iterations and ranks.

    ``optimizers`` has one entry per part the task optimises (``optimizer_parts``), stepped in that order on every
    batch: ``{SINGLE_PART: ...}`` for a task with one optimizer (losses logged under their own names), e.g.
    ``{"discriminator": ..., "generator": ...}`` for a GAN (losses logged as ``<part>/<name>``).
    """
    model.train()
    batches = first_batches(loader, settings.max_iters_per_epoch)
    total = len(batches)
    progress = Progress(total, f"epoch {epoch + 1}", settings.progress and world.is_main)
    sums: dict[str, float] = defaultdict(float)
    by_hand = world.distributed and not isinstance(model, DistributedDataParallel)  # see data_parallel
    for iteration, batch in enumerate(batches):
        batch = task.to_device(batch)
        carry: dict[str, Any] = {}  # what one part's step hands to the next within the iteration
        logged: dict[str, torch.Tensor] = {}
        grad_norms: dict[str, torch.Tensor] = {}  # before clipping, TensorBoard only (``train/grad_norm``)
        for part, optimizer in optimizers.items():
            with torch.autocast(device_type=world.device.type, dtype=torch.float16, enabled=scaler.is_enabled()):
                losses = (task.train_step(model, batch) if part == SINGLE_PART
                          else task.train_part(model, batch, part, carry))
            loss = losses["loss"]
            if not torch.isfinite(loss):
                raise FloatingPointError(f"{part or 'the'} loss is {loss.item()} at epoch {epoch + 1}, iteration "
                                         f"{iteration + 1}; losses: { {k: float(v) for k, v in losses.items()} }")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()  # a disabled scaler (no AMP) passes everything through unchanged
            if by_hand:
                average_gradients(optimized_parameters(model, optimizer))
            if clip_grad_norm:
                scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(optimized_parameters(model, optimizer), clip_grad_norm)
                grad_norms["grad_norm" if part == SINGLE_PART else f"{part}/grad_norm"] = norm.detach()
            scaler.step(optimizer)
            logged.update(losses if part == SINGLE_PART else {f"{part}/{k}": v for k, v in losses.items()})
        scaler.update()
        if by_hand:  # BatchNorm statistics as DistributedDataParallel keeps them: rank 0's
            broadcast_module(model, buffers_only=True)
        for scheduler in schedulers.values():
            scheduler.step()
        for name, value in logged.items():
            sums[name] += float(value.detach())
        step = epoch * total + iteration
        lr = next(iter(optimizers.values())).param_groups[0]["lr"]
        if writer is not None and (iteration % settings.log_every == 0 or iteration + 1 == total):
            for name, value in logged.items():
                writer.add_scalar(f"train/{name}", float(value.detach()), step)
            for name, value in grad_norms.items():  # read from the device only when written
                writer.add_scalar(f"train/{name}", float(value), step)
            writer.add_scalar("train/lr", lr, step)
        shown = " ".join(f"{name} {sums[name] / (iteration + 1):.4f}" for name in sums if name.endswith("loss"))
        progress.update(iteration + 1, f"{shown} lr {lr:.4g}")
    names = sorted(sums)
    averaged = all_reduce_sum(torch.tensor([sums[n] for n in names], dtype=torch.float64, device=world.device))
    return {n: float(v) / (total * world.world_size) for n, v in zip(names, averaged.tolist())}


def optimized_parameters(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    """The parameters ``optimizer`` steps, in ``model.parameters()`` order (what gradient clipping sees)."""
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [p for p in model.parameters() if id(p) in stepped]


def build_optimizers(task: Task, model: nn.Module, schedule: Schedule, iters_per_epoch: int
                     ) -> tuple[dict[str, torch.optim.Optimizer], dict[str, torch.optim.lr_scheduler.LambdaLR]]:
    """One optimizer and LR schedule per part of ``task.optimizer_parts`` (the same ``schedule`` for each), or a
    single one over all parameters under ``SINGLE_PART`` when the task declares no parts."""
    lr = scaled_lr(schedule.lr, schedule.batch_size, schedule.base_batch_size)
    parts = {part: task.part_parameters(model, part) for part in task.optimizer_parts} \
        if task.optimizer_parts else {SINGLE_PART: model.parameters()}
    if task.optimizer_parts:
        owners: dict[int, str] = {}
        for part, params in parts.items():
            for p in params:
                if owners.setdefault(id(p), part) != part:
                    raise ValueError(f"{type(task).__name__}: a parameter belongs to both parts {owners[id(p)]!r} "
                                     f"and {part!r}; each parameter must have one optimizer")
    optimizers, schedulers = {}, {}
    for part, params in parts.items():
        groups = weight_decay_groups(model, params, schedule.weight_decay_on)
        optimizers[part] = build_optimizer(groups, schedule.optimizer, lr, schedule.momentum, schedule.weight_decay,
                                           schedule.nesterov, schedule.betas)
        schedulers[part] = build_lr_scheduler(optimizers[part], iters_per_epoch, schedule.epochs, schedule.policy,
                                              schedule.milestones, schedule.gamma, schedule.power,
                                              schedule.warmup_epochs, schedule.warmup_factor)
    return optimizers, schedulers


def optimizer_state(optimizers: dict[str, Any], key: str) -> dict[str, Any]:
    """The checkpoint entry for the optimizers' (or the schedulers') states: ``{key: state}`` with one optimizer
    (the layout every single-optimizer checkpoint has), ``{key + "s": {part: state}}`` with parts."""
    if list(optimizers) == [SINGLE_PART]:
        return {key: optimizers[SINGLE_PART].state_dict()}
    return {f"{key}s": {part: o.state_dict() for part, o in optimizers.items()}}


def load_optimizer_state(optimizers: dict[str, Any], state: dict[str, Any], key: str, path: Path) -> None:
    """Restore what ``optimizer_state`` wrote under ``key`` (``optimizer`` or ``scheduler``) into ``optimizers``."""
    if list(optimizers) == [SINGLE_PART]:
        optimizers[SINGLE_PART].load_state_dict(state[key])
        return
    saved = state.get(f"{key}s", {})
    if set(saved) != set(optimizers):
        raise RuntimeError(f"{path} holds {key}s for parts {sorted(saved)} but this task optimises "
                           f"{sorted(optimizers)}; use a new run folder or delete it")
    for part, o in optimizers.items():
        o.load_state_dict(saved[part])


@dataclass
class _Training:
    """What ``fit`` trains with: the model (wrapped for data parallelism once resumed), data, optimizers."""
    model: nn.Module
    val_set: Any
    train_loader: Any
    val_loader: Any
    iters_per_epoch: int
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, Any]
    scaler: torch.amp.GradScaler


@dataclass
class _Progress:
    """Where a run is: epochs done, their history, training seconds so far and the earlier processes' segments;
    this process's segment is timed from ``segment_started``."""
    start_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    train_seconds: float = 0.0
    segments: list[dict[str, float]] = field(default_factory=list)
    segment_started: float = field(default_factory=time.perf_counter)
    segment_train_seconds: float = 0.0

    def add_training(self, seconds: float) -> None:
        self.train_seconds += seconds
        self.segment_train_seconds += seconds

    def all_segments(self) -> list[dict[str, float]]:
        return [*self.segments, {"wall_seconds": round(time.perf_counter() - self.segment_started, 1),
                                 "train_seconds": round(self.segment_train_seconds, 1)}]


def _prepare(task: Task, schedule: Schedule, settings: RunSettings, world: World) -> _Training:
    """Seed, build the model, the data and the optimizers (in this order: the seeds fix what each draws)."""
    set_deterministic(settings.deterministic)
    seed_everything(derive_seed(settings.seed, world.rank))
    if schedule.batch_size % world.world_size:
        raise ValueError(f"schedule.batch_size={schedule.batch_size} must be divisible by the number of "
                         f"processes ({world.world_size})")
    model = task.build_model().to(world.device)
    if settings.sync_bn and world.distributed:
        if world.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        elif world.is_main:  # torch's SyncBatchNorm runs on CUDA only
            log.warning("run.sync_bn: SyncBatchNorm needs CUDA; each CPU process keeps its own BatchNorm statistics")
    train_set, val_set = prepared_datasets(task, world)
    per_rank = schedule.batch_size // world.world_size
    collate = task.collate_fn()
    train_loader = build_loader(train_set, world, per_rank, True, settings.num_workers, settings.seed, collate)
    val_loader = build_loader(val_set, world, per_rank, False, settings.num_workers, settings.seed, collate)
    iters_per_epoch = len(first_batches(train_loader, settings.max_iters_per_epoch))
    if iters_per_epoch == 0:
        raise ValueError(f"the training set has {len(train_set)} samples, fewer than one batch of {per_rank} per "
                         f"process; lower schedule.batch_size or use more data")
    optimizers, schedulers = build_optimizers(task, model, schedule, iters_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=settings.amp and world.device.type == "cuda")
    return _Training(model, val_set, train_loader, val_loader, iters_per_epoch, optimizers, schedulers, scaler)


def _resume(task: Task, training: _Training, checkpoint_path: Path, epochs: int, world: World,
            config_hash: str) -> _Progress:
    """The run's progress: from its checkpoint (weights, optimizer, scheduler and scaler states loaded into
    ``training``), or a fresh start when there is none."""
    progress = _Progress()
    if world.is_main:  # a checkpoint write killed half-way leaves its temporary file; the run's lock is held
        remove_stale_temporaries(checkpoint_path)
    if not checkpoint_path.exists():
        return progress
    state = load_checkpoint(checkpoint_path, map_location=world.device)
    if config_hash and state.get("config_hash") != config_hash:
        raise RuntimeError(f"{checkpoint_path} was written by a run with another config (hash "
                           f"{state.get('config_hash')} != {config_hash}); use a new run folder or delete it")
    check_resume_state(state, checkpoint_path, epochs,
                       ("optimizers", "schedulers") if task.optimizer_parts else ("optimizer", "scheduler"))
    training.model.load_state_dict(state["model"])
    load_optimizer_state(training.optimizers, state, "optimizer", checkpoint_path)
    load_optimizer_state(training.schedulers, state, "scheduler", checkpoint_path)
    if state.get("scaler"):
        training.scaler.load_state_dict(state["scaler"])
    progress.start_epoch, progress.history = state["epoch"], state["history"]
    progress.train_seconds = state["train_seconds"]
    progress.segments = list(state.get("segments") or [])
    if world.is_main:
        log.info("resuming %s after epoch %d of %d", checkpoint_path.parent, progress.start_epoch, epochs)
    return progress


def _evaluate_and_log(task: Task, training: _Training, settings: RunSettings, writer: Any,
                      epochs_done: int) -> dict[str, float]:
    """Validation metrics after ``epochs_done`` epochs, written to TensorBoard on the training scalars' axis
    (iterations done) with the task's images."""
    metrics = evaluate(task, training.model, training.val_loader, settings)
    if writer is not None:
        step = epochs_done * training.iters_per_epoch
        for name, value in metrics.items():
            writer.add_scalar(f"val/{name}", value, step)
        task.log_images(unwrap(training.model), training.val_set, writer, step)
    return metrics


def _save(training: _Training, progress: _Progress, checkpoint_path: Path, config_hash: str) -> None:
    """The checkpoint after an epoch: everything ``_resume`` needs to continue exactly where this left off."""
    save_checkpoint(checkpoint_path, {
        "model": unwrap(training.model).state_dict(), **optimizer_state(training.optimizers, "optimizer"),
        **optimizer_state(training.schedulers, "scheduler"), "scaler": training.scaler.state_dict(),
        "epoch": progress.start_epoch, "history": progress.history, "train_seconds": progress.train_seconds,
        "segments": progress.all_segments(), "config_hash": config_hash})


def _tensorboard(task: Task, run_dir: Path, world: World, fresh: bool) -> Any:
    if not world.is_main:
        return None
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / TENSORBOARD_NAME))
    if fresh:
        writer.add_text("hyper-parameters", hyperparameters_markdown(task.cfg), 0)
    return writer


def fit(task: Task, schedule: Schedule, settings: RunSettings, run_dir: Path, world: World,
        config_hash: str = "") -> FitResult:
    """Train ``task`` for ``schedule.epochs``, resuming from ``run_dir/checkpoint.pt`` if it exists: prepare, resume,
    then per epoch train, evaluate when due, log and save a checkpoint."""
    training = _prepare(task, schedule, settings, world)
    checkpoint_path = run_dir / CHECKPOINT_NAME
    progress = _resume(task, training, checkpoint_path, schedule.epochs, world, config_hash)
    resumed_at = progress.start_epoch
    training.model = data_parallel(task, training.model, world, settings)
    writer = _tensorboard(task, run_dir, world, fresh=resumed_at == 0)
    history = progress.history
    metrics: dict[str, float] = history[-1].get("val", {}) if history else {}
    try:
        for epoch in range(resumed_at, schedule.epochs):
            if settings.stop_after_epochs is not None and epoch >= settings.stop_after_epochs:
                return FitResult(metrics, history, progress.train_seconds, progress.all_segments(), finished=False)
            seed_everything(derive_seed(settings.seed, epoch, world.rank))
            reseed_loader(training.train_loader, settings.seed, epoch, world.rank)
            started = time.perf_counter()
            losses = train_one_epoch(task, training.model, training.train_loader, training.optimizers,
                                     training.schedulers, training.scaler, world, epoch, settings,
                                     schedule.clip_grad_norm, writer)
            progress.add_training(time.perf_counter() - started)
            record: dict[str, Any] = {"epoch": epoch + 1, "train": losses}
            if (epoch + 1) % settings.eval_every == 0 or epoch + 1 == schedule.epochs:
                metrics = record["val"] = _evaluate_and_log(task, training, settings, writer, epoch + 1)
            history.append(record)
            progress.start_epoch = epoch + 1
            if world.is_main:
                summary = " ".join(f"{k} {v:.4f}" for k, v in {**losses, **record.get("val", {})}.items())
                log.info("epoch %d/%d: %s", epoch + 1, schedule.epochs, summary)
                _save(training, progress, checkpoint_path, config_hash)
            barrier()
        if resumed_at == schedule.epochs and not _usable(metrics, task.primary_metric):
            # Resumed after the last epoch from a checkpoint without that epoch's evaluation (or with an unusable
            # one): evaluate the final weights now rather than finish without the run's result.
            if world.is_main:
                log.warning("%s holds no usable final evaluation (%s); evaluating the final weights again",
                            checkpoint_path, metrics or "none")
            metrics = evaluate(task, training.model, training.val_loader, settings)
            history[-1]["val"] = metrics
    finally:
        if writer is not None:
            writer.close()
    return FitResult(metrics, history, progress.train_seconds, progress.all_segments())


#: What a resume checkpoint must hold besides the optimizer and scheduler states (``optimizer`` and ``scheduler``,
#: or for a task with parts ``optimizers`` and ``schedulers``) and, optionally, ``scaler``, with each value's type.
RESUME_KEYS = {"model": dict, "epoch": int, "history": list, "train_seconds": (int, float)}


def check_resume_state(state: Any, path: Path, epochs: int, optimizer_keys: tuple[str, ...]) -> None:
    """Raise ``CheckpointError`` naming ``path`` and the problem unless ``state`` is a resume checkpoint the engine
    wrote: every key of ``RESUME_KEYS`` and ``optimizer_keys`` present (those of ``RESUME_KEYS`` with their types),
    ``0 <= epoch <= epochs``, and one history record per epoch done, numbered 1..epoch."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a resume checkpoint: it holds a {type(state).__name__}, not a dict")
    missing = [key for key in (*RESUME_KEYS, *optimizer_keys) if key not in state]
    if missing:
        held = ", ".join(map(repr, sorted(map(str, state))))
        raise CheckpointError(f"{path} is not a resume checkpoint this engine wrote: it lacks the key(s) "
                              f"{', '.join(map(repr, missing))} (it holds {held}); delete it to start the run "
                              "again, or use another run folder")
    for key, kind in RESUME_KEYS.items():
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            raise CheckpointError(f"{path}: {key!r} is a {type(state[key]).__name__}, which a resume checkpoint never "
                                  "holds there; delete it to start the run again")
    epoch, history = state["epoch"], state["history"]
    if not 0 <= epoch <= epochs:
        raise CheckpointError(f"{path} was saved after epoch {epoch}, but this run's schedule has {epochs} epochs; "
                              "use a new run folder or delete it")
    numbers = [record.get("epoch") if isinstance(record, dict) else None for record in history]
    if numbers != list(range(1, epoch + 1)):
        raise CheckpointError(f"{path} was saved after epoch {epoch} but its history records epochs {numbers}, not "
                              f"1..{epoch}: it is damaged or was not written by this engine; delete it to start the "
                              "run again")


def _usable(metrics: Any, primary_metric: str) -> bool:
    """True if ``metrics`` would pass ``check_metrics`` (plain finite numbers, ``primary_metric`` among them)."""
    if not isinstance(metrics, dict) or not all(isinstance(v, (int, float)) for v in metrics.values()):
        return False
    try:
        check_metrics(metrics, primary_metric)
    except MetricError:
        return False
    return True


def hyperparameters_markdown(cfg: Any) -> str:
    """The run's resolved config as a YAML block for TensorBoard's text tab."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg) else repr(cfg)
    return "```yaml\n" + text + "```"  # TensorBoard renders text as markdown


def evaluate(task: Task, model: nn.Module, loader: DataLoader, settings: RunSettings) -> dict[str, float]:
    """The task's metrics on the whole validation set (over all ranks)."""
    model.eval()
    batches = first_batches(loader, settings.max_eval_batches)
    batches.progress = Progress(len(batches), "evaluate", settings.progress and task.world.is_main)
    metrics = task.evaluate(unwrap(model), batches)
    check_metrics(metrics, task.primary_metric)
    return metrics


class MetricError(RuntimeError):
    """An evaluation that did not produce a usable result."""


def check_metrics(metrics: dict[str, float], primary_metric: str) -> None:
    """Raise ``MetricError`` unless ``metrics`` holds a finite ``primary_metric`` and only finite values: a run must
    never finish "successfully" without the number it exists to measure."""
    if primary_metric not in metrics:
        raise MetricError(f"evaluation produced no {primary_metric!r} (got {sorted(metrics) or 'nothing'}); the "
                          "validation set may hold no usable labels (for COCO: does the annotation file hold "
                          "'annotations'?)")
    bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
    if bad:
        raise MetricError(f"evaluation produced non-finite metrics {bad}")


def prepared_datasets(task: Task, world: World) -> tuple[Any, Any]:
    """(train, val) of ``task`` on every rank, after rank 0 has checked or written the data; with
    ``data.verify=true`` every rank first decodes its share of both splits' images and label files
    (``verify_images``, ``Task.label_files``)."""
    if world.is_main:
        task.prepare_data()
    barrier()
    train, val = task.build_datasets()
    if task.cfg.data.get("verify", False):
        for split, dataset in (("train", train), ("val", val)):
            what = f"the {split} split of {task.dataset_description()} (rank {world.rank})"
            verify_images(task.image_files(dataset)[world.rank::world.world_size], what)
            labels = task.label_files(dataset)[world.rank::world.world_size]
            if labels:
                verify_images(labels, what, read=task.read_label_file, kind="label files")
    return train, val


class first_batches:
    """The first ``count`` batches of a loader (all of them when ``count`` is None), keeping ``len`` and
    ``dataset`` for the task's evaluate; the training and evaluation loops both read loaders through it."""

    def __init__(self, loader: DataLoader, count: int | None) -> None:
        self.loader, self.dataset = loader, loader.dataset
        self.count = len(loader) if count is None else min(len(loader), count)
        self.progress: Progress | None = None  # reports each batch once the consumer asks for the next one

    def __len__(self) -> int:
        return self.count

    def __iter__(self):
        for index, batch in enumerate(self.loader):
            if index >= self.count:
                break
            yield batch
            if self.progress is not None:
                self.progress.update(index + 1)


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a model's weights from an engine checkpoint (or a bare state dict) for evaluation."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = load_checkpoint(path)
    model.load_state_dict(state["model"] if "model" in state else state)
    return model
