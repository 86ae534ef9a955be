"""The segmentation task: UperNet / PSPNet / PSANet shapes with every slot on odd sizes, FUSE's chain against the
direct resize, PSANet's attention and the metrics against brute-force loops, the auxiliary head's loss by hand,
backbone weights, the embedded ADE20k-layout data, runs through the engine, and ICCV Figure 8's cells (image,
palette-coloured annotation, each run's prediction) checked pixel by pixel against the files and a hand-run model."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from experiment_helpers import segmentation_smoke
import reproduction.figure_segmentation
from tasks.common.experiment import ConfigError, compose, config_hash, run_experiment, validate
from tasks.common.qualitative import GAP, enlarge, image_grid
from tasks.segmentation.data import ADE20kSegmentation, ade_split_folders, collate_segmentation
from tasks.segmentation.figures import PALETTE, colour_labels
from tasks.segmentation.metrics import confusion_matrix, segmentation_scores
from tasks.segmentation.model import UperNetHead, build_segmenter, point_wise_attention
from tasks.segmentation.synthetic import CLASS_NAMES, POLE, WIRE, ensure_synthetic_ade
from tasks.segmentation.task import SegmentationTask

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf/experiment/segmentation").glob("*.yaml"))


@pytest.mark.parametrize("kwargs", [
    {},
    {"ppm_upsampler": "carafe", "fpn_upsampler": "carafe", "fuse_upsampler": "carafe"},
    {"ppm_upsampler": "carafe", "ppm_placement": "after_conv", "backbone_downsampler": "carafe"},
    {"fpn_upsampler": "deconv", "fuse_upsampler": "nearest"},
], ids=["csail", "carafe-all", "carafe-ppm-after-conv+backbone", "deconv-fpn+nearest-fuse"])
def test_upernet_gives_quarter_resolution_logits_on_odd_sizes(kwargs: dict) -> None:
    model = build_segmenter(num_classes=5, fpn_dim=16, **kwargs).eval()
    for height, width in ((64, 64), (71, 45), (33, 97)):
        with torch.no_grad():
            logits = model(torch.randn(1, 3, height, width))
        assert logits.shape == (1, 5, -(-height // 4), -(-width // 4))
        assert model(torch.randn(1, 3, height, width), output_size=(height, width)).shape == (1, 5, height, width)


def test_pspnet_is_output_stride_8_and_has_only_the_ppm_slot() -> None:
    model = build_segmenter("pspnet", num_classes=4, ppm_upsampler="carafe").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 65, 40)).shape == (1, 4, 9, 5)
    with pytest.raises(ValueError, match="fpn_upsampler"):
        build_segmenter("pspnet", fpn_upsampler="carafe")


@pytest.mark.parametrize("arch", ["upernet", "pspnet", "psanet"])
def test_head_dim_sets_every_head_width_the_papers_fix_at_512(arch: str) -> None:
    """head_dim is the PPM branches' width (all three), PSPNet's / PSANet's head conv and PSANet's attention branches;
    the default is the papers' 512, and a narrower model still gives logits of the right shape."""
    default = build_segmenter(arch, num_classes=4, fpn_dim=16, psa_mask_size=(9, 9))
    narrow = build_segmenter(arch, num_classes=4, fpn_dim=16, psa_mask_size=(9, 9), head_dim=24)
    widths = {
        "upernet": lambda m: [c.out_channels for c in (s[0] for s in m.head.ppm.convs)],
        "pspnet": lambda m: [c.out_channels for c in (s[0] for s in m.head.ppm.convs)] + [m.head.conv[0].out_channels],
        "psanet": lambda m: [m.head.reduce[k][0].out_channels for k in ("collect", "distribute")]
        + [m.head.attention["collect"][0][0].out_channels, m.head.conv[0].out_channels,
           m.head.project[0].in_channels // 2],
    }[arch]
    assert set(widths(default)) == {512} and set(widths(narrow)) == {24}
    with torch.no_grad():
        stride = 4 if arch == "upernet" else 8
        assert narrow.eval()(torch.randn(1, 3, 64, 48)).shape == (1, 4, 64 // stride, 48 // stride)
    with pytest.raises(ValueError, match="head_dim"):
        build_segmenter(arch, head_dim=0)


def test_psanet_is_output_stride_8_on_odd_sizes_and_has_no_slot() -> None:
    model = build_segmenter("psanet", num_classes=4, psa_mask_size=(9, 7)).eval()
    with torch.no_grad():  # C5 9 x 5 is shrunk to 5 x 3: the 9 x 7 mask covers every offset
        assert model(torch.randn(1, 3, 65, 40)).shape == (1, 4, 9, 5)
        assert model(torch.randn(1, 3, 64, 96)).shape == (1, 4, 8, 12)  # 4 x 6 shrunk: a local window in width
    with pytest.raises(ValueError, match="PSANet has no ppm_upsampler"):
        build_segmenter("psanet", ppm_upsampler="carafe")
    with pytest.raises(ValueError, match="two odd integers"):
        build_segmenter("psanet", psa_mask_size=(8, 9))


def _attention_by_loops(mask: torch.Tensor, mask_size: tuple[int, int], mode: str, softmax: bool) -> torch.Tensor:
    """PSANet's A[n, q, p] (weight of input q in output p) straight from the paper's definitions: collect, output p
    reads input q through p's mask at offset q - p; distribute, input q writes to output p through q's mask at offset
    p - q; offsets outside the mask weigh 0; softmax over each output's inputs, or the raw weight / (mh * mw)."""
    n, _, height, width = mask.shape
    mh, mw = mask_size
    positions = [(y, x) for y in range(height) for x in range(width)]
    attention = torch.zeros(n, len(positions), len(positions), dtype=mask.dtype)
    for b in range(n):
        for p, (py, px) in enumerate(positions):
            logits = {}
            for q, (qy, qx) in enumerate(positions):
                if mode == "collect":
                    owner, (dy, dx) = (py, px), (qy - py, qx - px)
                else:
                    owner, (dy, dx) = (qy, qx), (py - qy, px - qx)
                if abs(dy) <= (mh - 1) // 2 and abs(dx) <= (mw - 1) // 2:
                    channel = (dy + (mh - 1) // 2) * mw + dx + (mw - 1) // 2
                    logits[q] = mask[b, channel, owner[0], owner[1]]
            if softmax:
                total = sum(torch.exp(v) for v in logits.values())
                for q, v in logits.items():
                    attention[b, q, p] = torch.exp(v) / total
            else:
                for q, v in logits.items():
                    attention[b, q, p] = v / (mh * mw)
    return attention


@pytest.mark.parametrize("mode", ["collect", "distribute"])
@pytest.mark.parametrize("mask_size", [(5, 7), (3, 3)], ids=["over-complete", "window"])
@pytest.mark.parametrize("softmax", [True, False], ids=["softmax", "raw"])
def test_psa_attention_matches_brute_force_loops(mode: str, mask_size: tuple[int, int], softmax: bool) -> None:
    """On a 3 x 4 map: a (2H - 1) x (2W - 1) = 5 x 7 mask (every offset, the paper's over-completed map) and a 3 x 3
    one (offsets beyond it left out); the aggregation ``features @ A`` too."""
    generator = torch.Generator().manual_seed(0)
    mask = torch.randn(2, mask_size[0] * mask_size[1], 3, 4, dtype=torch.float64, generator=generator)
    attention = point_wise_attention(mask, mask_size, mode, softmax)
    expected = _attention_by_loops(mask, mask_size, mode, softmax)
    torch.testing.assert_close(attention, expected, rtol=1e-12, atol=1e-12)
    if softmax:  # every output's weights sum to 1
        torch.testing.assert_close(attention.sum(1), torch.ones(2, 12, dtype=torch.float64))
    features = torch.randn(2, 3, 3, 4, dtype=torch.float64, generator=generator)
    aggregated = features.flatten(2) @ attention
    by_loops = torch.stack([sum(expected[:, q, p, None] * features.flatten(2)[:, :, q] for q in range(12))
                            for p in range(12)], -1)
    torch.testing.assert_close(aggregated, by_loops)
    if mask_size == (5, 7):  # collect and distribute differ: mask_p[q - p] vs mask_q[p - q]
        other = point_wise_attention(mask, mask_size, "distribute" if mode == "collect" else "collect", softmax)
        assert not torch.allclose(attention, other)


@pytest.mark.parametrize("arch", ["upernet", "pspnet"])
def test_aux_head_off_is_the_old_model_and_on_adds_only_the_head_unused_at_eval(arch: str) -> None:
    def build(**aux: bool) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_segmenter(arch, num_classes=4, fpn_dim=16, **aux).eval()

    base, off, on = build(), build(aux_head=False), build(aux_head=True)
    base_state, off_state, on_state = base.state_dict(), off.state_dict(), on.state_dict()
    assert off_state.keys() == base_state.keys() and all(torch.equal(off_state[k], v) for k, v in base_state.items())
    assert not any("aux" in k for k in base_state)
    added = on_state.keys() - base_state.keys()
    assert added and all(k.startswith("aux_head.") for k in added) and base_state.keys() <= on_state.keys()
    assert all(torch.equal(on_state[k], v) for k, v in base_state.items())  # built last: same draws for the rest
    assert on.aux_head.conv[0].in_channels == 1024 and on.aux_head.conv[0].out_channels == 256

    calls = []
    on.aux_head.register_forward_hook(lambda *args: calls.append(1))
    images = torch.randn(1, 3, 64, 48)
    with torch.no_grad():
        torch.testing.assert_close(on(images), base(images), rtol=0, atol=0)
        torch.testing.assert_close(on(images, output_size=(64, 48)), base(images, output_size=(64, 48)),
                                   rtol=0, atol=0)
        assert not calls
        logits, aux = on(images, with_aux=True)
    stride = 16 if arch == "upernet" else 8  # C4: stride 16, or 8 in the dilated ResNet
    assert calls and aux.shape == (1, 4, 64 // stride, 48 // stride) and logits.shape == base(images).shape
    with pytest.raises(ValueError, match="auxiliary head"):
        base(images, with_aux=True)


def _cross_entropy_by_hand(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean of -log softmax at the true class over labelled pixels (label k in 1..K is logit k - 1; 0 ignored)."""
    log_p = logits.double().log_softmax(1)
    picked = log_p.gather(1, (labels.clamp(min=1) - 1)[:, None])[:, 0]
    return -picked[labels > 0].mean()


@pytest.mark.parametrize("model, resolution", [("upernet_r50", "quarter"), ("pspnet_r50", "full")])
def test_aux_loss_is_main_plus_weighted_aux_cross_entropy(model: str, resolution: str, tmp_path: Path) -> None:
    from tasks.common.distributed import World
    from tasks.segmentation.task import SegmentationTask

    cfg = compose([*segmentation_smoke(tmp_path / "never-written"), "data.num_classes=8", f"model={model}",
                   "model.aux_weight=0.4", f"task.loss_resolution={resolution}"])
    task = SegmentationTask(cfg, World(0, 1, 0, torch.device("cpu")))
    net = task.build_model().train()
    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 9, (2, 64, 64), generator=generator)
    images = torch.randn(2, 3, 64, 64, generator=generator)
    torch.manual_seed(2)  # the same dropout masks in both forward passes
    losses = task.train_step(net, {"images": images, "labels": labels})
    torch.manual_seed(2)
    logits, aux = net(images, with_aux=True)
    if resolution == "quarter":  # labels nearest-subsampled to the 1/4 logits: every 4th pixel
        labels = labels[:, ::4, ::4]
        assert logits.shape[-2:] == labels.shape[-2:]
    else:
        logits = F.interpolate(logits, size=(64, 64), mode="bilinear", align_corners=False)
    aux = F.interpolate(aux, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    main, auxiliary = _cross_entropy_by_hand(logits, labels), _cross_entropy_by_hand(aux, labels)
    assert losses["loss"].item() == pytest.approx((main + 0.4 * auxiliary).item(), rel=1e-5)
    assert losses["loss_aux"].item() == pytest.approx(auxiliary.item(), rel=1e-5)


def _head(fuse_upsampler: object, channels: int = 2) -> UperNetHead:
    return UperNetHead(3, in_channels=(channels,) * 4, fpn_dim=channels, fuse_upsampler=fuse_upsampler).double()


def _pyramid(widths: tuple[int, ...], channels: int = 2) -> list[torch.Tensor]:
    """P2..P5, each constant along the height, so resizing acts on the width alone."""
    return [torch.randn(1, channels, 1, w, dtype=torch.float64).expand(1, channels, w, w).contiguous()
            for w in widths]


def test_fuse_chain_with_nearest_equals_the_direct_resize() -> None:
    pyramid = _pyramid((16, 8, 4, 2))
    direct = torch.cat([pyramid[0], *(F.interpolate(p, size=(16, 16), mode="nearest") for p in pyramid[1:])], 1)
    torch.testing.assert_close(_head("nearest").fuse(pyramid), direct, rtol=0, atol=0)


def test_fuse_chain_with_bilinear_is_not_the_direct_bilinear_resize() -> None:
    """Two bilinear x2 steps interpolate the first step's samples, not the source: at P2 column 5 the P4 level (3
    columns f0, f1, f2) becomes 3/16 f0 + 3/4 f1 + 1/16 f2 by the chain but 1/8 f0 + 7/8 f1 by a direct x4 resize
    (source coordinate (5 + 0.5) / 4 - 0.5 = 0.875). Hence the CSAIL baseline keeps the direct resize (slot null)."""
    pyramid = _pyramid((12, 6, 3, 2))
    fused = _head("bilinear").fuse(pyramid)
    p4 = fused[0, 4:6, 0, 5]  # channels 2 fpn_dim..3 fpn_dim hold P4
    f0, f1, f2 = pyramid[2][0, :, 0, 0], pyramid[2][0, :, 0, 1], pyramid[2][0, :, 0, 2]
    torch.testing.assert_close(p4, 3 / 16 * f0 + 3 / 4 * f1 + 1 / 16 * f2)
    direct = _head(None).fuse(pyramid)[0, 4:6, 0, 5]
    torch.testing.assert_close(direct, 1 / 8 * f0 + 7 / 8 * f1)
    # one x2 step is the direct resize: P3 agrees everywhere
    torch.testing.assert_close(fused[:, 2:4], _head(None).fuse(pyramid)[:, 2:4])


def _brute_force_scores(pairs: list[tuple[np.ndarray, np.ndarray]], num_classes: int) -> tuple[float, float, dict]:
    """(mIoU, pixel accuracy, {class: IoU}) in percent by loops over pixels; predictions are 1..num_classes here."""
    inter, union = [0] * (num_classes + 1), [0] * (num_classes + 1)
    correct = labelled = 0
    for prediction, label in pairs:
        for p, t in zip(prediction.ravel().tolist(), label.ravel().tolist()):
            if t == 0:
                continue
            labelled += 1
            correct += p == t
            for c in range(1, num_classes + 1):
                inter[c] += p == c and t == c
                union[c] += p == c or t == c
    ious = {c: 100.0 * inter[c] / union[c] for c in range(1, num_classes + 1) if union[c]}
    return sum(ious.values()) / len(ious), 100.0 * correct / labelled, ious


def test_metrics_match_brute_force_loops_over_hand_made_maps() -> None:
    # classes 1..4; 0 is ignored; class 3 is absent from the ground truth but predicted; class 4 absent from both
    label_a = np.array([[1, 1, 2], [0, 2, 2], [1, 0, 2]])
    pred_a = np.array([[1, 2, 2], [3, 2, 1], [1, 3, 3]])
    label_b = np.array([[2, 2], [1, 1]])
    pred_b = np.array([[2, 2], [1, 2]])
    pairs = [(pred_a, label_a), (pred_b, label_b)]
    confusion = sum(confusion_matrix(torch.from_numpy(p) - 1, torch.from_numpy(t), 4) for p, t in pairs)
    scores = segmentation_scores(confusion, ["a", "b", "c", "d"])
    miou, accuracy, ious = _brute_force_scores(pairs, 4)
    assert scores["mIoU"] == pytest.approx(miou) and scores["pixel_acc"] == pytest.approx(accuracy)
    assert {k: v for k, v in scores.items() if k.startswith("IoU/")} == pytest.approx(
        {f"IoU/{'abcd'[c - 1]}": v for c, v in ious.items()})
    assert "IoU/d" not in scores and scores["IoU/c"] == 0.0 and scores["pixels"] == 11
    # summed over the set, not averaged per image: image a alone and b alone average to something else
    per_image = [segmentation_scores(confusion_matrix(torch.from_numpy(p) - 1, torch.from_numpy(t), 4))["mIoU"]
                 for p, t in pairs]
    assert sum(per_image) / 2 != pytest.approx(scores["mIoU"])


def test_metrics_match_brute_force_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    pairs = [(rng.integers(1, 6, size=(7, 5)), rng.integers(0, 6, size=(7, 5))) for _ in range(3)]
    confusion = sum(confusion_matrix(torch.from_numpy(p) - 1, torch.from_numpy(t), 5) for p, t in pairs)
    scores = segmentation_scores(confusion)
    miou, accuracy, _ = _brute_force_scores(pairs, 5)
    assert scores["mIoU"] == pytest.approx(miou) and scores["pixel_acc"] == pytest.approx(accuracy)
    with pytest.raises(ValueError, match="label is 7"):
        confusion_matrix(torch.zeros(2, dtype=torch.long), torch.tensor([1, 7]), 5)


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(root)).encode() + path.read_bytes())
    return digest.hexdigest()


def _run_lengths(mask: np.ndarray) -> list[int]:
    """Lengths of the runs of True along each row of a boolean map."""
    runs = []
    for row in mask.astype(np.int8):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row, [0]])))
        runs += (edges[1::2] - edges[::2]).tolist()
    return runs


def test_embedded_dataset_is_deterministic_and_read_by_the_ade_loader(tmp_path: Path) -> None:
    a = ensure_synthetic_ade(tmp_path / "a", seed=1, num_train=4, num_val=2, image_size=48)
    b = ensure_synthetic_ade(tmp_path / "b", seed=1, num_train=4, num_val=2, image_size=48)
    c = ensure_synthetic_ade(tmp_path / "c", seed=2, num_train=4, num_val=2, image_size=48)
    assert _tree_digest(a) == _tree_digest(b) != _tree_digest(c)
    images, annotations = ade_split_folders(a, "val")
    assert images == a / "ADEChallengeData2016/images/validation"
    assert sorted(p.name for p in annotations.iterdir()) == ["ADE_val_00000001.png", "ADE_val_00000002.png"]

    train = ADE20kSegmentation(a, "train", train=True, num_classes=len(CLASS_NAMES), train_scales=(32, 64),
                               max_size=96)
    for index in range(len(train)):
        image, label = train[index]
        assert image.shape[1:] == label.shape and label.shape in ((32, 32), (64, 64))
        assert 0 <= int(label.min()) and int(label.max()) <= len(CLASS_NAMES)
    val = ADE20kSegmentation(a, "val", train=False, num_classes=len(CLASS_NAMES), test_size=40)
    image, label = val[0]
    assert image.shape == (3, 40, 40) and label.shape == (48, 48)  # labels stay at their own size for scoring
    batch = collate_segmentation([val[0], train[0]], pad_to=32)
    assert batch["images"].shape[-2:] == (64, 64) and batch["image_sizes"].tolist()[0] == [40, 40]
    assert batch["labels"][0, 48:].eq(0).all() and batch["label_sizes"].tolist()[0] == [48, 48]
    # thin structures are there: every scene has a pole and a wire, about one stride-4 logit cell wide (the median
    # run across a pole, counted along rows, and across a wire, along columns; balls or clutter may cut a few)
    pole_runs, wire_runs = [], []
    for path in sorted((a / "ADEChallengeData2016/annotations/training").glob("*.png")):
        label = np.asarray(Image.open(path))
        assert {POLE, WIRE} <= set(np.unique(label).tolist())
        pole_runs += _run_lengths(label == POLE)
        wire_runs += _run_lengths((label == WIRE).T)
    assert np.median(pole_runs) >= 3 and np.median(wire_runs) >= 2
    with pytest.raises(FileNotFoundError, match="ADEChallengeData2016/images/training"):
        ADE20kSegmentation(tmp_path / "nothing", "train", train=True, num_classes=8)
    with pytest.raises(ValueError, match="data.embedded.version=1"):
        ensure_synthetic_ade(tmp_path / "v1", version=1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("data") / "ade-tiny"


@pytest.mark.parametrize("overrides", [
    *([f"experiment=segmentation/{name}"] for name in EXPERIMENTS),
    ["model=pspnet_r50", "upsampler@ppm_upsampler=carafe", "task.loss_resolution=full"],
    ["model=psanet_r50", "model.aux_weight=0.4"],
], ids=lambda o: "+".join(v.split("=")[1] for v in o[:2]))
def test_one_training_step_and_evaluation(overrides: list[str], data_dir: Path, tmp_path: Path) -> None:
    cfg = compose([*segmentation_smoke(data_dir), "data.num_classes=8", *overrides])
    record = run_experiment(cfg, tmp_path)
    assert record is not None and record["config_hash"] == config_hash(cfg)
    metrics = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert 0 <= metrics["mIoU"] <= 100 and 0 <= metrics["pixel_acc"] <= 100
    assert any(k.startswith("IoU/") for k in metrics)
    assert metrics["pixels"] > 0.9 * 2 * 64 * 64  # both val images scored at label size (a few pixels are "other")
    assert record["history"][0]["train"]["loss"] > 0


@pytest.mark.parametrize("model", ["upernet_r50", "pspnet_r50"])
def test_backbone_weights_load_into_the_segmenter_body(model: str, tmp_path: Path) -> None:
    """A plain ResNet-50's weights land in UperNet's body and in PSPNet's dilated one (dilation adds no parameter)."""
    from tasks.common.distributed import World
    from tasks.common.io import content_digest, save_checkpoint
    from tasks.common.resnet import build_resnet
    from tasks.segmentation.task import SegmentationTask

    plain = build_resnet(50, num_classes=10)
    save_checkpoint(tmp_path / "imagenet.pth", plain.state_dict())
    cfg = compose([*segmentation_smoke(tmp_path / "never-written"), f"model={model}",
                   f"model.backbone_weights={tmp_path / 'imagenet.pth'}"])
    task = SegmentationTask(cfg, World(0, 1, 0, torch.device("cpu")))
    body = task.build_model().body.state_dict()
    assert task.loaded_weights == {"path": str(tmp_path / "imagenet.pth"), "sha256": content_digest(plain.state_dict())}
    expected = {k: v for k, v in plain.state_dict().items() if not k.startswith("fc.")}
    assert body.keys() == expected.keys()
    assert all(torch.equal(body[k], v) for k, v in expected.items())


@pytest.mark.parametrize("overrides, words", [
    (["model.arch=segformer"], ["model.arch", "segformer"]),
    (["model.ppm_placement=inside"], ["model.ppm_placement"]),
    (["data.pad_to=48"], ["data.pad_to", "multiple of 32"]),
    (["data.train_scales=[]"], ["data.train_scales"]),
    (["task.loss_resolution=half"], ["task.loss_resolution"]),
    (["model.backbone_weights=/nonexistent.pth"], ["model.backbone_weights=/nonexistent.pth", "not a file"]),
    (["model.aux_weight=-0.4"], ["model.aux_weight", "-0.4"]),
    (["model=psanet_r50", "model.psa_mask_size=[58,59]"], ["model.psa_mask_size", "odd"]),
    (["model=psanet_r50", "upsampler@ppm_upsampler=carafe"], ["psanet", "ppm_upsampler"]),
    (["model.arch=psanet"], ["model.psa_mask_size", "model=psanet_r50"]),
    (["model=pspnet_r50", "upsampler@fpn_upsampler=carafe"], ["pspnet", "fpn_upsampler"]),
    (["upsampler@fuse_upsampler=carafe", "fuse_upsampler.up_kernel=4"], ["fuse_upsampler", "up_kernel"]),
])
def test_bad_values_fail_before_any_work(overrides: list[str], words: list[str], tmp_path: Path) -> None:
    cfg = compose([*segmentation_smoke(tmp_path / "never-written"), *overrides])
    with pytest.raises(ConfigError) as error:
        validate(cfg)
    assert all(word in str(error.value) for word in words), str(error.value)
    assert not (tmp_path / "never-written").exists()


# --- ICCV 2019 Figure 8 (scripts/segmentation_figure.py) ----------------------------------------------------------

# The PASCAL VOC devkit's colours of classes 0..9, written out by hand (0, "other", black).
VOC_COLOURS = [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0), (0, 0, 128), (128, 0, 128), (0, 128, 128),
               (128, 128, 128), (64, 0, 0), (192, 0, 0)]


def test_palette_is_the_voc_devkit_one_with_other_black() -> None:
    assert PALETTE.shape == (256, 3) and PALETTE.dtype == np.uint8
    assert [tuple(int(v) for v in row) for row in PALETTE[:10]] == VOC_COLOURS
    # 150 = 0b10_010_110: its bits from the lowest in threes, (R, G, B) = (0, 1, 1), (0, 1, 0), (0, 1, 0), set
    # bits 7, 6 and 5 of each channel
    assert tuple(int(v) for v in PALETTE[150]) == (0, 128 + 64 + 32, 128)
    assert len({tuple(row) for row in PALETTE}) == 256
    assert np.array_equal(colour_labels(np.array([[0, 8], [9, 1]])), np.array(
        [[VOC_COLOURS[0], VOC_COLOURS[8]], [VOC_COLOURS[9], VOC_COLOURS[1]]], np.uint8))
    with pytest.raises(ValueError, match="0..255"):
        colour_labels(np.array([[256]]))


def test_grid_of_cells_of_different_sizes_is_top_left_aligned_on_white() -> None:
    a, b, c, d = (np.full((h, w, 3), v, np.uint8) for h, w, v in ((2, 3, 10), (1, 1, 20), (3, 1, 30), (1, 2, 40)))
    grid = image_grid([[a, b], [c, d]])
    expected = np.full((2 + GAP + 3, 3 + GAP + 2, 3), 255, np.uint8)  # rows 2 and 3 tall, columns 3 and 2 wide
    expected[0:2, 0:3], expected[0:1, 5:6], expected[4:7, 0:1], expected[4:5, 5:7] = 10, 20, 30, 40
    assert np.array_equal(grid, expected)
    assert np.array_equal(enlarge(grid, 2)[::2, ::2], grid) and enlarge(grid, 2).shape == (14, 14, 3)


@pytest.fixture(scope="module")
def figure_runs(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Path]]:
    """One-iteration UperNet and UperNet w/ CARAFE runs on the module's tiny data (two 64 px validation images).

    Their checkpoints (~0.5 GB) are removed when the module is done.
    """
    runs = [tmp_path_factory.mktemp("upernet"), tmp_path_factory.mktemp("upernet_carafe")]
    for experiment, run_dir in zip(["segmentation/upernet_r50", "segmentation/upernet_r50_carafe"], runs):
        assert run_experiment(compose([f"experiment={experiment}", *segmentation_smoke(data_dir),
                                       "data.num_classes=8"]), run_dir)
    yield runs
    for run_dir in runs:
        shutil.rmtree(run_dir, ignore_errors=True)


def test_figure_8_cells_are_the_image_the_coloured_label_and_each_runs_argmax(
        figure_runs: list[Path], data_dir: Path, tmp_path: Path) -> None:
    out = reproduction.figure_segmentation.figure(figure_runs, count=2, out=tmp_path / "figure-8.png",
                                                    labels=["UperNet", "w/ CARAFE"])
    caption = out.with_suffix(".md").read_text()
    for run_dir in figure_runs:
        assert json.loads((run_dir / "metrics.json").read_text())["config_hash"] in caption
    assert "columns: input image, ground truth, UperNet, w/ CARAFE" in caption and "sky (128, 0, 0)" in caption
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 66 - 2, 4 * 66 - 2, 3)  # 2 rows; image, ground truth, two runs; 2 px gaps
    assert (grid[64:66] == 255).all() and (grid[:, 64:66] == 255).all()

    # the CARAFE run's prediction by hand: ImageNet-normalised pixels (test size 64 = the stored size, so no
    # resize or padding), logits at 1/4 resized bilinearly to 64 x 64, class = channel + 1
    cfg = OmegaConf.load(figure_runs[1] / "config.yaml")
    model = SegmentationTask(cfg, None).build_model().eval()
    model.load_state_dict(torch.load(figure_runs[1] / "checkpoint.pt", weights_only=False)["model"])
    folder = data_dir / "ADEChallengeData2016"
    images = sorted((folder / "images/validation").glob("*.jpg"))
    assert len(images) == 2
    for row, path in enumerate(images):
        image = np.asarray(Image.open(path).convert("RGB"))
        label = np.asarray(Image.open(folder / "annotations/validation" / f"{path.stem}.png"))
        top = row * 66
        assert np.array_equal(grid[top:top + 64, :64], image)
        assert np.array_equal(grid[top:top + 64, 66:130], np.array(VOC_COLOURS, np.uint8)[label])
        pixels = torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1)
        pixels = (pixels - torch.tensor([0.485, 0.456, 0.406])[:, None, None]) / torch.tensor(
            [0.229, 0.224, 0.225])[:, None, None]
        with torch.no_grad():
            logits = F.interpolate(model(pixels[None]), size=(64, 64), mode="bilinear", align_corners=False)
        predicted = logits[0].argmax(0).numpy() + 1
        assert np.array_equal(grid[top:top + 64, 3 * 66:], np.array(VOC_COLOURS, np.uint8)[predicted])


