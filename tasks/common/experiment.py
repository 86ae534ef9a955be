"""From a composed Hydra config to a finished run folder: validate, build the task, ``fit``, write the record.

What a run folder holds is ``tasks.common.run_folder``. Two runs are the same experiment
when their ``config_hash`` is: the resolved config without the settings that only say how to run (device, worker
count, logging) and without where the embedded data happens to be cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf, ValidationError

import carafe.backends
from tasks.common.distributed import World, close_world, init_world
from tasks.common.engine import RunSettings, Schedule, fit
from tasks.common.factories import UntrustedConfigError, build_operator, import_task_class
from tasks.common.io import content_digest, load_checkpoint
from tasks.common.provenance import REPO_ROOT, cpu_kernels, device_name, git_state, utc_now
from tasks.common.run_folder import CHECKPOINT_NAME, run_folder_lock, write_config, write_metrics
from tasks.common.schedule import OPTIMIZERS, POLICIES, WEIGHT_DECAY_SCOPES
from tasks.common.task import DATA_FIELDS, Task

SCALES = ("tiny", "paper")
_ABSENT = object()
log = logging.getLogger(__name__)
#: Keys left out of the config hash: how to run, not what (every other ``run`` key, ``seed`` and ``deterministic``
#: among them, is hashed), where the embedded data is cached, which image size speed columns time, how many images
#: TensorBoard shows, and which class implements the task (``task.name`` says which task it is; moving the class
#: does not change an experiment).
NOT_HASHED = ("run.device", "run.amp", "run.num_workers", "run.eval_every", "run.log_every", "run.progress",
              "run.find_unused_parameters", "run.stop_after_epochs", "data.embedded.dir", "data.verify",
              "task.speed_image_size", "task.tensorboard_images", "task._target_")
#: Shared keys added after runs were recorded, hashed only when they differ from the default that reproduces those
#: runs, so that a new option does not rename every finished experiment (and the committed tables' rows). A task's
#: own such keys are its ``Task.hash_defaults``.
HASHED_ONLY_IF_NOT_DEFAULT = {"schedule.weight_decay_on": "all"}
CONF_DIR = REPO_ROOT / "conf"


class ConfigError(ValueError):
    """A config value that cannot work; raised before any work starts."""


def _register_structured_configs() -> None:
    """``run=default`` is the ``RunSettings`` dataclass itself (its defaults are the config's, its types are checked
    when composing)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="run", name="default", node=RunSettings)


_register_structured_configs()


