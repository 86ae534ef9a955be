"""Per-row ImageNet backbone weights for the detection and segmentation tables at paper scale.

The papers fine-tune each detector / segmenter from an ImageNet-trained ResNet *with the same backbone*: a row with
CARAFE++ (or max pooling, DPP, ...) at the ResNet's downsampling places starts from an ImageNet run of the
classification task with that downsampler (CARAFE++ section 4.2). ``scripts/reproduce.py --backbones DIR`` (``make
... BACKBONES=DIR``) gives every row of a table ``model.backbone_weights=DIR/<name>.pt``, where ``<name>`` says which
backbone the row has:

    resnet50                  plain ResNet-50 (torchvision's ImageNet file, or the plain classification run)
    resnet50-carafe           ResNet-50 with downsampler=carafe (CARAFE++) in its seven downsampling places
    resnet101-max_pool        ResNet-101 with downsampler=max_pool
    resnet50-CARAFEDownPack-<8 hex>   a downsampler whose settings match no conf/downsampler/*.yaml file

A DCNv2 backbone (``model.dcn_stages``) takes the weights of its plain counterpart (its deformable convs load the
plain 3x3 weights, and their offset / modulation predictors start at zero), so it shares the name.
``missing_backbones`` lists the files a table lacks with the classification command that makes each.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.common.experiment import CONF_DIR

BACKBONE_KEY = "model.backbone_weights"


def takes_backbone_weights(cfg: DictConfig) -> bool:
    return "model" in cfg and "backbone_weights" in cfg.model


def downsampler_name(node: Any) -> str | None:
    """The ``conf/downsampler/<name>.yaml`` whose settings equal ``node`` (None for no downsampler), or the
    operator's class name and a digest of its settings when no file matches."""
    if node is None:
        return None
    settings = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
    for path in sorted((CONF_DIR / "downsampler").glob("*.yaml")):
        if OmegaConf.to_container(OmegaConf.load(path), resolve=True) == settings:
            return path.stem
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:8]
    return f"{str(settings.get('_target_', 'downsampler')).rsplit('.', 1)[-1]}-{digest}"


def backbone_name(cfg: DictConfig) -> str:
    """Which ImageNet backbone a detection / segmentation config needs: ``resnet<depth>[-<downsampler>]``."""
    name = downsampler_name(cfg.get("downsampler"))
    return f"resnet{cfg.model.depth}" + (f"-{name}" if name else "")


def classification_command(cfg: DictConfig) -> str:
    """The classification run whose ``checkpoint.pt`` is the backbone ``cfg`` needs, as markdown: the command in
    backticks, then any remark."""
    name = downsampler_name(cfg.get("downsampler"))
    command = f"scripts/train.py task=classification model=resnet{cfg.model.depth} scale=paper data.root=<ImageNet>"
    if name is None:
        return f"`{command}` (or torchvision's ImageNet ResNet-{cfg.model.depth} file)"
    if (CONF_DIR / "downsampler" / f"{name}.yaml").is_file():
        return f"`{command} downsampler={name}`"
    return f"`{command}` with the downsampler settings {OmegaConf.to_container(cfg.downsampler, resolve=True)}"


def missing_backbones(needed: dict[Path, DictConfig]) -> str:
    """A message listing each backbone file of ``needed`` (path -> a config that needs it) that does not exist,
    with the command that produces it; empty when all exist."""
    lines = [f"  {path}: the checkpoint.pt of {classification_command(cfg)}"
             for path, cfg in sorted(needed.items()) if not path.is_file()]
    return "\n".join(lines)
