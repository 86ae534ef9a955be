"""Per-row ImageNet backbone weights for the detection and segmentation tables: files in a folder at paper scale,
pretraining runs found (or trained) by config hash at tiny scale. Every backbone is a run of this (the
classification) task, so the module lives here; the detection and segmentation tasks only load the file a row
names (``model.backbone_weights``), and the reproduction (``reproduction.spec``) composes the rows with it.

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

At tiny scale the same pretraining happens in miniature and is found by config hash instead of a folder of files
(docs/detection-tiny.md): ``pretraining_run(cfg)`` is the classification run on the embedded ImageNet-layout data
(``conf/experiment/classification/backbone_tiny.yaml``, seed 0) with the backbone ``cfg`` has, in
``runs/classification/<its config hash>``; ``ensure_pretrained`` trains it unless a finished run is there, once per
backbone for every table; ``fine_tuning_overrides`` are what a detection row then adds, the papers' protocol: those
weights, frozen BatchNorm, and the stem and first stage frozen; ``tiny_fine_tuning`` does all three for a row (the
hook for ``scripts/reproduce.py``). From the command line::

    python -m tasks.classification.backbones task=detection model=mask_rcnn_r50 scale=tiny   # prints the overrides
    python scripts/train.py task=detection model=mask_rcnn_r50 scale=tiny $(python -m tasks.classification.backbones \
        task=detection model=mask_rcnn_r50 scale=tiny)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from tasks.common.experiment import CONF_DIR, compose, config_hash
from tasks.common.provenance import REPO_ROOT
from tasks.common.run_folder import CHECKPOINT_NAME, finished_record

BACKBONE_KEY = "model.backbone_weights"
#: the experiment file of every tiny pretraining run (image size, classes, schedule)
TINY_PRETRAINING = "classification/backbone_tiny"
#: what a detector fine-tuned from ImageNet weights freezes, at paper scale (conf/task_scale/detection_paper.yaml)
#: and at tiny scale: BatchNorm statistics and affine (FrozenBatchNorm2d), and the stem and layer1 (mmdetection's
#: frozen_stages=1: three of the five stages train)
FROZEN = ("model.norm=frozen_bn", "model.trainable_backbone_layers=3")


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


def pretraining_overrides(cfg: DictConfig) -> list[str]:
    """``scripts/train.py`` overrides of the tiny classification run that pretrains the backbone of ``cfg`` (a
    detection or segmentation config): the same depth and downsampler, ``TINY_PRETRAINING``'s data and schedule,
    seed 0. ValueError for a depth or downsampler that has no config file to name."""
    if not takes_backbone_weights(cfg):
        raise ValueError(f"a {cfg.task.name} config takes no backbone weights (no model.backbone_weights)")
    depth = cfg.model.depth
    if not (CONF_DIR / "model" / f"resnet{depth}.yaml").is_file():
        raise ValueError(f"model.depth={depth}: no conf/model/resnet{depth}.yaml to pretrain a backbone with")
    name = downsampler_name(cfg.get("downsampler"))
    if name is not None and not (CONF_DIR / "downsampler" / f"{name}.yaml").is_file():
        raise ValueError(f"the downsampler settings {OmegaConf.to_container(cfg.downsampler, resolve=True)} match "
                         "no conf/downsampler/*.yaml file; add one so that its pretraining run can be named")
    return ["task=classification", f"model=resnet{depth}", *([f"downsampler={name}"] if name else []),
            "scale=tiny", f"experiment={TINY_PRETRAINING}"]


@dataclass(frozen=True)
class PretrainingRun:
    """The classification run whose checkpoint a tiny detection / segmentation row starts from."""
    name: str                 # backbone_name of the rows it serves: resnet50, resnet50-carafe, ...
    overrides: tuple[str, ...]
    config_hash: str
    run_dir: Path

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / CHECKPOINT_NAME

    def finished(self) -> bool:
        return finished_record(self.run_dir) is not None and self.checkpoint.is_file()

    def command(self, python: str = sys.executable) -> list[str]:
        return [python, str(REPO_ROOT / "scripts" / "train.py"), *self.overrides, f"hydra.run.dir={self.run_dir}"]


def pretraining_run(cfg: DictConfig, runs: str | Path = REPO_ROOT / "runs") -> PretrainingRun:
    """Where the pretraining of ``cfg``'s backbone lives: ``<runs>/classification/<config hash>`` (the layout of
    ``scripts/reproduce.py``'s runs store, so the run is found like any other)."""
    overrides = pretraining_overrides(cfg)
    chash = config_hash(compose(overrides))
    return PretrainingRun(backbone_name(cfg), tuple(overrides), chash, Path(runs).absolute() / "classification" / chash)


def run_command(command: list[str], cwd: Path) -> int:
    """Run ``command`` in ``cwd`` to its end; its exit status."""
    return subprocess.run(command, cwd=cwd).returncode


def ensure_pretrained(run: PretrainingRun, python: str = sys.executable,
                      runner: Callable[[list[str], Path], int] = run_command) -> Path:
    """The checkpoint of ``run``, trained first (in ``run.run_dir``, resuming an interrupted run) unless it has
    finished; RuntimeError naming the log when training fails. ``runner(command, cwd) -> exit status`` runs the
    training (``scripts/reproduce.py`` can pass its ``run_child``, which stops the child when it is stopped)."""
    if not run.finished():
        run.run_dir.mkdir(parents=True, exist_ok=True)
        print(f"pretraining backbone {run.name} ({run.config_hash}) in {run.run_dir}", file=sys.stderr, flush=True)
        returncode = runner(run.command(python), REPO_ROOT)
        if returncode or not run.finished():
            raise RuntimeError(f"pretraining {run.name} failed (exit {returncode}); see {run.run_dir}/train.log")
    return run.checkpoint


def fine_tuning_overrides(checkpoint: str | Path) -> list[str]:
    """The overrides that make a detection / segmentation run fine-tune the backbone in ``checkpoint`` as the
    papers do (``FROZEN``); a checkpoint inside the repository is named relative to it, so that the rows' config
    hashes are the same in every checkout."""
    path = Path(checkpoint).absolute()
    shown = path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path
    return [f"{BACKBONE_KEY}={shown}", *FROZEN]


def tiny_fine_tuning(cfg: DictConfig, runs: str | Path = REPO_ROOT / "runs", train: bool = True,
                     runner: Callable[[list[str], Path], int] = run_command) -> list[str]:
    """The overrides a tiny detection config adds to fine-tune its pretrained backbone, that backbone's run trained
    first when ``train`` (else the overrides name its checkpoint whether or not it exists yet: for listing or
    rendering a table, whose validation then names the missing file)."""
    run = pretraining_run(cfg, runs)
    return fine_tuning_overrides(ensure_pretrained(run, runner=runner) if train else run.checkpoint)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Print the overrides that make a tiny detection run start from its pretrained backbone, "
                    "training that backbone first unless its run has finished.")
    parser.add_argument("--runs", type=Path, default=REPO_ROOT / "runs", help="the runs store")
    parser.add_argument("--no-train", action="store_true", help="fail instead of training a missing backbone")
    parser.add_argument("overrides", nargs="+", metavar="KEY=VALUE", help="the detection run's")
    args = parser.parse_args(argv)
    cfg = compose(args.overrides)
    run = pretraining_run(cfg, args.runs)
    if args.no_train and not run.finished():
        print(f"no finished pretraining of {run.name} in {run.run_dir}: run `{' '.join(run.command('python'))}`",
              file=sys.stderr)
        return 1
    print(" ".join(tiny_fine_tuning(cfg, args.runs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