def resolved(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def compose(overrides: list[str]) -> DictConfig:
    """The config ``scripts/train.py <overrides>`` runs with (Hydra's compose API on ``conf/train.yaml``)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides))


def config_hash(cfg: DictConfig | dict) -> str:
    """12 hex digits identifying the experiment a config describes (see ``NOT_HASHED``,
    ``HASHED_ONLY_IF_NOT_DEFAULT`` and the task's ``Task.hash_defaults``)."""
    data = resolved(cfg) if isinstance(cfg, DictConfig) else json.loads(json.dumps(cfg))
    defaults = {**HASHED_ONLY_IF_NOT_DEFAULT, **_task_hash_defaults(data)}
    left_out = [(dotted, None) for dotted in NOT_HASHED] + [(dotted, [default]) for dotted, default in defaults.items()]
    for dotted, only_if in left_out:
        *parents, leaf = dotted.split(".")
        node = data
        for key in parents:
            node = node.get(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict) and leaf in node and (only_if is None or node[leaf] in only_if):
            node.pop(leaf)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]


def _task_hash_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """The ``hash_defaults`` of the task class a resolved config names; none for a config without a known task (its
    hash then keeps every key)."""
    target = (data.get("task") or {}).get("_target_") if isinstance(data.get("task"), dict) else None
    try:
        cls = import_task_class(target)
    except (UntrustedConfigError, ImportError, AttributeError):
        return {}
    return dict(getattr(cls, "hash_defaults", {}) or {})


def task_class(cfg: DictConfig) -> type[Task]:
    """The ``Task`` subclass named by ``task._target_`` (each ``conf/task/<name>.yaml`` names its own); any other
    target is refused before it is imported (``tasks.common.factories.import_task_class``)."""
    target = cfg.task.get("_target_")
    if not target:
        raise ConfigError(f"task {cfg.task.get('name')!r} has no task._target_: name its Task subclass in "
                          "conf/task/<name>.yaml, e.g. _target_: tasks.classification.task.ClassificationTask")
    try:
        cls = import_task_class(target)
    except UntrustedConfigError as error:
        raise ConfigError(str(error)) from None
    except Exception as error:
        raise ConfigError(f"task._target_={target} cannot be imported: {error}") from error
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task._target_={target} is not a subclass of tasks.common.task.Task")
    return cls


def _operator_nodes(node: Any, path: str = "") -> Iterator[tuple[str, DictConfig]]:
    """Every config node with a ``_target_`` but ``task`` (whose target is the Task class): the operator slots."""
    if isinstance(node, DictConfig):
        if "_target_" in node and path != "task":
            yield path, node
        for key in node:
            yield from _operator_nodes(node[key], f"{path}.{key}" if path else str(key))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            yield from _operator_nodes(item, f"{path}[{index}]")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: DictConfig) -> None:
    """Check the values a run depends on before any work starts; ``ConfigError`` names the key and the fix."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as error:  # omegaconf's errors name the key; say what it is about
        raise ConfigError(f"the config does not resolve: {error}") from error
    try:
        task_class(cfg).check_config(cfg)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    _require(cfg.scale.name in SCALES, f"scale={cfg.scale.name!r} is not one of {', '.join(SCALES)}")
    missing = [f"data.{field}" for field in DATA_FIELDS
               if OmegaConf.select(cfg, f"data.{field}", default=_ABSENT) is _ABSENT]
    _require(not missing, f"the data config lacks {', '.join(missing)}, which every task's data config has "
                          "(tasks.common.task.DATA_FIELDS)")
    root = cfg.data.get("root")
    if cfg.scale.name == "paper" and root is None:
        raise ConfigError(f"scale=paper trains on the real {cfg.data.name} dataset: set data.root=/path/to/it "
                          "(make: DATA_ROOT=/path/to/it); scale=tiny uses the embedded default")
    if root is not None and not Path(root).is_dir():
        raise ConfigError(f"data.root={root} is not a directory; point it at the {cfg.data.name} dataset, or "
                          "leave it unset (null) for the embedded default")

    s = schedule_from(cfg)
    _require(s.epochs >= 1, f"schedule.epochs must be an integer >= 1, got {s.epochs!r}")
    _require(s.batch_size >= 1, f"schedule.batch_size must be an integer >= 1, got {s.batch_size!r}")
    _require(s.lr > 0, f"schedule.lr must be > 0, got {s.lr!r}")
    _require(s.policy in POLICIES, f"schedule.policy={s.policy!r} is not one of {', '.join(POLICIES)}")
    _require(s.optimizer in OPTIMIZERS, f"schedule.optimizer={s.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
    _require(s.weight_decay_on in WEIGHT_DECAY_SCOPES,
             f"schedule.weight_decay_on={s.weight_decay_on!r} is not one of {', '.join(WEIGHT_DECAY_SCOPES)}")
    _require(s.warmup_epochs >= 0, f"schedule.warmup_epochs must be >= 0, got {s.warmup_epochs!r}")
    _require(all(m >= 0 for m in s.milestones), f"schedule.milestones must be >= 0, got {list(s.milestones)}")
    _require(s.clip_grad_norm is None or s.clip_grad_norm > 0,
             f"schedule.clip_grad_norm must be null or > 0, got {s.clip_grad_norm!r}")

    for key in ("max_iters_per_epoch", "max_eval_batches", "stop_after_epochs"):
        value = cfg.run.get(key)
        _require(value is None or (isinstance(value, int) and value >= 1),
                 f"run.{key} must be null (no limit) or an integer >= 1, got {value!r}")

    for path, node in _operator_nodes(cfg):
        try:
            factory = build_operator(node, path)
        except UntrustedConfigError as error:
            raise ConfigError(str(error)) from None
        try:
            factory(channels=64, scale_factor=2)
        except Exception as error:
            raise ConfigError(f"invalid {path} config ({_flat(node)}): {error}") from error


def _flat(node: DictConfig) -> str:
    return ", ".join(f"{k}={v}" for k, v in OmegaConf.to_container(node).items() if k != "_partial_")


def schedule_from(cfg: DictConfig) -> Schedule:
    """``cfg.schedule`` over the ``Schedule`` dataclass: its types are checked (``ConfigError`` naming the key) and
    the keys a schedule file leaves out take the dataclass's defaults, their only home."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Schedule), cfg.schedule)
    except ValidationError as error:
        raise ConfigError(f"schedule.{error.full_key}: {str(error.msg).splitlines()[0]}") from None
    return OmegaConf.to_object(merged)


