"""The inpainting task: GAN steps through the engine and their exact resume, the partial conv and CARAFE mask rules
against brute-force definitions, the metrics against scikit-image, the masks and the embedded data."""

from __future__ import annotations

import filecmp
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from carafe.modules import CARAFEPack
from experiment_helpers import inpainting_smoke
import reproduction.figure_inpainting
from tasks.common.distributed import World
from tasks.common.engine import Schedule, build_optimizers
from tasks.common.experiment import ConfigError, compose, run_experiment
from tasks.common.io import load_checkpoint
from tasks.common.qualitative import FigureError, runs_of_table
from tasks.inpainting.data import PlacesInpainting, ensure_embedded_places
from tasks.inpainting.masks import box_mask, draw_mask, free_form_mask, validation_mask
from tasks.inpainting.metrics import inpainting_scores
from tasks.inpainting.model import PartialConv2d, build_inpainting_model, carafe_with_mask
from tasks.inpainting.task import InpaintingTask


REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "places-tiny"


@pytest.mark.parametrize("experiment", ["inpainting/global_local", "inpainting/partial_conv_carafe",
                                        "inpainting/global_local_carafe_pp"])
def test_one_gan_step_and_evaluation(experiment: str, data_dir: Path, tmp_path: Path) -> None:
    record = run_experiment(compose([f"experiment={experiment}", *inpainting_smoke(data_dir)]), tmp_path)
    assert record is not None and record["primary_metric"] == "l1"
    metrics = record["metrics"]
    assert 0 < metrics["l1"] < metrics["l1_hole"] <= 100 and 0 < metrics["psnr"] < 100 and -1 <= metrics["ssim"] <= 1
    losses = record["history"][0]["train"]
    assert {"discriminator/loss", "generator/loss", "generator/adversarial"} <= set(losses)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert set(state["optimizers"]) == set(state["schedulers"]) == {"discriminator", "generator"}
    assert "optimizer" not in state


