"""Every config group composes, every operator option instantiates, and bad values fail before any work starts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from carafe import build_downsampler, build_upsampler
from tasks.common.experiment import CONF_DIR, ConfigError, compose, config_hash, validate

REPO = Path(__file__).resolve().parents[1]


def options(group: str) -> list[str]:
    return sorted(str(p.relative_to(CONF_DIR / group).with_suffix("")) for p in (CONF_DIR / group).rglob("*.yaml"))


DETECTION_OPTIONS = ("faster_rcnn", "mask_rcnn", "coco")  # options of model / data / schedule for task=detection


@pytest.mark.parametrize("group", ["model", "data", "schedule", "scale", "run", "task", "downsampler"])
def test_every_option_of_a_group_composes_and_validates(group: str) -> None:
    for option in options(group):
        overrides = [f"{group}={option}"]
        if group != "task" and option.startswith(DETECTION_OPTIONS):
            overrides.insert(0, "task=detection")
        if group == "scale" and option == "paper":
            overrides.append(f"data.root={REPO}")  # any existing folder: validation only checks it exists
        cfg = compose(overrides)
        validate(cfg)


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str) -> None:
    validate(compose([f"experiment={experiment}"]))


@pytest.mark.parametrize("name", options("downsampler"))
def test_downsampler_configs_instantiate_to_working_operators(name: str) -> None:
    cfg = compose([f"downsampler={name}"])
    op = build_downsampler(instantiate(cfg.downsampler), channels=8, scale_factor=2)
    assert op(torch.randn(1, 8, 7, 9)).shape == (1, 8, 4, 5)


@pytest.mark.parametrize("name", options("upsampler"))
def test_upsampler_configs_instantiate_to_working_operators(name: str) -> None:
    node = compose([f"+upsampler={name}"]).upsampler
    op = build_upsampler(instantiate(node), channels=8, scale_factor=2)
    assert op(torch.randn(1, 8, 5, 6)).shape == (1, 8, 10, 12)


def test_model_depth_and_downsampler_reach_the_built_network() -> None:
    from carafe import CARAFEDownPack
    from tasks.classification.model import build_classifier

    cfg = compose(["model=resnet101", "downsampler=carafe", "downsampler.compressed_channels=8"])
    model = build_classifier(cfg.model.depth, cfg.data.num_classes, instantiate(cfg.downsampler))
    carafes = [m for m in model.modules() if isinstance(m, CARAFEDownPack)]
    assert len(carafes) == 7 and all(m.compressed_channels == 8 for m in carafes)
    assert len(model.layer3) == 23 and model.fc.out_features == 16


@pytest.mark.parametrize("overrides, words", [
    (["downsampler=carafe", "downsampler.down_kernel=4"], ["downsampler", "down_kernel", "odd", "4"]),
    (["downsampler=carafe", "downsampler.compressed_channels=0"], ["compressed_channels", "0"]),
    (["downsampler=carafe", "downsampler.compressed_channels=-8"], ["compressed_channels", "-8"]),
    (["downsampler=carafe", "downsampler.normalizer=tanh"], ["normalizer", "tanh", "softmax"]),
    (["downsampler=carafe", "downsampler.encoder_kernel=2"], ["encoder_kernel", "odd"]),
    (["schedule.epochs=0"], ["schedule.epochs", ">= 1"]),
    (["schedule.lr=-0.1"], ["schedule.lr"]),
    (["schedule.policy=linear"], ["schedule.policy", "step"]),
    (["schedule.optimizer=lamb"], ["schedule.optimizer", "sgd"]),
    (["schedule.weight_decay_on=everything"], ["schedule.weight_decay_on='everything'", "conv_linear_weights"]),
    (["scale=paper"], ["data.root", "DATA_ROOT"]),
    (["data.root=/nonexistent/imagenet"], ["data.root=/nonexistent/imagenet", "not a directory"]),
])
def test_invalid_values_raise_a_config_error_naming_them(overrides: list[str], words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_train_script_fails_fast_on_a_bad_value(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "scripts/train.py", "downsampler=carafe", "schedule.lr=abc",
                             f"hydra.run.dir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "config error: schedule.lr" in result.stderr and "abc" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "checkpoint.pt").exists() and "Traceback" not in result.stderr


@pytest.mark.parametrize("override, words", [
    ("downsampler.compressed_channels=0", ["compressed_channels"]),
    ("schedule.lr=abc", ["schedule.lr", "abc", "Float"]),
    ("schedule.epochs=2.5", ["schedule.epochs", "2.5", "Integer"]),
])
def test_wrong_values_and_types_are_config_errors_naming_the_key(override: str, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        validate(compose(["downsampler=carafe", override]))
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_a_run_value_of_the_wrong_type_is_refused_when_composing() -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as info:  # run=default is the RunSettings dataclass
        compose(["run.num_workers=abc"])
    assert "run.num_workers=abc" in str(info.value) and "Integer" in str(info.value.__cause__)


def test_every_task_names_its_class_and_a_wrong_target_is_a_config_error() -> None:
    from tasks.common.experiment import task_class
    from tasks.common.task import Task

    for option in options("task"):
        assert issubclass(task_class(compose([f"task={option}"])), Task)
    with pytest.raises(ConfigError, match="task._target_=tasks.nowhere.Task cannot be imported"):
        validate(compose(["task._target_=tasks.nowhere.Task"]))
    with pytest.raises(ConfigError, match="not a subclass"):
        validate(compose(["task._target_=torch.nn.Linear"]))


def test_every_task_has_the_shared_data_fields_and_a_config_without_one_is_refused() -> None:
    from omegaconf import OmegaConf, open_dict

    from tasks.common.task import DATA_FIELDS

    for option in options("task"):
        cfg = compose([f"task={option}"])
        assert all(OmegaConf.select(cfg, f"data.{field}", default="absent") != "absent" for field in DATA_FIELDS)
    cfg = compose(["task=inpainting"])
    with open_dict(cfg):
        del cfg.data.verify
        del cfg.data.embedded.dir
    with pytest.raises(ConfigError, match=r"lacks data\.verify, data\.embedded\.dir"):
        validate(cfg)


def test_missing_imagenet_layout_says_what_is_expected(tmp_path: Path) -> None:
    from tasks.classification.data import check_imagenet_layout

    (tmp_path / "train").mkdir()
    with pytest.raises(FileNotFoundError, match=r"missing .*val.*<root>/train/<wnid>"):
        check_imagenet_layout(tmp_path)


def test_config_hash_ignores_how_to_run_but_not_what() -> None:
    base = compose(["downsampler=carafe"])
    assert config_hash(base) == config_hash(compose(["downsampler=carafe", "run.num_workers=3",
                                                     "run.device=cpu", "data.embedded.dir=/elsewhere"]))
    assert config_hash(base) != config_hash(compose(["downsampler=carafe", "downsampler.compressed_channels=8"]))
    assert config_hash(base) != config_hash(compose(["downsampler=carafe", "run.seed=1"]))
    assert config_hash(base) != config_hash(compose([]))
