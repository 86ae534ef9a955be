"""The shared engine on the classification task: one step of every experiment, resume, DDP with gloo, the
sampler, the LR schedule and atomic writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiment_helpers import smoke_overrides
from tasks.common.data import ShardedSampler
from tasks.common.distributed import World
from tasks.common.experiment import compose, config_hash, run_experiment
from tasks.common.io import load_checkpoint, write_json_atomic
from tasks.common.schedule import build_optimizer, lr_factor, weight_decay_groups
from tasks.common.train_job import check_shared_run_dir

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(str(p.relative_to(REPO / "conf/experiment").with_suffix(""))
                     for p in (REPO / "conf/experiment/classification").rglob("*.yaml"))  # detection: its own tests


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "imagenet-tiny"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_one_training_step_of_every_experiment(experiment: str, data_dir: Path, tmp_path: Path) -> None:
    cfg = compose([f"experiment={experiment}", *smoke_overrides(data_dir)])
    record = run_experiment(cfg, tmp_path)
    assert record is not None and record["status"] == "finished"
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["config_hash"] == config_hash(cfg)
    assert set(saved["metrics"]) >= {"top1", "top5", "loss"} and 0 <= saved["metrics"]["top1"] <= 100
    assert (tmp_path / "config.yaml").is_file() and any((tmp_path / "tensorboard").iterdir())
    assert load_checkpoint(tmp_path / "checkpoint.pt")["epoch"] == 1


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "checkpoint.pt")["model"]


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(data_dir: Path, tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    overrides = ["downsampler=carafe", "run.deterministic=true", *smoke_overrides(data_dir, epochs=2, iters=2)]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_experiment(compose(overrides), straight) is not None

    assert run_experiment(compose([*overrides, "run.stop_after_epochs=1"]), interrupted) is None
    after_one = _weights(interrupted)
    assert not (interrupted / "metrics.json").exists()
    caplog.clear()
    with caplog.at_level("INFO"):
        assert run_experiment(compose(overrides), interrupted) is not None
    assert "resuming" in caplog.text

    final, reference = _weights(interrupted), _weights(straight)
    assert any(not torch.equal(after_one[k], final[k]) for k in final)  # the second epoch did train
    for name in reference:
        assert torch.equal(reference[name], final[name]), name
    a = json.loads((straight / "metrics.json").read_text())["metrics"]
    resumed = json.loads((interrupted / "metrics.json").read_text())
    assert a == resumed["metrics"]
    # the record counts both processes: one segment each, times summed over them, not only the last one's
    segments = resumed["segments"]
    assert len(segments) == 2 and all(s["wall_seconds"] > 0 and s["train_seconds"] > 0 for s in segments)
    assert resumed["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in segments), abs=0.15)
    assert resumed["train_seconds"] == pytest.approx(sum(s["train_seconds"] for s in segments), abs=0.15)
    assert len(json.loads((straight / "metrics.json").read_text())["segments"]) == 1


def test_checkpoint_of_another_config_is_not_resumed(data_dir: Path, tmp_path: Path) -> None:
    run_experiment(compose(smoke_overrides(data_dir)), tmp_path)
    (tmp_path / "metrics.json").unlink()
    with pytest.raises(RuntimeError, match="another config"):
        run_experiment(compose(["downsampler=avg_pool", *smoke_overrides(data_dir)]), tmp_path)


def test_two_process_ddp_with_gloo(data_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ddp"
    overrides = ["downsampler=carafe", "run.device=cpu", *smoke_overrides(data_dir, iters=2)]
    overrides = [o for o in overrides if not o.startswith("run.max_eval_batches")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "scripts/train.py", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2
    # The record says which backend ran the CARAFE++ downsampler: the compiled CPU kernels, built at install time.
    assert record["carafe_backends"]["used"] == ["cpu"], record["carafe_backends"]
    assert record["carafe_backends"]["cpu_library"].startswith(("prebuilt", "cached")), record["carafe_backends"]
    assert record["metrics"]["images"] == 16 * 2  # the sharded evaluation saw every validation image once
    assert record["config_hash"] == config_hash(compose(overrides))
    assert any(k.endswith("running_mean") for k in _weights(run_dir))
    log = (run_dir / "train.log").read_text()  # Hydra's log file holds the run's log, not only the terminal
    assert f"run {record['config_hash']}" in log and "epoch 1/1" in log and "finished" in log


def test_two_part_ddp_by_hand_trains_what_one_process_trains_on_the_whole_batch(tmp_path: Path) -> None:
    # A task with two optimizers is not wrapped in DistributedDataParallel (its parts are called directly); the
    # engine synchronises it by hand. Each rank starts from its own random weights and sees half of every batch.
    import ddp_parts_worker as worker

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(REPO / "tests/ddp_parts_worker.py"), str(tmp_path)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for suffix in ("", "-bn"):  # parameters and BatchNorm statistics identical on both ranks
        ranks = [torch.load(tmp_path / f"rank{r}{suffix}.pt") for r in range(2)]
        assert any(name.endswith("running_mean") for name in ranks[0]) == (suffix == "-bn")
        for name, value in ranks[0].items():
            assert torch.equal(value, ranks[1][name]), (suffix, name)
    # Without BatchNorm (whose batch statistics differ between half a batch and all of it), the same as one process
    single = worker.train(World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), with_bn=False)
    start, ranks = worker.build_model(False, seed=0).state_dict(), torch.load(tmp_path / "rank0.pt")
    for name, value in single.state_dict().items():
        assert not torch.equal(value, start[name]), name  # it trained
        torch.testing.assert_close(ranks[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_torchrun_without_a_shared_run_dir_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match="hydra.run.dir"):
        check_shared_run_dir(["downsampler=carafe"])
    check_shared_run_dir(["hydra.run.dir=runs/x"])  # every rank names the same folder: accepted
    monkeypatch.setenv("WORLD_SIZE", "1")
    check_shared_run_dir(["downsampler=carafe"])  # one process: its folder is its own


@pytest.mark.parametrize("length, world_size", [(10, 1), (10, 3), (7, 2), (2, 4)])
def test_sharded_sampler_covers_the_data(length: int, world_size: int) -> None:
    worlds = [World(r, world_size, r, torch.device("cpu")) for r in range(world_size)]
    shards = [list(ShardedSampler(length, w, shuffle=False)) for w in worlds]
    assert sorted(i for s in shards for i in s) == list(range(length))
    train = [ShardedSampler(length, w, shuffle=True, seed=3) for w in worlds]
    for s in train:
        s.set_epoch(5)
    drawn = [list(s) for s in train]
    assert len({len(d) for d in drawn}) == 1 and len(drawn[0]) == length // world_size
    flat = [i for d in drawn for i in d]
    assert len(set(flat)) == len(flat)
    again = ShardedSampler(length, worlds[0], shuffle=True, seed=3)
    again.set_epoch(5)
    assert list(again) == drawn[0]
    again.set_epoch(6)
    assert length < 5 or list(again) != drawn[0]


def test_lr_schedule_matches_hand_computed_values() -> None:
    # Goyal et al.: warm-up from 0.1 x over 5 epochs, then x0.1 at 30, 60, 80
    kw = dict(epochs=90, policy="step", milestones=(30, 60, 80), gamma=0.1, warmup_epochs=5, warmup_factor=0.1)
    assert lr_factor(0, **kw) == pytest.approx(0.1)
    assert lr_factor(2.5, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_factor(5, **kw) == pytest.approx(1.0)
    assert lr_factor(29.99, **kw) == pytest.approx(1.0)
    assert lr_factor(30, **kw) == pytest.approx(0.1)
    assert lr_factor(85, **kw) == pytest.approx(0.001)
    assert lr_factor(45, 90, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 20, "poly", power=0.9) == pytest.approx(0.5 ** 0.9)


@pytest.mark.parametrize("scope", ["all", "conv_linear_weights"])
def test_weight_decay_reaches_the_parameters_its_scope_names(scope: str) -> None:
    # With zero gradients, one SGD step (no momentum) changes a parameter only through its decay: p - lr wd p.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.Flatten(),
                                torch.nn.Linear(3, 4))
    model.register_parameter("scale", torch.nn.Parameter(torch.ones(4)))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(weight_decay_groups(model, model.parameters(), scope), "sgd", lr=0.5, momentum=0.0,
                                weight_decay=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    decayed = set(before) if scope == "all" else {"0.weight", "3.weight"}
    for name, p in model.named_parameters():
        expected = before[name] * (1 - 0.5 * 0.1) if name in decayed else before[name]
        torch.testing.assert_close(p.detach(), expected, msg=name)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