def test_figure_8_refuses_runs_validated_on_other_data(figure_runs: list[Path], tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / "checkpoint.pt").symlink_to(figure_runs[1] / "checkpoint.pt")
    cfg = OmegaConf.load(figure_runs[1] / "config.yaml")
    cfg.data.test_size = 48
    (other / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    with pytest.raises(ValueError, match=r"validated on other data than .*'test_size': \(48, 64\)"):
        reproduction.figure_segmentation.figure([figure_runs[0], other], count=1, out=tmp_path / "f.png")
    assert not (tmp_path / "f.png").exists()


def test_ppm_costs_in_the_table_notes_are_the_operators_costs():
    """The PPM placement costs printed in the segmentation table notes are what ``ppm_operator_costs`` measures, and
    its parameter counts are CARAFE's compressor (C x 64 + 64) plus encoder (64 x 9 x 100 + 100), counted by hand."""
    from reproduction.spec import NOTES_DIR
    from tasks.segmentation.model import ppm_operator_costs

    notes = OmegaConf.load(NOTES_DIR / "segmentation.yaml")
    for scale, head_dim in (("tiny", 128), ("paper", 512)):
        costs = ppm_operator_costs("carafe", 2048, head_dim)
        text = " ".join(notes[scale].split())
        for placement, channels in (("before_conv", 2048), ("after_conv", head_dim)):
            assert costs[placement]["params"] == channels * 64 + 64 + 64 * 9 * 100 + 100
            assert f"{costs[placement]['flops']:,}" in text, (scale, placement)
            assert f"{costs[placement]['params']:,}" in text, (scale, placement)
