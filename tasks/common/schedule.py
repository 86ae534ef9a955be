"""Optimiser and learning-rate schedule from plain arguments (the ``schedule`` config group).

The learning rate follows the linear scaling rule: ``lr`` is given for ``base_batch_size`` images and scaled to
the global batch. It ramps up linearly from ``warmup_factor * lr`` over ``warmup_epochs`` (fractions allowed), then
decays by ``policy``: ``step`` (x ``gamma`` at each epoch in ``milestones``), ``cosine`` (to 0 at the end) or
``poly`` (``(1 - t) ** power``). The schedule is evaluated per iteration.

Weight decay applies to every parameter (``weight_decay_on="all"``) or, as the official CSAIL semantic-segmentation
code does (its ``group_weight``), to the weights of convolutions and linear layers only
(``"conv_linear_weights"``): their biases, BatchNorm's affine parameters and any other parameter are not decayed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

POLICIES = ("step", "cosine", "poly")
OPTIMIZERS = ("sgd", "adam")
WEIGHT_DECAY_SCOPES = ("all", "conv_linear_weights")


def scaled_lr(lr: float, batch_size: int, base_batch_size: int) -> float:
    return lr * batch_size / base_batch_size


def lr_factor(epoch: float, epochs: float, policy: str = "step", milestones: Sequence[float] = (),
              gamma: float = 0.1, power: float = 0.9, warmup_epochs: float = 0.0,
              warmup_factor: float = 0.001) -> float:
    """The multiplier of the peak learning rate at (fractional) ``epoch``."""
    if policy == "step":
        factor = gamma ** sum(epoch >= m for m in milestones)
    elif policy == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    elif policy == "poly":
        factor = max(1.0 - epoch / epochs, 0.0) ** power
    else:
        raise ValueError(f"unknown lr policy {policy!r}; choose one of {', '.join(POLICIES)}")
    if epoch < warmup_epochs:
        factor *= warmup_factor + (1.0 - warmup_factor) * epoch / warmup_epochs
    return factor


def weight_decay_groups(model: nn.Module, params: Iterable[nn.Parameter], scope: str = "all"
                        ) -> list[dict[str, object]]:
    """``params`` (those of ``model`` one optimizer steps) as optimizer parameter groups for ``scope``: one group
    for ``all``; for ``conv_linear_weights`` the conv / linear weights, then a group with ``weight_decay`` 0 for the
    rest (an empty group is left out)."""
    params = list(params)
    if scope == "all":
        return [{"params": params}]
    if scope != "conv_linear_weights":
        raise ValueError(f"unknown weight decay scope {scope!r}; choose one of {', '.join(WEIGHT_DECAY_SCOPES)}")
    decayed = {id(m.weight) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and isinstance(m.weight, nn.Parameter)}
    groups = [{"params": [p for p in params if id(p) in decayed]},
              {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(params: Iterable[nn.Parameter] | Iterable[dict[str, object]], name: str, lr: float,
                    momentum: float = 0.9, weight_decay: float = 0.0, nesterov: bool = False,
                    betas: Sequence[float] = (0.9, 0.999)) -> torch.optim.Optimizer:
    """SGD or Adam over the trainable ones of ``params`` (parameters, or parameter groups as
    ``weight_decay_groups`` returns them; a group's own ``weight_decay`` overrides ``weight_decay``)."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, iters_per_epoch: int, epochs: float,
                       policy: str = "step", milestones: Sequence[float] = (), gamma: float = 0.1,
                       power: float = 0.9, warmup_epochs: float = 0.0,
                       warmup_factor: float = 0.001) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-iteration ``LambdaLR``; call ``step()`` after every optimiser step."""
    if iters_per_epoch < 1:
        raise ValueError(f"an epoch needs at least one iteration, got iters_per_epoch={iters_per_epoch} "
                         "(is the training set smaller than one global batch?)")

    def factor(iteration: int) -> float:
        return lr_factor(iteration / iters_per_epoch, epochs, policy, milestones, gamma, power, warmup_epochs,
                         warmup_factor)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
