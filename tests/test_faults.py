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
from tasks.common.io import CheckpointError, load_checkpoint, remove_stale_temporaries, save_checkpoint, write_text_atomic
from tasks.common.run_folder import RunFolderLocked, run_folder_lock

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
        [sys.executable, "-c", "import sys, time; from tasks.common.run_folder import run_folder_lock\n"
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


# --- files handed to the project run no code (issue 26) -----------------------------------------------------------

def _finished_run(tmp_path: Path, data_dir: Path, **slots: Any) -> Path:
    """A run folder as a finished classification run leaves it, its config's slots replaced by ``slots``."""
    from omegaconf import OmegaConf

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = compose(smoke_overrides(data_dir))
    for key, value in slots.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    save_checkpoint(run_dir / "checkpoint.pt", {"model": {}})
    return run_dir


def _world() -> Any:
    from tasks.common.distributed import World
    return World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


@pytest.mark.parametrize("slot", ["open", "torch_load"])
def test_a_finished_runs_config_cannot_call_anything_outside_the_zoo(slot: str, data_dir: Path,
                                                                      tmp_path: Path) -> None:
    from tasks.common.qualitative import load_finished_run

    marker = tmp_path / "pwned"
    evil = _malicious_checkpoint(tmp_path / "evil.pt", marker)
    node = ({"_target_": "builtins.open", "file": str(marker), "mode": "w"} if slot == "open" else
            {"_target_": "torch.load", "f": str(evil), "weights_only": False})
    run_dir = _finished_run(tmp_path, data_dir, downsampler=node)
    try:  # (UntrustedConfigError is a ValueError, so the figure scripts print it as an error)
        with pytest.raises(ValueError, match=rf"downsampler\._target_={node['_target_']} is not an operator"):
            load_finished_run(run_dir, "classification", _world())
    finally:
        assert not marker.exists(), "the config's callable ran"


def test_operator_configs_take_only_plain_arguments_and_no_hydra_keys(data_dir: Path, tmp_path: Path) -> None:
    from tasks.common.factories import UntrustedConfigError, build_operator

    carafe_node = {"_target_": "carafe.modules.CARAFEDownPack", "_partial_": True, "compressed_channels": 8}
    module = build_operator(carafe_node, "downsampler")(channels=16, scale_factor=2)
    assert type(module).__name__ == "CARAFEDownPack" and module.scale_factor == 2
    nested = {**carafe_node, "compressed_channels": {"_target_": "os.getcwd"}}
    with pytest.raises(UntrustedConfigError, match=r"downsampler\.compressed_channels is a mapping"):
        build_operator(nested, "downsampler")
    with pytest.raises(UntrustedConfigError, match=r"downsampler holds _args_"):
        build_operator({**carafe_node, "_args_": ["x"]}, "downsampler")
    with pytest.raises(UntrustedConfigError, match=r"downsampler\._partial_ must be true"):
        build_operator({**carafe_node, "_partial_": False}, "downsampler")
    # Training refuses the same configs before any work, as a ConfigError naming the key.
    with pytest.raises(ConfigError, match=r"downsampler\._target_=shutil\.rmtree is not an operator"):
        validate(compose([*smoke_overrides(data_dir), "+downsampler._target_=shutil.rmtree",
                          f"+downsampler.path={tmp_path}"]))
    assert tmp_path.exists()


def test_a_task_target_outside_the_projects_tasks_is_not_even_imported(data_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks.common.qualitative import load_finished_run

    marker = tmp_path / "imported"
    (tmp_path / "sideeffect_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Task: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run_dir = _finished_run(tmp_path, data_dir, **{"task._target_": "sideeffect_module.Task"})
    with pytest.raises(ValueError, match=r"task\._target_=sideeffect_module\.Task cannot be imported"):
        load_finished_run(run_dir, "classification", _world())
    assert not marker.exists()


def test_a_tables_run_folders_must_lie_under_the_runs_folder(tmp_path: Path) -> None:
    """A table names a run only by its config hash; the folder is looked up under the runs root, so no value in a
    table JSON (an absolute path, '..', a path where a hash belongs) reaches a folder elsewhere."""
    from tasks.common.qualitative import FigureError, runs_of_table

    runs_root = tmp_path / "runs"
    outside = tmp_path / "elsewhere" / "inpainting" / "0123456789ab"
    outside.mkdir(parents=True)
    (outside / "checkpoint.pt").write_bytes(b"")
    cases = {"/etc": "has no seed 0", "../../etc": "has no seed 0", "../elsewhere": "has no seed 0",
             "0123456789ab": "no run folder of 'A' seed 0"}
    for config_hash, problem in cases.items():
        rows = [{"label": "A", "seeds": [{"seed": 0, "config_hash": config_hash, "run_dir": str(outside)}]}]
        (tmp_path / "table-7.json").write_text(json.dumps({"rows": rows}))
        with pytest.raises(FigureError, match=problem):
            runs_of_table("7", ["A"], 0, tmp_path, runs_root=runs_root)
    (runs_root / "inpainting").mkdir(parents=True)
    (runs_root / "inpainting" / "0123456789ab").symlink_to(outside, target_is_directory=True)
    # a link the user made inside their own runs folder is theirs to follow
    assert runs_of_table("7", ["A"], 0, tmp_path, runs_root=runs_root) == [runs_root / "inpainting" / "0123456789ab"]


# --- checkpoints verified (issue 26) ------------------------------------------------------------------------------

def test_flipped_bits_inside_tensor_data_are_found_on_load(tmp_path: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    weights = torch.randn(64, 64)
    save_checkpoint(path, {"model": {"w": weights}, "epoch": 1})
    data = bytearray(path.read_bytes())
    start = bytes(data).find(weights.numpy().tobytes()[:256])  # torch stores tensor bytes verbatim
    assert start > 0
    for i in range(start + 512, start + 512 + 4096):  # 4 KB inside the tensor's data, the zip entry intact
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*does not match the digest"):
        load_checkpoint(path)


def test_an_empty_checkpoint_is_named(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt.*empty \(0 bytes\)"):
        load_checkpoint(tmp_path / "checkpoint.pt")


@pytest.fixture(scope="module")
def finished_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A finished one-epoch smoke run: (its folder, its metrics.json record)."""
    run_dir = tmp_path_factory.mktemp("finished")
    record = run_experiment(compose(smoke_overrides(data_dir)), run_dir)
    assert record is not None and record["status"] == "finished"
    return run_dir, record


def _forged_resume(finished_run: tuple[Path, dict[str, Any]], tmp_path: Path, change) -> Path:  # noqa: ANN001
    """A copy of the finished run with its checkpoint's state passed through ``change`` and no metrics.json."""
    source, _ = finished_run
    state = load_checkpoint(source / "checkpoint.pt")
    change(state)
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    save_checkpoint(run_dir / "checkpoint.pt", state)
    return run_dir


@pytest.mark.parametrize("forgery", ["no evaluation", "NaN metric"])
def test_a_complete_schedule_without_its_evaluation_evaluates_again(forgery: str, data_dir: Path,
                                                                    finished_run: tuple[Path, dict[str, Any]],
                                                                    tmp_path: Path) -> None:
    def change(state: dict) -> None:
        if forgery == "no evaluation":
            del state["history"][-1]["val"]
        else:
            state["history"][-1]["val"] = {"top1": float("nan"), "top5": float("nan"), "loss": float("nan")}

    run_dir = _forged_resume(finished_run, tmp_path, change)
    record = run_experiment(compose(smoke_overrides(data_dir)), run_dir)
    # The oracle: the run that wrote these weights evaluated them once already; evaluating again gives the same.
    assert record["metrics"] == finished_run[1]["metrics"]
    assert record["history"][-1]["val"] == finished_run[1]["metrics"]


def test_a_resume_checkpoint_without_its_epoch_is_named(data_dir: Path, finished_run: tuple[Path, dict[str, Any]],
                                                        tmp_path: Path) -> None:
    run_dir = _forged_resume(finished_run, tmp_path, lambda state: state.pop("epoch"))
    with pytest.raises(CheckpointError, match=r"checkpoint\.pt is not a resume checkpoint .*lacks the key\(s\) "
                                              r"'epoch'"):
        run_experiment(compose(smoke_overrides(data_dir)), run_dir)
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("forgery,message", [
    ({"history": []}, r"saved after epoch 1 but its history records epochs \[\], not 1\.\.1"),
    ({"epoch": 5}, r"saved after epoch 5, but this run's schedule has 1 epochs"),
    ({"epoch": "1"}, r"'epoch' is a str"),
    ({"model": None}, r"'model' is a NoneType")])
def test_a_resume_checkpoint_with_a_forged_epoch_or_history_is_named(forgery: dict, message: str) -> None:
    from tasks.common.engine import check_resume_state

    state = {"model": {}, "optimizer": {}, "scheduler": {}, "epoch": 1, "train_seconds": 1.0,
             "history": [{"epoch": 1, "train": {"loss": 1.0}}]}
    check_resume_state(state, Path("checkpoint.pt"), 1, ("optimizer", "scheduler"))
    with pytest.raises(CheckpointError, match=rf"checkpoint\.pt.*{message}"):
        check_resume_state({**state, **forgery}, Path("checkpoint.pt"), 1, ("optimizer", "scheduler"))


# --- data identity (issue 26) -------------------------------------------------------------------------------------

def test_an_embedded_dataset_missing_a_file_is_not_reused(tmp_path: Path) -> None:
    from tasks.classification.data import ensure_synthetic_imagenet
    from tasks.common.io import FolderConflictError, generated_folder_digest

    root = tmp_path / "imagenet"
    settings = {"seed": 0, "train_per_class": 2, "val_per_class": 1, "image_size": 16}
    ensure_synthetic_imagenet(root, **settings)
    digest = generated_folder_digest(root)
    assert digest is not None and len(digest) == 64
    assert ensure_synthetic_imagenet(root, **settings) == root  # unchanged: reused
    victim = sorted((root / "train").rglob("*.png"))[3]
    victim.unlink()  # what "delete the corrupt image" leaves
    with pytest.raises(FolderConflictError, match=r"no longer holds the files its generator wrote: it has (\d+) "
                                                  r"files .*the generator wrote \d+"):
        ensure_synthetic_imagenet(root, **settings)


def test_the_recorded_dataset_names_the_embedded_contents_digest(finished_run: tuple[Path, dict[str, Any]],
                                                                 data_dir: Path) -> None:
    from tasks.common.io import generated_folder_digest

    digest = generated_folder_digest(data_dir)
    assert digest and finished_run[1]["dataset"].endswith(f", content sha256 {digest[:16]}")


def test_verify_decodes_segmentation_labels_before_training(tmp_path: Path) -> None:
    from experiment_helpers import segmentation_smoke
    from tasks.segmentation.synthetic import ensure_synthetic_ade

    root = ensure_synthetic_ade(tmp_path / "ade", seed=0, num_train=2, num_val=1, image_size=64)
    victim = sorted(root.rglob("annotations/training/*.png"))[1]
    victim.write_bytes(victim.read_bytes()[:40])
    overrides = [*segmentation_smoke(tmp_path / "unused"), f"data.root={root}", "data.verify=true"]
    with pytest.raises(CorruptImageError, match=rf"(?s)1 of 2 label files of the train split.*{victim.name}"):
        run_experiment(compose(overrides), tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # found before any training


def test_a_truncated_coco_annotation_file_is_named(tmp_path: Path) -> None:
    from tasks.detection.data import CocoDetection
    from tasks.detection.synthetic import ensure_synthetic_coco

    root = tmp_path / "coco"
    ensure_synthetic_coco(root, seed=0, num_train=2, num_val=1, image_size=64)
    train = root / "annotations" / "instances_train2017.json"
    train.write_bytes(train.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"instances_train2017\.json.*is not valid JSON"):
        CocoDetection(root, "train")


# --- a locked run folder is left untouched (issue 26) -------------------------------------------------------------

def test_a_second_train_py_in_a_locked_folder_writes_nothing_there(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text("the running run's config\n")
    with run_folder_lock(run_dir):  # this process is the running run
        before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
        result = subprocess.run([sys.executable, str(REPO / "scripts/train.py"), *smoke_overrides(data_dir),
                                 f"hydra.run.dir={run_dir}"], capture_output=True, text=True, cwd=tmp_path,
                                timeout=300)
        assert result.returncode != 0 and f"in use by another run (process {os.getpid()})" in result.stderr
        after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before  # no .hydra/*.yaml rewritten, no train.log, no checkpoint
