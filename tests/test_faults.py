"""Faults and hostile input around runs: checkpoints that would run code, truncated files, a run folder two runs
want, a finished run without its metric, corrupt images. Each probe checks what happened, not only that an error
was raised: the code in a malicious checkpoint must not have run, the run must not be marked finished."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from experiment_helpers import detection_smoke, smoke_overrides
from tasks.common.data import CorruptImageError, read_rgb
from tasks.common.engine import MetricError, check_metrics
from tasks.common.experiment import ConfigError, compose, run_experiment, validate
from tasks.common.io import (CheckpointError, RunFolderLocked, load_checkpoint, remove_stale_temporaries,
                             run_folder_lock, save_checkpoint, write_text_atomic)

REPO = Path(__file__).resolve().parents[1]


class _WritesAFile:
    """Unpickling this calls ``Path.touch(marker)``: the stand-in for any code an attacker's pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _malicious_checkpoint(path: Path, marker: Path) -> Path:
    torch.save({"model": {}, "epoch": 1, "payload": _WritesAFile(marker)}, path)
    assert not marker.exists()
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "imagenet-tiny"


def test_a_checkpoint_holding_code_is_refused_by_the_loader(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    with pytest.raises(CheckpointError, match="evil.pt"):
        load_checkpoint(path)
    assert not marker.exists()


def test_resume_refuses_a_malicious_checkpoint_before_running_it(data_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    _malicious_checkpoint(run_dir / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        run_experiment(compose(smoke_overrides(data_dir)), run_dir)
    assert not marker.exists() and not (run_dir / "metrics.json").exists()


def test_backbone_weights_refuse_a_malicious_file(tmp_path: Path) -> None:
    from tasks.common.resnet import load_backbone_weights
    from torchvision.models import resnet18

    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "resnet.pth", marker)
    with pytest.raises(CheckpointError, match="resnet.pth"):
        load_backbone_weights(resnet18(), path)
    assert not marker.exists()


def test_reproduce_speed_step_refuses_a_malicious_checkpoint_in_a_from_folder(tmp_path: Path) -> None:
    """``reproduce.py --from`` folders reach ``load_weights`` when a table times its rows' models."""
    from tasks.common.engine import load_weights

    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "checkpoint.pt", marker)
    with pytest.raises(CheckpointError):
        load_weights(torch.nn.Linear(2, 2), path)
    assert not marker.exists()


def test_evaluate_script_refuses_a_malicious_checkpoint(data_dir: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    result = subprocess.run([sys.executable, str(REPO / "scripts/evaluate.py"), f"+checkpoint={path}",
                             *smoke_overrides(data_dir), f"hydra.run.dir={tmp_path / 'eval'}"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode != 0
    assert "refusing to load" in result.stderr and "evil.pt" in result.stderr
    assert not marker.exists() and not (tmp_path / "eval" / "eval.json").exists()


def test_a_truncated_checkpoint_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"model": {"w": torch.randn(64, 64)}, "epoch": 3})
    assert load_checkpoint(path)["epoch"] == 3  # what this project writes loads with weights_only=True
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*truncated or corrupt"):
        load_checkpoint(path)


def test_stale_temporaries_of_a_killed_checkpoint_write_are_removed(data_dir: Path, tmp_path: Path) -> None:
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    unrelated = tmp_path / ".other.json.xyz.tmp"
    unrelated.write_bytes(b"")
    assert remove_stale_temporaries(tmp_path / "checkpoint.pt") == [stale]
    assert not stale.exists() and unrelated.exists()
    stale.write_bytes(b"half a checkpoint")
    assert run_experiment(compose(smoke_overrides(data_dir)), tmp_path) is not None  # the engine cleans on start
    assert not stale.exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux) to fail writes with ENOSPC")
def test_a_checkpoint_write_on_a_full_disk_says_so_and_keeps_the_old_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.common.io as io_module
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"epoch": 1})
    before = path.read_bytes()
    temporary = tmp_path / ".checkpoint.pt.full.tmp"

    def mkstemp_on_a_full_disk(**_: Any) -> tuple[int, str]:  # every write to /dev/full fails with ENOSPC
        temporary.write_bytes(b"")
        return os.open("/dev/full", os.O_WRONLY), str(temporary)

    monkeypatch.setattr(io_module.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    with pytest.raises(OSError, match=r"writing .*checkpoint\.pt failed: the disk holding .* is full") as failure:
        save_checkpoint(path, {"model": {"w": torch.randn(512, 512)}, "epoch": 2})
    assert failure.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and not temporary.exists()
    assert load_checkpoint(path)["epoch"] == 1
    # torch.save may report the full disk only as its own RuntimeError: then the free space decides.
    def save_failing_in_torch(*_: Any) -> None:
        raise RuntimeError("[enforce fail at inline_container.cc:671] . unexpected pos 7 vs 3")

    monkeypatch.undo()
    monkeypatch.setattr(io_module.torch, "save", save_failing_in_torch)
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda _: SimpleNamespace(free=1 << 20))
    with pytest.raises(OSError, match=r"is full \(1\.0 MiB free\)"):
        save_checkpoint(path, {"epoch": 3})
    monkeypatch.setattr(io_module.shutil, "disk_usage", lambda _: SimpleNamespace(free=9 << 30))
    with pytest.raises(RuntimeError, match="unexpected pos 7"):  # with room to spare it is not called a full disk
        save_checkpoint(path, {"epoch": 3})
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_atomic_writes_keep_a_new_files_usual_mode(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "table.md", "x\n")
    finally:
        os.umask(umask)
    import tasks.common.io as io_module
    assert (tmp_path / "table.md").stat().st_mode & 0o777 == 0o666 & ~io_module._UMASK


