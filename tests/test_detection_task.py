"""The detection task through the shared engine: a training step and a COCO evaluation of each detector with a
few upsamplers, metrics over every validation image (also under 2-process DDP), backbone weights, config checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from experiment_helpers import detection_smoke
from tasks.common.experiment import ConfigError, compose, config_hash, run_experiment, validate
from tasks.common.resnet import load_backbone_weights

REPO = Path(__file__).resolve().parents[1]
NUM_VAL = 3
BOX_METRICS = {f"bbox_{m}" for m in ("AP", "AP50", "AP75")}
SEGM_METRICS = {f"segm_{m}" for m in ("AP", "AP50", "AP75")}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "coco-tiny"


EXPERIMENTS = sorted(p.stem for p in (REPO / "conf/experiment/detection").glob("*.yaml"))


@pytest.mark.parametrize("overrides", [
    *([f"experiment=detection/{name}"] for name in EXPERIMENTS),
    ["model=faster_rcnn_r50", "upsampler@fpn_upsampler=gum", "downsampler=carafe"],
    ["model=mask_rcnn_r50", "upsampler@mask_upsampler=pixel_shuffle"],
], ids=lambda o: "+".join(v.split("=")[1] for v in o))
def test_one_training_step_and_coco_evaluation(overrides: list[str], data_dir: Path, tmp_path: Path) -> None:
    cfg = compose([*detection_smoke(data_dir, num_val=NUM_VAL), *overrides])
    record = run_experiment(cfg, tmp_path)
    assert record is not None and record["config_hash"] == config_hash(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    expected = BOX_METRICS | (SEGM_METRICS if "mask" in overrides[0] else set())
    assert expected <= set(metrics)
    assert any(k.startswith("segm_") for k in metrics) == ("mask" in overrides[0])
    assert all(0 <= v <= 100 for k, v in metrics.items() if k != "images")
    assert metrics["images"] == NUM_VAL  # every validation image scored, including the one without objects
    losses = record["history"][0]["train"]
    assert {"loss", "loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)
    assert ("loss_mask" in losses) == ("mask" in overrides[0])
    # the gradient norm before clipping (schedule.clip_grad_norm: 35) is on TensorBoard, to diagnose an unstable start
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert b"train/grad_norm" in events


def test_two_process_ddp_scores_every_validation_image_once(data_dir: Path, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "scripts/train.py", *detection_smoke(data_dir, num_val=NUM_VAL), "run.device=cpu", f"hydra.run.dir={tmp_path}"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "metrics.json").read_text())
    assert record["world_size"] == 2 and record["metrics"]["images"] == NUM_VAL


def test_backbone_weights_from_a_classification_checkpoint(tmp_path: Path) -> None:
    from tasks.classification.model import build_classifier
    from tasks.common.io import save_checkpoint
    from tasks.detection.model import build_backbone

    classifier = build_classifier(50, 16, None)
    save_checkpoint(tmp_path / "cls.pt", {"model": classifier.state_dict()})
    backbone = build_backbone(50)
    digest = load_backbone_weights(backbone.body, tmp_path / "cls.pt")
    assert torch.equal(backbone.body.layer3[2].conv2.weight, classifier.layer3[2].conv2.weight)
    # the digest is of the weights: the same whatever else the file holds, another when one weight changes
    save_checkpoint(tmp_path / "other.pt", {"model": classifier.state_dict(), "epoch": 3, "history": [1.0]})
    assert load_backbone_weights(backbone.body, tmp_path / "other.pt") == digest
    with torch.no_grad():
        classifier.layer3[2].conv2.weight[0, 0, 0, 0] += 2.0 ** -20
    save_checkpoint(tmp_path / "changed.pt", {"model": classifier.state_dict()})
    assert load_backbone_weights(backbone.body, tmp_path / "changed.pt") != digest
    with pytest.raises(ValueError, match="does not fit .* missing .*unexpected"):
        load_backbone_weights(build_backbone(101).body, tmp_path / "cls.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_backbone_weights(backbone.body, tmp_path / "nothing.pt")


def test_imagenet_weights_load_into_a_dcnv2_backbone_whose_offset_predictors_stay_zero(tmp_path: Path) -> None:
    from tasks.common.io import save_checkpoint
    from tasks.common.resnet import build_resnet
    from tasks.detection.model import build_backbone

    plain = build_resnet(50, num_classes=10)
    save_checkpoint(tmp_path / "imagenet.pth", plain.state_dict())
    backbone = build_backbone(50, dcn_stages=("c3", "c4", "c5"))
    load_backbone_weights(backbone.body, tmp_path / "imagenet.pth")
    dcn = backbone.body.layer3[1].conv2
    assert torch.equal(dcn.weight, plain.layer3[1].conv2.weight)
    assert not dcn.offset_mask.weight.any() and not dcn.offset_mask.bias.any()


def test_dcn_stages_default_leaves_config_hashes_unchanged() -> None:
    cfg = compose(["task=detection"])
    without_key = OmegaConf.to_container(cfg, resolve=True)
    del without_key["model"]["dcn_stages"]
    assert config_hash(cfg) == config_hash(without_key)  # runs recorded before the option keep their identity
    assert config_hash(compose(["task=detection", "model.dcn_stages=[c3,c4,c5]"])) != config_hash(cfg)


@pytest.mark.parametrize("overrides, words", [
    (["upsampler@fpn_upsampler=carafe", "fpn_upsampler.up_kernel=4"], ["fpn_upsampler", "up_kernel"]),
    (["model=mask_rcnn_r50", "upsampler@mask_upsampler=carafe", "mask_upsampler.normalizer=tanh"],
     ["mask_upsampler", "normalizer", "tanh"]),
    (["model.arch=retinanet"], ["model.arch", "retinanet", "faster_rcnn"]),
    (["model.norm=frozen_bn"], ["frozen_bn", "model.backbone_weights"]),
    (["model.backbone_weights=/nonexistent.pth"], ["model.backbone_weights=/nonexistent.pth", "not a file"]),
    (["scale=paper", f"data.root={REPO}"], ["model.backbone_weights"]),
    (["model.dcn_stages=[c3,res4]"], ["model.dcn_stages", "res4", "c5"]),
])
def test_invalid_detection_values_fail_before_any_work(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["task=detection", *overrides]))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_mask_upsampler_overrides_reach_the_model() -> None:
    from hydra.utils import instantiate

    from carafe import CARAFEPack
    from carafe.upsamplers import DeconvUpsample
    from tasks.detection.task import DetectionTask
    from tasks.common.distributed import World

    world = World(0, 1, 0, torch.device("cpu"))
    model = DetectionTask(compose(["task=detection", "model=mask_rcnn_r50", "upsampler@fpn_upsampler=carafe"]),
                          world).build_model()
    upsample = model.roi_heads.mask_predictor.upsample
    assert isinstance(upsample, DeconvUpsample) and upsample.deconv.kernel_size == (2, 2)
    assert all(isinstance(u, CARAFEPack) for u in model.backbone.fpn.upsamplers)
    cfg = compose(["task=detection", "model=mask_rcnn_r50", "upsampler@mask_upsampler=carafe"])
    assert isinstance(DetectionTask(cfg, world).build_model().roi_heads.mask_predictor.upsample, CARAFEPack)
    assert instantiate(cfg.fpn_upsampler).func.__name__ == "InterpolateUpsample"


# ---- the tiny scale's pretrained backbone (tasks/classification/backbones.py) ------------------------------------------

def test_pretraining_run_names_the_classification_run_of_the_same_backbone() -> None:
    from tasks.classification import backbones

    plain = backbones.pretraining_run(compose(["task=detection", "scale=tiny"]))
    # the plain ResNet-50's pretraining is CARAFE++ Table II's ResNet-50 row: the hash its committed JSON holds
    table = json.loads((REPO / "results" / "table-pp-2.json").read_text())
    assert plain.config_hash == next(r["config_hash"] for r in table["rows"] if r["label"] == "ResNet-50")
    assert plain.run_dir == (REPO / "runs" / "classification" / plain.config_hash)
    deep = backbones.pretraining_run(compose(["task=detection", "scale=tiny", "model=mask_rcnn_r101",
                                              "downsampler=carafe", "model.dcn_stages=[c3,c4,c5]"]))
    assert deep.name == "resnet101-carafe"
    assert {"model=resnet101", "downsampler=carafe"} <= set(deep.overrides)
    cfg = compose(list(deep.overrides))
    assert cfg.task.name == "classification" and cfg.model.depth == 101 and cfg.data.crop_size == 32
    with pytest.raises(ValueError, match="match no conf/downsampler"):
        backbones.pretraining_overrides(compose(["task=detection", "downsampler=carafe",
                                                 "downsampler.compressed_channels=8"]))
    with pytest.raises(ValueError, match="takes no backbone weights"):
        backbones.pretraining_overrides(compose(["task=classification"]))


def test_a_detector_fine_tunes_the_backbone_its_pretraining_run_trained(tmp_path: Path) -> None:
    """ensure_pretrained trains the missing run once (here in-process, a one-iteration smoke run, in place of the
    ``scripts/train.py`` subprocess it is given), reuses it after, and fails with the log's name; the detector built with
    fine_tuning_overrides holds the checkpoint's weights with BatchNorm, stem and layer1 frozen."""
    from dataclasses import replace

    from experiment_helpers import smoke_overrides
    from tasks.classification import backbones
    from tasks.common.distributed import World
    from tasks.common.io import load_checkpoint
    from tasks.detection.task import DetectionTask
    from torchvision.ops import FrozenBatchNorm2d

    detection = [*detection_smoke(tmp_path / "coco"), "model=faster_rcnn_r50"]
    run = backbones.pretraining_run(compose(detection), tmp_path / "runs")
    run = replace(run, overrides=(*run.overrides, *smoke_overrides(tmp_path / "imagenet")))
    calls = []

    def train_in_process(command: list[str], cwd: Path) -> int:
        calls.append(command)
        assert command[1] == str(REPO / "scripts" / "train.py") and command[-1] == f"hydra.run.dir={run.run_dir}"
        run_experiment(compose(command[2:-1]), run.run_dir)
        return 0

    checkpoint = backbones.ensure_pretrained(run, runner=train_in_process)
    assert checkpoint == run.run_dir / "checkpoint.pt" and run.finished() and len(calls) == 1
    assert backbones.ensure_pretrained(run, runner=train_in_process) == checkpoint and len(calls) == 1  # found

    cfg = compose([*detection, *backbones.fine_tuning_overrides(checkpoint)])
    validate(cfg)
    task = DetectionTask(cfg, World(0, 1, 0, torch.device("cpu")))
    body = task.build_model().backbone.body
    trained = load_checkpoint(checkpoint)["model"]
    # the fine-tuning run records the digest the pretraining run recorded of its final weights
    pretraining = json.loads((run.run_dir / "metrics.json").read_text())
    assert task.loaded_weights["sha256"] == pretraining["weights_sha256"]
    assert len(pretraining["weights_sha256"]) == 64 and "torch CPU capability" in pretraining["cpu"]
    for key, value in body.state_dict().items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0, msg=key)
    assert isinstance(body["bn1"], FrozenBatchNorm2d) and isinstance(body["layer4"][0].downsample[1], FrozenBatchNorm2d)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in body.modules())
    assert not any(p.requires_grad for name in ("conv1", "layer1") for p in body[name].parameters())
    assert all(p.requires_grad for name in ("layer2", "layer3", "layer4") for p in body[name].parameters())

    failing = replace(run, run_dir=tmp_path / "runs" / "classification" / "broken")
    with pytest.raises(RuntimeError, match="exit 3.*broken/train.log"):
        backbones.ensure_pretrained(failing, runner=lambda command, cwd: 3)