@pytest.mark.parametrize("generator", ["global_local", "partial_conv"])
@pytest.mark.parametrize("upsampler", [None, "nearest", "bilinear", "pixel_shuffle", "dysample", "carafe"])
def test_one_discriminator_and_one_generator_step_on_64_px_images(generator: str, upsampler: str | None) -> None:
    cfg = compose(["task=inpainting", f"model={generator}", "data.image_size=64", "model.base_channels=8",
                   "model.discriminator_channels=[8,16,16]", *([f"upsampler={upsampler}"] if upsampler else [])])
    assert (cfg.get("upsampler") is None) == (upsampler is None)
    task = InpaintingTask(cfg, World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    torch.manual_seed(0)
    model = task.build_model()
    optimizers = {part: torch.optim.Adam(task.part_parameters(model, part), lr=1e-3) for part in task.optimizer_parts}
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    masks = torch.zeros(2, 1, 64, 64)
    masks[:, :, 16:40, 20:52] = 1
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    carry: dict = {}
    for part in task.optimizer_parts:  # the engine's order: discriminator, then generator
        losses = task.train_part(model, (images, masks), part, carry)
        assert torch.isfinite(losses["loss"]), part
        optimizers[part].zero_grad()
        losses["loss"].backward()
        for name, p in getattr(model, part).named_parameters():  # the loss reaches every parameter of the part
            assert p.grad is not None and torch.isfinite(p.grad).all(), f"{part}.{name}"
        optimizers[part].step()
        weights = [(name, p) for name, p in getattr(model, part).named_parameters() if name.endswith("weight")]
        assert all(not torch.equal(p.detach(), before[f"{part}.{name}"]) for name, p in weights), part
    composite = carry["composite"].detach()
    assert composite.shape == images.shape and torch.equal(composite * (1 - masks), images * (1 - masks))


def test_resume_of_a_gan_run_gives_the_uninterrupted_weights(data_dir: Path, tmp_path: Path) -> None:
    overrides = ["experiment=inpainting/partial_conv_carafe", "run.deterministic=true",
                 *inpainting_smoke(data_dir, epochs=2, iters=2)]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert run_experiment(compose(overrides), straight) is not None
    assert run_experiment(compose([*overrides, "run.stop_after_epochs=1"]), interrupted) is None
    after_one = load_checkpoint(interrupted / "checkpoint.pt")["model"]
    assert run_experiment(compose(overrides), interrupted) is not None

    reference, resumed = load_checkpoint(straight / "checkpoint.pt"), load_checkpoint(interrupted / "checkpoint.pt")
    assert any(not torch.equal(after_one[k], resumed["model"][k]) for k in after_one)
    for name, value in reference["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    for part in ("discriminator", "generator"):  # both Adam states (moments, step counts) carried over exactly
        for index, moments in reference["optimizers"][part]["state"].items():
            for key, value in moments.items():
                assert torch.equal(value, resumed["optimizers"][part]["state"][index][key]), (part, index, key)
    a = json.loads((straight / "metrics.json").read_text())["metrics"]
    b = json.loads((interrupted / "metrics.json").read_text())["metrics"]
    assert a == b


def test_two_process_gan_run_under_torchrun(data_dir: Path, tmp_path: Path) -> None:
    # The engine's by-hand synchronisation (tests/test_engine.py checks it exactly) on the real task: both parts
    # train, the sharded evaluation sees every validation image, one checkpoint is written.
    run_dir = tmp_path / "ddp"
    overrides = ["experiment=inpainting/partial_conv_carafe", "run.device=cpu",
                 *inpainting_smoke(data_dir, epochs=1, iters=2)]
    overrides = [o.replace("schedule.batch_size=2", "schedule.batch_size=4") for o in overrides
                 if not o.startswith("run.max_eval_batches")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             "scripts/train.py", *overrides, f"hydra.run.dir={run_dir}"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["world_size"] == 2 and 0 < record["metrics"]["l1"] < 100
    losses = record["history"][0]["train"]
    assert {"discriminator/loss", "generator/loss"} <= set(losses)


def test_figure_runs_come_from_the_rendered_table(tmp_path: Path) -> None:
    """A table names runs by config hash; the figure finds each in the runs store, and nothing a table JSON says can
    point it at another folder (a path, '..', an absolute one)."""
    rows = [{"label": "A", "seeds": [{"seed": 0, "config_hash": "aaaaaaaaaaaa"},
                                     {"seed": 1, "config_hash": "bbbbbbbbbbbb"},
                                     {"seed": 2, "config_hash": "../../../etc", "run_dir": "/etc"}]}]
    (tmp_path / "table-7.json").write_text(json.dumps({"rows": rows}))
    runs_root = tmp_path / "runs"
    (runs_root / "inpainting" / "aaaaaaaaaaaa").mkdir(parents=True)
    (runs_root / "inpainting" / "aaaaaaaaaaaa" / "checkpoint.pt").write_bytes(b"")
    (runs_root / "inpainting" / "bbbbbbbbbbbb").mkdir(parents=True)  # no checkpoint: not a trained model
    assert runs_of_table("7", ["A"], 0, tmp_path, runs_root) == [runs_root / "inpainting" / "aaaaaaaaaaaa"]
    with pytest.raises(FigureError, match="no run folder of 'A' seed 1 .run bbbbbbbbbbbb. with its checkpoint"):
        runs_of_table("7", ["A"], 1, tmp_path, runs_root)
    with pytest.raises(FigureError, match="row 'A' has no seed 2"):
        runs_of_table("7", ["A"], 2, tmp_path, runs_root)
    with pytest.raises(FigureError, match="no row 'B'; its rows: A"):
        runs_of_table("7", ["B"], 0, tmp_path, runs_root)
    with pytest.raises(FigureError, match="make reproduce-table-pp-10"):
        runs_of_table("pp-10", ["A"], 0, tmp_path, runs_root)


def partial_conv_by_definition(conv: PartialConv2d, x: torch.Tensor, mask: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """NVIDIA's rule with loops over output pixels and taps, float64, stride 1 and zero padding."""
    weight, bias = conv.weight.double(), conv.bias.double()
    (kh, kw), (ph, pw), (dh, dw) = conv.kernel_size, conv.padding, conv.dilation
    n, _, h, w = x.shape
    out = torch.zeros(n, weight.shape[0], h, w, dtype=torch.float64)
    new_mask = torch.zeros(n, 1, h, w, dtype=torch.float64)
    for b in range(n):
        for i in range(h):
            for j in range(w):
                total, valid = torch.zeros(weight.shape[0], dtype=torch.float64), 0.0
                for u in range(kh):
                    for v in range(kw):
                        y, z = i - ph + u * dh, j - pw + v * dw
                        if 0 <= y < h and 0 <= z < w and mask[b, 0, y, z] > 0:
                            total += weight[:, :, u, v] @ x[b, :, y, z].double()
                            valid += 1
                if valid:  # renormalised by window size / valid taps; a window without valid input gives 0
                    out[b, :, i, j] = total * (kh * kw / valid) + bias
                    new_mask[b, 0, i, j] = 1
    return out, new_mask


@pytest.mark.parametrize("dilation", [1, 2])
def test_partial_conv_renormalises_and_updates_the_mask_as_defined(dilation: int) -> None:
    torch.manual_seed(0)
    conv = PartialConv2d(3, 4, 3, padding=dilation, dilation=dilation)
    x = torch.randn(1, 3, 9, 9)
    mask = torch.ones(1, 1, 9, 9)
    mask[..., 2:7, 3:8] = 0  # a 5 x 5 hole: its centre pixels see no valid input
    out, new_mask = conv(x, mask)
    expected, expected_mask = partial_conv_by_definition(conv, x, mask)
    assert torch.equal(new_mask.double(), expected_mask)
    assert expected_mask[0, 0, 4, 5] == 0 and expected_mask[0, 0, 2, 3] == 1
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


def test_carafe_reassembles_the_mask_with_the_feature_kernels() -> None:
    torch.manual_seed(0)
    operator = CARAFEPack(8, 2, up_kernel=3, compressed_channels=4)
    torch.nn.init.normal_(operator.content_encoder.weight, std=0.3)  # kernels far from uniform
    x, mask = torch.randn(1, 8, 5, 6), (torch.rand(1, 1, 5, 6) > 0.4).float()
    features, new_mask = carafe_with_mask(operator, x, mask)
    torch.testing.assert_close(features, operator(x))  # the module's own output: the same kernels
    kernels = operator.predict_kernels(x).double()
    expected = torch.zeros(1, 1, 10, 12, dtype=torch.float64)
    for p in range(10):
        for q in range(12):
            for u in range(3):
                for v in range(3):
                    y, z = p // 2 + u - 1, q // 2 + v - 1
                    if 0 <= y < 5 and 0 <= z < 6:
                        expected[0, 0, p, q] += kernels[0, u * 3 + v, p, q] * mask[0, 0, y, z]
    torch.testing.assert_close(new_mask.double(), expected, rtol=1e-5, atol=1e-6)
    _, full = carafe_with_mask(operator, x, torch.ones(1, 1, 5, 6))
    torch.testing.assert_close(full[..., 2:-2, 2:-2], torch.ones_like(full[..., 2:-2, 2:-2]))  # softmax sums to 1
    with pytest.raises(ValueError, match="up_group=1"):
        carafe_with_mask(CARAFEPack(8, 2, up_group=2), x, mask)


def test_metrics_match_scikit_image_and_a_hand_computation() -> None:
    rng = np.random.default_rng(0)
    target = rng.integers(0, 256, size=(2, 16, 20, 3)).astype(np.uint8)
    output = target.copy()
    mask = np.zeros((2, 16, 20), np.float32)
    mask[:, 4:10, 5:15] = 1
    output[mask > 0] = rng.integers(0, 256, size=(int(mask.sum()), 3))
    as_tensor = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).double() / 127.5 - 1  # noqa: E731
    scores = inpainting_scores(as_tensor(output), as_tensor(target), torch.from_numpy(mask)[:, None])
    for i in range(2):
        assert scores["psnr"][i].item() == pytest.approx(peak_signal_noise_ratio(target[i], output[i]), abs=1e-9)
        assert scores["ssim"][i].item() == pytest.approx(
            structural_similarity(target[i] / 255.0, output[i] / 255.0, channel_axis=2, data_range=1.0), abs=1e-9)
        error = np.abs(output[i].astype(np.float64) - target[i]) / 255.0
        assert scores["l1"][i].item() == pytest.approx(100 * error.mean(), abs=1e-9)
        assert scores["l1_hole"][i].item() == pytest.approx(100 * error[mask[i] > 0].mean(), abs=1e-9)


def test_masks_are_a_function_of_the_seed() -> None:
    first = validation_mask("free_form", 64, seed=3, index=5)
    assert np.array_equal(first, validation_mask("free_form", 64, seed=3, index=5))
    assert not np.array_equal(first, validation_mask("free_form", 64, seed=3, index=6))
    assert not np.array_equal(first, validation_mask("free_form", 64, seed=4, index=5))
    assert set(np.unique(first)) <= {0.0, 1.0} and 0 < first.mean() < 1
    for index in range(20):  # boxes: sides within [H / 8, H / 2], one solid rectangle
        box = box_mask(64, 48, np.random.default_rng(index))
        rows, cols = np.nonzero(box.any(1))[0], np.nonzero(box.any(0))[0]
        assert 8 <= len(rows) <= 32 and 6 <= len(cols) <= 24 and box.sum() == len(rows) * len(cols)
    union = draw_mask("free_form_and_box", 64, 64, np.random.default_rng(1))
    assert np.array_equal(union, np.maximum(free_form_mask(64, 64, np.random.default_rng(1)),
                                            box_mask(64, 64, _after_free_form(1))))
    with pytest.raises(ValueError, match="blob"):
        draw_mask("blob", 8, 8, np.random.default_rng(0))


def _after_free_form(seed: int) -> np.random.Generator:
    """The generator state ``draw_mask('free_form_and_box')`` draws its box from: after one free-form mask."""
    rng = np.random.default_rng(seed)
    free_form_mask(64, 64, rng)
    return rng


def test_embedded_dataset_is_deterministic_and_in_the_places_layout(tmp_path: Path) -> None:
    a = ensure_embedded_places(tmp_path / "a", seed=1, num_train=3, num_val=2, image_size=16)
    b = ensure_embedded_places(tmp_path / "b", seed=1, num_train=3, num_val=2, image_size=16)
    for name in ("categories_places365.txt", "places365_train_standard.txt", "places365_val.txt"):
        assert (a / name).read_text() == (b / name).read_text()
    train = [line.split()[0] for line in (a / "places365_train_standard.txt").read_text().splitlines()]
    val = [line.split()[0] for line in (a / "places365_val.txt").read_text().splitlines()]
    assert all(p.startswith("/") and (a / "data_256" / p.lstrip("/")).is_file() for p in train)
    assert val == ["Places365_val_00000001.jpg", "Places365_val_00000002.jpg"]
    files = [Path("data_256") / p.lstrip("/") for p in train] + [Path("val_256") / p for p in val]
    assert all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


@pytest.mark.parametrize("override, message", [
    ("data.mask_kind=blob", "data.mask_kind"),
    ("task.discriminator_region=crop", "task.discriminator_region"),
    ("model.generator=unet", "model.generator"),
    ("data.image_size=30", "data.image_size"),
    ("model.discriminator_channels=[8,16,32,64,128,256]", "data.image_size"),
    ("task.adversarial_weight=-1", "task.adversarial_weight"),
    ("model.base_channels=7", "model.base_channels"),
])
def test_bad_config_values_fail_before_any_work(override: str, message: str, data_dir: Path, tmp_path: Path) -> None:
    cfg = compose([*inpainting_smoke(data_dir), override])
    with pytest.raises(ConfigError, match=message):
        run_experiment(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_optimizer_parts_must_not_share_parameters() -> None:
    class Overlapping(InpaintingTask):
        def part_parameters(self, model: torch.nn.Module, part: str) -> list[torch.nn.Parameter]:
            return list(model.parameters())  # both parts claim everything

    model = build_inpainting_model(base_channels=4, discriminator_channels=(4,))
    schedule = Schedule(epochs=1, batch_size=2, lr=1e-4, optimizer="adam")
    with pytest.raises(ValueError, match="belongs to both parts"):
        build_optimizers(Overlapping(None, None), model, schedule, iters_per_epoch=1)
    optimizers, _ = build_optimizers(InpaintingTask(None, None), model, schedule, iters_per_epoch=1)
    assert sum(len(g["params"]) for o in optimizers.values() for g in o.param_groups) == len(list(model.parameters()))


def test_figure_grid_of_two_runs_and_the_tensorboard_image(data_dir: Path, tmp_path: Path) -> None:
    runs = [tmp_path / "baseline", tmp_path / "carafe"]
    for experiment, run_dir in zip(["inpainting/global_local", "inpainting/global_local_carafe"], runs):
        assert run_experiment(compose([f"experiment={experiment}", *inpainting_smoke(data_dir)]), run_dir)
    events = b"".join(p.read_bytes() for p in (runs[0] / "tensorboard").iterdir())
    assert b"val/inpainting" in events

    out = reproduction.figure_inpainting.figure(runs, count=2, out=tmp_path / "figure.png", labels=["G&L", "w/ C"])
    caption = out.with_suffix(".md").read_text()
    for run_dir in runs:
        assert json.loads((run_dir / "metrics.json").read_text())["config_hash"] in caption
    assert "G&L" in caption and "free_form masks, seed 0" in caption
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 - 2, 4 * 34 - 2, 3)  # 2 rows; masked input, two runs, original; 2 px gaps
    val_set = PlacesInpainting(ensure_embedded_places(data_dir, 0, 4, 2, 32), "val", image_size=32,
                               val_mask_kind="free_form")
    for row in range(2):
        image, mask = val_set[row]
        original = ((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        top = row * 34
        assert np.array_equal(grid[top:top + 32, 3 * 34:], original)
        hole = mask[0].numpy() > 0
        assert (grid[top:top + 32, :32][hole] == 255).all()
        for column in (1, 2):  # each run's composite keeps the original outside the hole
            cell = grid[top:top + 32, column * 34:column * 34 + 32]
            assert np.array_equal(cell[~hole], original[~hole])