def test_a_locked_run_folder_is_refused_with_the_holders_pid(data_dir: Path, tmp_path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from tasks.common.io import run_folder_lock\n"
         f"with run_folder_lock({str(tmp_path)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderLocked, match=rf"process {holder.pid}"):
            run_experiment(compose(smoke_overrides(data_dir)), tmp_path)
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        holder.kill()
        holder.wait()
    with run_folder_lock(tmp_path):  # a killed holder leaves the folder free
        pass


def test_a_run_without_its_primary_metric_fails_and_is_not_finished(tmp_path: Path) -> None:
    """A COCO val file whose annotation list is empty: COCOeval defines no AP, so there is no bbox_AP."""
    from tasks.detection.synthetic import ensure_synthetic_coco

    root = tmp_path / "coco"
    ensure_synthetic_coco(root, seed=0, num_train=4, num_val=2, image_size=64)
    val = root / "annotations" / "instances_val2017.json"
    content = json.loads(val.read_text())
    content["annotations"] = []
    val.write_text(json.dumps(content))
    overrides = [*detection_smoke(tmp_path / "unused"), f"data.root={root}"]
    with pytest.raises(MetricError, match="bbox_AP"):
        run_experiment(compose(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_check_metrics_rejects_missing_and_non_finite_values() -> None:
    check_metrics({"top1": 50.0, "loss": 1.0}, "top1")
    with pytest.raises(MetricError, match="no 'top1'"):
        check_metrics({"images": 4.0}, "top1")
    with pytest.raises(MetricError, match="non-finite"):
        check_metrics({"top1": float("nan")}, "top1")


def test_a_coco_training_file_without_annotations_says_so(tmp_path: Path) -> None:
    from tasks.detection.data import CocoDetection
    from tasks.detection.synthetic import ensure_synthetic_coco

    root = tmp_path / "coco"
    ensure_synthetic_coco(root, seed=0, num_train=2, num_val=1, image_size=64)
    train = root / "annotations" / "instances_train2017.json"
    content = json.loads(train.read_text())
    del content["annotations"]
    train.write_text(json.dumps(content))
    with pytest.raises(ValueError, match="instances_train2017.json.*no 'annotations'"):
        CocoDetection(root, "train")


def _truncate_one_image(root: Path) -> Path:
    victim = sorted((root / "train").rglob("*.png"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 2])
    return victim


def test_a_truncated_image_is_named_and_verify_finds_it_before_training(tmp_path: Path) -> None:
    from tasks.classification.data import ensure_synthetic_imagenet

    root = ensure_synthetic_imagenet(tmp_path / "imagenet", seed=0, train_per_class=2, val_per_class=1,
                                     image_size=16)
    victim = _truncate_one_image(root)
    with pytest.raises(CorruptImageError, match=victim.name):
        read_rgb(victim)
    overrides = [*smoke_overrides(tmp_path / "unused", iters=4), f"data.root={root}", "data.verify=true"]
    with pytest.raises(CorruptImageError, match=rf"(?s)1 of \d+ images.*{victim.name}"):
        run_experiment(compose(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # found before any training


@pytest.mark.parametrize("key", ["max_iters_per_epoch", "max_eval_batches"])
def test_iteration_limits_below_one_name_the_key(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"run\.{key} must be null.*got 0"):
        validate(compose([f"run.{key}=0"]))
