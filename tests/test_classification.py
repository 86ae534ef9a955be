"""The classification task's pieces: the seven downsampler places, the embedded dataset, the top-k oracle."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from carafe import CARAFEDownPack
from carafe.downsamplers import AvgPoolDown
from tasks.classification.data import CLASS_NAMES, build_imagenet, ensure_synthetic_imagenet, topk_correct
from tasks.common.resnet import build_resnet, count_downsamplers


def test_baseline_is_torchvisions_resnet() -> None:
    for depth, reference in ((50, torchvision.models.resnet50), (101, torchvision.models.resnet101)):
        ours, theirs = build_resnet(depth, 10), reference(num_classes=10)
        assert {k: v.shape for k, v in ours.state_dict().items()} == \
               {k: v.shape for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(ours.state_dict())
        ours.eval(), theirs.eval()
        x = torch.randn(2, 3, 45, 51)
        torch.testing.assert_close(ours(x), theirs(x))


def _input_sizes_of(model: nn.Module, kind: type[nn.Module], x: torch.Tensor) -> list[tuple[int, ...]]:
    sizes = []
    hooks = [m.register_forward_hook(lambda m, i, o: sizes.append((tuple(i[0].shape[1:]), tuple(o.shape[1:]))))
             for m in model.modules() if isinstance(m, kind)]
    model(x)
    for hook in hooks:
        hook.remove()
    return sizes


def test_downsamplers_sit_at_the_seven_places_with_the_right_channels() -> None:
    model = build_resnet(50, 10, "carafe").eval()
    assert count_downsamplers(model, CARAFEDownPack) == 7
    assert model.maxpool.__class__ is CARAFEDownPack
    sizes = _input_sizes_of(model, CARAFEDownPack, torch.randn(1, 3, 64, 64))
    # stem on 64 channels; then per stage: the bottleneck's 3x3 input (width) and the shortcut (block input)
    assert sizes == [((64, 32, 32), (64, 16, 16)),
                     ((128, 16, 16), (128, 8, 8)), ((256, 16, 16), (256, 8, 8)),
                     ((256, 8, 8), (256, 4, 4)), ((512, 8, 8), (512, 4, 4)),
                     ((512, 4, 4), (512, 2, 2)), ((1024, 4, 4), (1024, 2, 2))]
    for stage in (model.layer2, model.layer3, model.layer4):
        assert stage[0].conv2[1].stride == (1, 1) and stage[0].downsample[1].stride == (1, 1)


@pytest.mark.parametrize("size", [(33, 47), (64, 64), (17, 9)])
def test_every_downsampler_gives_the_baselines_feature_sizes(size: tuple[int, int]) -> None:
    x = torch.randn(1, 3, *size)
    base = build_resnet(50, 10)
    stages = lambda m: [m.layer1, m.layer2, m.layer3, m.layer4]  # noqa: E731
    expected = _stage_shapes(base, stages(base), x)
    for name in ("carafe", "max_pool", "avg_pool", "lip", "dpp", "strided_conv"):
        model = build_resnet(50, 10, name)
        assert _stage_shapes(model, stages(model), x) == expected, name


def _stage_shapes(model: nn.Module, stages: list[nn.Module], x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    hooks = [s.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape))) for s in stages]
    model.eval()(x)
    for hook in hooks:
        hook.remove()
    return shapes


def test_a_partial_downsampler_reaches_all_places() -> None:
    from functools import partial
    model = build_resnet(101, 5, partial(AvgPoolDown, kernel_size=5))
    pools = [m for m in model.modules() if isinstance(m, AvgPoolDown)]
    assert len(pools) == 7 and all(p.kernel_size == 5 for p in pools)
    with pytest.raises(ValueError, match="depth"):
        build_resnet(34)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_embedded_dataset_is_deterministic_and_in_imagenet_layout(tmp_path: Path) -> None:
    a = ensure_synthetic_imagenet(tmp_path / "a", seed=3, train_per_class=3, val_per_class=2, image_size=24)
    b = ensure_synthetic_imagenet(tmp_path / "b", seed=3, train_per_class=3, val_per_class=2, image_size=24)
    c = ensure_synthetic_imagenet(tmp_path / "c", seed=4, train_per_class=3, val_per_class=2, image_size=24)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    assert sorted(p.name for p in (a / "train").iterdir()) == sorted(CLASS_NAMES)
    assert len(list((a / "val").rglob("*.png"))) == 2 * len(CLASS_NAMES)
    train, val = build_imagenet(a, crop_size=24, resize_size=24, min_crop_scale=0.6)
    assert len(train) == 48 and len(val) == 32 and train.classes == list(CLASS_NAMES)
    image, label = val[5]
    assert image.shape == (3, 24, 24) and label == 2
    # reused as is; another spec in the same folder is refused rather than silently mixed
    assert ensure_synthetic_imagenet(a, seed=3, train_per_class=3, val_per_class=2, image_size=24) == a
    with pytest.raises(FileExistsError, match="delete it"):
        ensure_synthetic_imagenet(a, seed=3, train_per_class=4, val_per_class=2, image_size=24)


def test_interrupted_dataset_write_leaves_nothing_to_reuse(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tasks.classification.data as data

    calls = {"n": 0}
    original = data.render_image

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 20:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(data, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_synthetic_imagenet(tmp_path / "d", train_per_class=2, val_per_class=1, image_size=16)
    assert list(tmp_path.iterdir()) == []


def test_classes_differ_in_what_they_are_about() -> None:
    # same shape, different texture: the images differ; colours are random within every class
    import numpy as np
    from tasks.classification.data import render_image
    rng = np.random.default_rng(0)
    means = [render_image(c, 32, rng).reshape(-1, 3).mean(0) for c in range(16) for _ in range(20)]
    per_class = np.array(means).reshape(16, 20, 3).mean(1)
    assert np.ptp(per_class) < 40  # no class is recognisable by its average colour


def test_topk_correct_against_brute_force() -> None:
    torch.manual_seed(0)
    logits, targets = torch.randn(50, 16), torch.randint(0, 16, (50,))
    for k in (1, 5):
        brute = sum(int(t in sorted(range(16), key=lambda j: -row[j])[:k]) for row, t in
                    zip(logits.tolist(), targets.tolist()))
        assert topk_correct(logits, targets, (k,)) == [brute]
    assert topk_correct(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (5,)) == [4]  # k capped at the classes