def settings_from(cfg: DictConfig) -> RunSettings:
    return RunSettings(**resolved(cfg.run))


def named_run_folder(argv: list[str]) -> Path | None:
    """The run folder a ``scripts/train.py`` command line fixes before Hydra composes anything: the last
    ``hydra.run.dir=<folder>`` override, if it is a plain path (no ``${...}`` interpolation) and the command is not a
    multirun (``-m``); None otherwise (Hydra's default folders are new and time-stamped)."""
    if any(arg in ("-m", "--multirun") for arg in argv):
        return None
    named = [arg.split("=", 1)[1] for arg in argv if arg.startswith("hydra.run.dir=")]
    if not named or not named[-1] or "${" in named[-1]:
        return None
    return Path(named[-1].strip("'\""))


def hold_named_run_folder(argv: list[str]) -> contextlib.AbstractContextManager:
    """The lock of the run folder ``argv`` names (``named_run_folder``), taken by the main process (``RANK`` 0)
    before Hydra writes its ``.hydra/`` files and log there, so a second run in a locked folder stops without
    touching the first one's files (``RunFolderLocked``); a null context when no folder is named."""
    folder = named_run_folder(argv)
    if folder is None or int(os.environ.get("RANK", "0")) != 0:
        return contextlib.nullcontext()
    return run_folder_lock(folder)


def run_experiment(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any] | None:
    """Validate ``cfg``, train (resuming from ``run_dir``'s checkpoint if any), evaluate, and write
    ``run_dir/metrics.json``; returns that record (None if the run stopped early, as tests ask it to)."""
    started = time.perf_counter()
    validate(cfg)
    run_dir = Path(run_dir)
    world = init_world(cfg.run.device)
    try:
        with contextlib.ExitStack() as hold:
            if world.is_main:  # the other ranks work in the folder under rank 0's lock
                hold.enter_context(run_folder_lock(run_dir))
            return _run_locked(cfg, run_dir, world, started)
    finally:
        close_world()


def _run_locked(cfg: DictConfig, run_dir: Path, world: World, started: float) -> dict[str, Any] | None:
    chash = config_hash(cfg)
    if world.is_main:
        write_config(run_dir, cfg)
        log.info("run %s (%s, scale=%s) on %s x%d -> %s", chash, cfg.task.name, cfg.scale.name,
                 device_name(world.device), world.world_size, run_dir)
    task = task_class(cfg)(cfg, world)
    result = fit(task, schedule_from(cfg), settings_from(cfg), run_dir, world, chash)
    if not result.finished:
        return None
    # This process's segment is timed from its start (config checks and data preparation included); the earlier
    # segments of a resumed run come from its checkpoint.
    segments = [*result.segments[:-1], {**result.segments[-1], "wall_seconds": round(time.perf_counter() - started, 1)}]
    record = {
        "status": "finished", "task": cfg.task.name, "scale": cfg.scale.name, "config_hash": chash,
        "metrics": result.metrics, "primary_metric": task.primary_metric, "history": result.history,
        "dataset": task.dataset_description(), "device": device_name(world.device),
        "world_size": world.world_size, "threads": torch.get_num_threads(), "cpu": cpu_kernels(),
        "train_seconds": round(result.train_seconds, 1),
        "wall_seconds": round(sum(segment["wall_seconds"] for segment in segments), 1), "segments": segments,
        **git_state(), "finished_at": utc_now(), "torch": torch.__version__,
        "carafe_backends": carafe.backends.usage(),
    }
    if task.loaded_weights is not None:
        record["backbone_weights"] = task.loaded_weights
    if world.is_main:
        # The digest a fine-tuning run that loads this run's checkpoint records as its backbone_weights' sha256
        record["weights_sha256"] = content_digest(load_checkpoint(run_dir / CHECKPOINT_NAME)["model"])
        write_metrics(run_dir, record)
        log.info("finished %s: %s", run_dir, ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()))
    return record
