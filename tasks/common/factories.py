"""Building what a config names without running anything else: the ``_target_`` keys of a run's config are checked
against an allow-list before anything is imported or called.

A run folder's ``config.yaml`` is data handed to the project (the figure scripts and ``reproduce.py`` load finished
runs from folders and table JSON files), so it must not be able to name an arbitrary callable: Hydra's
``instantiate`` would call ``torch.load``, ``builtins.open`` or ``shutil.rmtree`` as readily as an upsampler. Here:

- ``task._target_`` must be one of the ``Task`` classes that ``conf/task/*.yaml`` name (``allowed_task_targets``);
- an operator slot (``upsampler``, ``fpn_upsampler``, ``downsampler``, ...) must name a class of the zoo's registries
  (``carafe.upsamplers.UPSAMPLERS``, ``carafe.downsamplers.DOWNSAMPLERS``; ``allowed_operator_targets``) with
  ``_partial_: true`` and plain arguments (numbers, strings, booleans, null, lists of them): ``build_operator``
  returns ``functools.partial(cls, **arguments)``, which the model builders call with ``channels`` and
  ``scale_factor`` as they called Hydra's ``_partial_`` objects.

Anything else raises ``UntrustedConfigError`` (a ``ValueError``) naming the key, before any import.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from tasks.common.provenance import REPO_ROOT

TASK_CONF_DIR = REPO_ROOT / "conf" / "task"
PLAIN = (str, int, float, bool, type(None))


class UntrustedConfigError(ValueError):
    """A config names something outside the allow-list of what a run may build."""


@functools.lru_cache(maxsize=None)
def allowed_task_targets() -> tuple[str, ...]:
    """The ``task._target_`` of every ``conf/task/<name>.yaml`` (the repository's own files, not a run's)."""
    targets = []
    for path in sorted(TASK_CONF_DIR.glob("*.yaml")):
        target = OmegaConf.select(OmegaConf.load(path), "task._target_")
        if isinstance(target, str):
            targets.append(target)
    return tuple(targets)


def import_task_class(target: object, key: str = "task._target_") -> type:
    """The class ``target`` names if it is one of ``allowed_task_targets``; ``UntrustedConfigError`` naming ``key``
    (and nothing imported) otherwise."""
    allowed = allowed_task_targets()
    if not isinstance(target, str) or target not in allowed:
        raise UntrustedConfigError(f"{key}={target} cannot be imported: it is not a subclass of "
                                   f"tasks.common.task.Task that conf/task/ names ({', '.join(allowed)})")
    module, _, name = target.rpartition(".")
    return getattr(importlib.import_module(module), name)


@functools.lru_cache(maxsize=None)
def allowed_operator_targets() -> dict[str, type]:
    """``module.Class`` -> class for every operator registered in the zoo (upsamplers and downsamplers)."""
    from carafe.downsamplers import DOWNSAMPLERS
    from carafe.upsamplers import UPSAMPLERS

    classes = {}
    for registry in (UPSAMPLERS, DOWNSAMPLERS):
        for name in registry.names:
            cls, _ = registry.entry(name)
            classes[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return classes


def _plain(value: Any, key: str) -> Any:
    """``value`` as plain Python data if it is a number, string, boolean, null or a list of those; else refused."""
    if isinstance(value, PLAIN):
        return value
    if isinstance(value, (ListConfig, list, tuple)):
        return [_plain(item, f"{key}[{index}]") for index, item in enumerate(value)]
    kind = "a mapping" if isinstance(value, (DictConfig, Mapping)) else type(value).__name__
    raise UntrustedConfigError(f"{key} is {kind}; an operator's arguments must be numbers, strings, booleans, null "
                               "or lists of them")


def build_operator(node: Any, key: str) -> functools.partial | None:
    """The operator factory the config node at ``key`` describes (None for a null node): ``functools.partial`` of
    an allowed zoo class (``allowed_operator_targets``) with the node's plain arguments. ``UntrustedConfigError``
    naming the key for any other ``_target_``, a missing ``_partial_: true``, another ``_``-key (``_args_``,
    ``_recursive_``, ...) or an argument that is not plain data; nothing is imported or called for a refused node."""
    if node is None:
        return None
    if not isinstance(node, (DictConfig, Mapping)):
        raise UntrustedConfigError(f"{key} must be an operator config (a mapping with _target_), got "
                                   f"{type(node).__name__}")
    items = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = items.pop("_target_", None)
    allowed = allowed_operator_targets()
    if target not in allowed:
        raise UntrustedConfigError(f"{key}._target_={target} is not an operator of the zoo; allowed: "
                                   f"{', '.join(sorted(allowed))}")
    if items.pop("_partial_", None) is not True:
        raise UntrustedConfigError(f"{key}._partial_ must be true (the model builders call the operator with its "
                                   "channels and scale factor)")
    special = sorted(name for name in items if not isinstance(name, str) or name.startswith("_"))
    if special:
        raise UntrustedConfigError(f"{key} holds {', '.join(map(str, special))}; an operator config takes only "
                                   "_target_, _partial_ and the operator's own arguments")
    arguments = {name: _plain(value, f"{key}.{name}") for name, value in items.items()}
    return functools.partial(allowed[target], **arguments)


def build_slot(cfg: Any, key: str) -> functools.partial | None:
    """``build_operator`` of ``cfg.<key>`` (None when the key is missing or null)."""
    return build_operator(cfg.get(key), key)


__all__ = ["UntrustedConfigError", "allowed_operator_targets", "allowed_task_targets", "build_operator",
           "build_slot", "import_task_class"]
