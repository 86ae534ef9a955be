"""Detection models: the FPN against a hand-written reference, odd input sizes, one training step and one eval
forward of Faster / Mask R-CNN with several upsamplers, images and batches without objects, the mask predictor,
the structure shared by every upsampler choice, the backbone options and input checks.

Images are tiny (64 x 80) and min_size / max_size keep them so: each model step takes about a second on 2 cores.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.ops import FrozenBatchNorm2d

from carafe import CARAFEDownPack, CARAFEPack
from carafe.upsamplers import DeconvUpsample, InterpolateUpsample
from tasks.common.deformable import ModulatedDeformConv2d
from tasks.common.resnet import count_downsamplers
from tasks.common.fpn import UpsamplerFPN
from tasks.common.upsampling import crop_to
from tasks.detection.model import MaskPredictor, build_backbone, build_detector

H, W = 64, 80
NUM_CLASSES = 4
# Fewer proposals, sampled RoIs and detections than the papers' settings: the same code paths, a fraction of the time.
SMALL = {"min_size": H, "max_size": W, "box_detections_per_img": 10, "box_batch_size_per_image": 64,
         "rpn_pre_nms_top_n_train": 300, "rpn_post_nms_top_n_train": 150,
         "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 150}


def _ellipse_mask(box: list[float], h: int, w: int) -> torch.Tensor:
    x0, y0, x1, y1 = box
    yy, xx = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")
    inside = ((xx - (x0 + x1) / 2) / ((x1 - x0) / 2)) ** 2 + ((yy - (y0 + y1) / 2) / ((y1 - y0) / 2)) ** 2 <= 1
    return inside.to(torch.uint8)


def _target(boxes: list[list[float]], labels: list[int], h: int = H, w: int = W) -> dict:
    masks = [_ellipse_mask(b, h, w) for b in boxes]
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "masks": torch.stack(masks) if masks else torch.zeros(0, h, w, dtype=torch.uint8)}


def _batch(with_objects: tuple[bool, ...] = (True, True)) -> tuple[list[torch.Tensor], list[dict]]:
    gen = torch.Generator().manual_seed(0)
    images = [torch.rand(3, H, W, generator=gen) for _ in with_objects]
    targets = [_target([[6.0, 8.0, 40.0, 50.0], [44.0, 4.0, 76.0, 30.0]], [1, 3]) if has else _target([], [])
               for has in with_objects]
    return images, targets


def _mask_roi_counter(model: MaskRCNN) -> list[int]:
    seen: list[int] = []
    model.roi_heads.mask_predictor.register_forward_hook(lambda m, inputs, out: seen.append(inputs[0].shape[0]))
    return seen


def _train_step(model: nn.Module, images: list[torch.Tensor], targets: list[dict]) -> dict[str, torch.Tensor]:
    model.train()
    losses = model(images, targets)
    for name, value in losses.items():
        assert torch.isfinite(value), f"{name} = {value}"
    sum(losses.values()).backward()
    return losses


def _check_detections(model: nn.Module, images: list[torch.Tensor], with_masks: bool) -> None:
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert len(outputs) == len(images)
    for image, out in zip(images, outputs):
        d = out["boxes"].shape[0]
        assert out["boxes"].shape == (d, 4) and out["scores"].shape == (d,) and out["labels"].shape == (d,)
        assert ((out["labels"] >= 1) & (out["labels"] < NUM_CLASSES)).all()
        assert (out["boxes"][:, 0::2] <= image.shape[-1]).all() and (out["boxes"][:, 1::2] <= image.shape[-2]).all()
        assert (out["boxes"] >= 0).all()
        if with_masks:
            assert out["masks"].shape == (d, 1, *image.shape[-2:])
            assert ((out["masks"] >= 0) & (out["masks"] <= 1)).all()
        else:
            assert "masks" not in out


# ---- the FPN --------------------------------------------------------------------------------------------------

def _reference_fpn(fpn: UpsamplerFPN, feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """FPN_CARAFE with nearest upsampling, written out: P6 lateral = 3x3/2 conv on C5; merged maps are upsampled
    (index repetition) and cropped at the bottom/right to the lateral's size; 3x3 output convs."""
    laterals = [F.conv2d(x, conv.weight, conv.bias) for conv, x in zip(fpn.lateral_convs, feats)]
    extra = fpn.extra_lateral_convs[0]
    laterals.append(F.conv2d(feats[-1], extra.weight, extra.bias, stride=2, padding=1))
    merged = laterals[:]
    for i in range(len(merged) - 2, -1, -1):
        coarse = merged[i + 1]
        up = coarse.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        h, w = laterals[i].shape[-2:]
        merged[i] = laterals[i] + up[..., :h, :w]
    return [F.conv2d(m, conv.weight, conv.bias, padding=1) for conv, m in zip(fpn.output_convs, merged)]


@pytest.mark.parametrize("size", [(32, 48), (33, 47)])
def test_fpn_matches_reference(size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    channels = [3, 5, 6, 7]
    fpn = UpsamplerFPN(channels, out_channels=8, upsampler="nearest")
    for p in fpn.parameters():  # the xavier init leaves biases at zero; make them count
        nn.init.normal_(p, std=0.3)
    h, w = size
    feats = []
    for c in channels:
        feats.append(torch.randn(2, c, h, w, dtype=torch.float64))
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    fpn = fpn.double()
    out = fpn(feats)
    assert list(out) == ["p2", "p3", "p4", "p5", "p6"]
    for got, want in zip(out.values(), _reference_fpn(fpn, feats)):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want)


def test_fpn_p6_is_a_strided_conv_on_c5_at_the_top_of_the_top_down_path() -> None:
    fpn = build_backbone(fpn_upsampler="nearest").fpn
    extra = fpn.extra_lateral_convs[0]
    assert (extra.in_channels, extra.out_channels, extra.kernel_size, extra.stride, extra.padding) == (
        2048, 256, (3, 3), (2, 2), (1, 1))
    assert len(fpn.upsamplers) == 4 and len(fpn.output_convs) == 5 and len(fpn.lateral_convs) == 4
    # P6's lateral reaches P5 through the top-down path: changing it changes P5 (and P2).
    torch.manual_seed(0)
    small = UpsamplerFPN([4, 4, 4, 4], out_channels=4)
    feats = [torch.randn(1, 4, s, s) for s in (16, 8, 4, 2)]
    before = small(feats)
    with torch.no_grad():
        small.extra_lateral_convs[0].bias.add_(1.0)
    after = small(feats)
    assert not torch.allclose(before["p5"], after["p5"]) and not torch.allclose(before["p2"], after["p2"])


def test_crop_keeps_top_left_and_rejects_smaller_maps() -> None:
    x = torch.arange(2 * 6 * 8.0).view(1, 2, 6, 8)
    torch.testing.assert_close(crop_to(x, torch.empty(1, 2, 5, 7)), x[:, :, :5, :7])
    assert crop_to(x, torch.empty(1, 2, 6, 8)) is x
    with pytest.raises(ValueError, match=r"smaller than the map \(7, 8\)"):
        crop_to(x, torch.empty(1, 2, 7, 8))


FPN_UPSAMPLERS = ["nearest", "bilinear", "nearest_conv", "bilinear_conv", "deconv", "pixel_shuffle", "gum",
                  "spatial_attention", "carafe"]


@pytest.mark.parametrize("upsampler", FPN_UPSAMPLERS)
def test_backbone_odd_input_sizes(upsampler: str) -> None:
    torch.manual_seed(0)
    backbone = build_backbone(fpn_upsampler=upsampler)
    x = torch.rand(1, 3, 65, 97)
    out = backbone(x)
    h, w, expected = 65, 97, []
    for _ in range(6):  # conv1, max pool, layer2..4, P6: each a ceil division by 2
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        expected.append((h, w))
    assert [tuple(v.shape[-2:]) for v in out.values()] == expected[1:]
    assert all(v.shape[:2] == (1, 256) for v in out.values())
    sum(v.square().mean() for v in out.values()).backward()
    for name, p in backbone.fpn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_structure_is_identical_across_fpn_upsamplers() -> None:
    def split(model: nn.Module) -> tuple[list, list]:
        rest, ups = [], []
        for name, tensor in model.state_dict().items():
            (ups if name.startswith("backbone.fpn.upsamplers.") else rest).append((name, tuple(tensor.shape)))
        return rest, ups

    torch.manual_seed(0)
    models = {name: build_detector("faster_rcnn", fpn_upsampler=name) for name in ("nearest", "carafe", "deconv")}
    rest = {name: split(m)[0] for name, m in models.items()}
    assert rest["nearest"] == rest["carafe"] == rest["deconv"]
    assert split(models["nearest"])[1] == []
    assert all(isinstance(u, CARAFEPack) for u in models["carafe"].backbone.fpn.upsamplers)
    assert all(isinstance(u, DeconvUpsample) for u in models["deconv"].backbone.fpn.upsamplers)
    assert models["deconv"].backbone.fpn.upsamplers[0].kernel_size == 3  # Table 2's 590k-parameter deconv


def test_initialisation_follows_the_papers_code() -> None:
    xavier_bound = math.sqrt(6 / (2 * 256 * 9))  # 3x3, 256 -> 256: fan_in = fan_out = 2304
    torch.manual_seed(0)
    fpns = {name: UpsamplerFPN([256, 512, 1024, 2048], upsampler=name) for name in ("deconv", "nearest_conv",
                                                                                    "carafe", "gum")}
    for conv in fpns["deconv"].output_convs:
        assert 0.9 * xavier_bound < conv.weight.abs().max() <= xavier_bound and not conv.bias.any()
    for name in ("deconv", "nearest_conv"):  # PyTorch's default would stay below 1 / sqrt(2304) = 0.021
        for up in fpns[name].upsamplers:
            weight = up.deconv.weight if name == "deconv" else up.conv.weight
            assert 0.9 * xavier_bound < weight.abs().max() <= xavier_bound, name
    for up in fpns["carafe"].upsamplers:  # CARAFE keeps the papers' normal(0, 0.001) encoder
        assert up.content_encoder.weight.std() < 0.0012
    for up in fpns["gum"].upsamplers:  # GUM keeps its zero offsets (it starts as bilinear upsampling)
        assert not up.offset.weight.any()
    for up in UpsamplerFPN([256, 512, 1024, 2048], upsampler="dysample").upsamplers:  # DySample: N(0, 0.001)
        assert up.offset.weight.std() < 0.0012 and not up.offset.bias.any()
    deconv = MaskPredictor(256, NUM_CLASSES).upsample.deconv.weight  # kaiming fan_out: 2 / (256 * 4)
    assert abs(deconv.std().item() - math.sqrt(2 / 1024)) < 0.003


# ---- the mask predictor ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("upsampler", ["deconv", "carafe", "bilinear", "nearest", "pixel_shuffle"])
@pytest.mark.parametrize("rois", [3, pytest.param(0, id="no_rois")])
def test_mask_predictor_shapes_and_empty_rois(upsampler: str, rois: int) -> None:
    torch.manual_seed(0)
    predictor = MaskPredictor(256, NUM_CLASSES, upsampler)
    x = torch.randn(rois, 256, 14, 14, requires_grad=True)
    out = predictor(x)
    assert out.shape == (rois, NUM_CLASSES, 28, 28)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_mask_predictor_relu_only_after_deconv_and_deconv_is_torchvisions() -> None:
    deconv = MaskPredictor(256, NUM_CLASSES)
    assert [name for name, _ in deconv.named_children()] == ["upsample", "relu", "mask_fcn_logits"]
    conv = deconv.upsample.deconv
    assert (conv.kernel_size, conv.stride, conv.padding, conv.output_padding) == ((2, 2), (2, 2), (0, 0), (0, 0))
    zoo_deconv = MaskPredictor(256, NUM_CLASSES, "deconv")  # the name alone: the zoo's (Table 2's) kernel 3
    assert zoo_deconv.upsample.deconv.kernel_size == (3, 3) and hasattr(zoo_deconv, "relu")
    for name in ("carafe", "bilinear", "nearest_conv"):
        assert [n for n, _ in MaskPredictor(256, NUM_CLASSES, name).named_children()] == [
            "upsample", "mask_fcn_logits"]
    # With the deconv, the predictor computes relu(deconv(x)) then the 1x1 logits, like torchvision's.
    torch.manual_seed(0)
    x = torch.randn(2, 256, 14, 14)
    want = F.conv2d(F.relu(F.conv_transpose2d(x, conv.weight, conv.bias, stride=2)),
                    deconv.mask_fcn_logits.weight, deconv.mask_fcn_logits.bias)
    torch.testing.assert_close(deconv(x), want)


def test_hosts_follow_what_an_operator_declares_not_its_class() -> None:
    """A new operator needs no edit in a host: its class attributes say whether a ReLU follows it and whether the
    host may re-initialise its convolutions."""
    from carafe.upsamplers import InterpolateConvUpsample

    class Declared(InterpolateConvUpsample):
        activation_follows = True
        keeps_own_init = True

    torch.manual_seed(0)
    predictor = MaskPredictor(256, NUM_CLASSES, lambda channels, scale_factor: Declared(channels, scale_factor))
    assert [n for n, _ in predictor.named_children()] == ["upsample", "relu", "mask_fcn_logits"]
    torch.manual_seed(0)
    untouched = Declared(256, 2).conv.weight
    torch.testing.assert_close(predictor.upsample.conv.weight, untouched)  # the host left its init alone
    plain = MaskPredictor(256, NUM_CLASSES, "nearest_conv").upsample.conv.weight
    assert abs(plain.std().item() - math.sqrt(2 / (256 * 9))) < 0.003  # re-initialised: kaiming fan_out


# ---- whole detectors ------------------------------------------------------------------------------------------

DETECTORS = [
    ("faster_rcnn", "nearest", "deconv"),
    ("faster_rcnn", "carafe", "deconv"),
    ("faster_rcnn", "deconv", "deconv"),
    ("mask_rcnn", "nearest", "deconv"),
    ("mask_rcnn", "carafe", "carafe"),
    ("mask_rcnn", "nearest", "bilinear"),
]


@pytest.mark.parametrize("arch,fpn_upsampler,mask_upsampler", DETECTORS)
def test_train_step_and_eval_forward(arch: str, fpn_upsampler: str, mask_upsampler: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=NUM_CLASSES, fpn_upsampler=fpn_upsampler,
                           mask_upsampler=mask_upsampler, **SMALL)
    assert isinstance(model, MaskRCNN if arch == "mask_rcnn" else FasterRCNN)
    images, targets = _batch()
    seen = _mask_roi_counter(model) if arch == "mask_rcnn" else []
    losses = _train_step(model, images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == (expected | {"loss_mask"} if arch == "mask_rcnn" else expected)
    if arch == "mask_rcnn":
        assert seen and seen[0] > 0  # ground-truth boxes are proposals, so the mask head trains on RoIs
        for name, p in model.roi_heads.mask_predictor.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    for name, p in model.backbone.fpn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    _check_detections(model, images, with_masks=arch == "mask_rcnn")


@pytest.mark.parametrize("arch", ["faster_rcnn", "mask_rcnn"])
def test_image_without_objects(arch: str) -> None:
    torch.manual_seed(0)
    model = build_detector(arch, num_classes=NUM_CLASSES, fpn_upsampler="carafe", mask_upsampler="carafe", **SMALL)
    images, targets = _batch((True, False))
    _train_step(model, images, targets)


@pytest.mark.parametrize("mask_upsampler", ["deconv", "carafe"])
def test_batch_without_mask_rois(mask_upsampler: str) -> None:
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", num_classes=NUM_CLASSES, mask_upsampler=mask_upsampler, **SMALL)
    images, targets = _batch((False, False))
    seen = _mask_roi_counter(model)
    losses = _train_step(model, images, targets)
    assert seen == [0]
    assert losses["loss_mask"].item() == 0.0
    assert losses["loss_box_reg"].item() == 0.0  # no foreground at all
    for name, p in model.roi_heads.mask_predictor.named_parameters():
        assert p.grad is None or torch.count_nonzero(p.grad) == 0, name


def test_transform_resizes_and_pads_to_size_divisible() -> None:
    model = build_detector("faster_rcnn", min_size=48, max_size=100, size_divisible=64)
    assert model.transform.size_divisible == 64
    assert model.transform.min_size == (48,) and model.transform.max_size == 100
    model.eval()
    batch, _ = model.transform([torch.rand(3, 50, 70), torch.rand(3, 30, 80)])
    # shorter side -> 48 (capped so that the longer side stays <= 100), then zero padding to multiples of 64
    assert batch.image_sizes == [(48, 67), (37, 100)]
    assert tuple(batch.tensors.shape) == (2, 3, 64, 128)
    assert build_detector("faster_rcnn", size_divisible=32).transform.size_divisible == 32


def test_backbone_downsampler_reaches_the_resnet() -> None:
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", num_classes=NUM_CLASSES, backbone_downsampler="carafe", **SMALL)
    body = model.backbone.body
    assert count_downsamplers(body, CARAFEDownPack) == 7
    assert isinstance(body["maxpool"], CARAFEDownPack)
    assert all(p.requires_grad for p in body["maxpool"].parameters())  # the stem trains at 5 layers
    images, targets = _batch()
    _train_step(model, images, targets)
    assert all(p.grad is not None for p in body["maxpool"].parameters())
    plain = build_detector("faster_rcnn", num_classes=NUM_CLASSES)
    assert isinstance(plain.backbone.body["maxpool"], nn.MaxPool2d)


def test_resnet101_dcnv2_with_carafe_everywhere_trains_one_step() -> None:
    """CARAFE++ Table I's strongest row: ResNet-101-DCNv2 (c3-c5), CARAFE++ downsamplers, CARAFE in FPN and mask head."""
    torch.manual_seed(0)
    model = build_detector("mask_rcnn", depth=101, num_classes=NUM_CLASSES, backbone_downsampler="carafe",
                           fpn_upsampler="carafe", mask_upsampler="carafe", dcn_stages=("c3", "c4", "c5"), **SMALL)
    body = model.backbone.body
    deformable = [m for m in body.modules() if isinstance(m, ModulatedDeformConv2d)]
    assert len(deformable) == 4 + 23 + 3 and all(m.stride == 1 for m in deformable)  # strides went to CARAFE++
    assert isinstance(body["layer1"][0].conv2, nn.Conv2d)
    images, targets = _batch()
    _train_step(model, images, targets)
    for module in (body["layer2"][0].conv2[1], body["layer4"][2].conv2):
        assert module.offset_mask.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="dcn stage"):
        build_detector("faster_rcnn", dcn_stages=("c6",))


def test_trainable_layers_and_norm() -> None:
    model = build_detector("faster_rcnn", trainable_backbone_layers=3, backbone_downsampler="carafe")
    body = model.backbone.body
    frozen = ("conv1", "bn1", "maxpool", "layer1")
    for name, p in body.named_parameters():
        assert p.requires_grad == (not name.startswith(frozen)), name
    model.train()
    assert not body["bn1"].training and not body["layer1"].training and body["layer2"].training
    assert isinstance(body["bn1"], nn.BatchNorm2d)  # default norm: trained BatchNorm (no pretrained weights)
    assert any(p.numel() for p in body["maxpool"].parameters())  # the stem's CARAFE++ downsampler is frozen too
    frozen_mean = body["layer1"][0].bn1.running_mean.clone()
    trained_mean = body["layer2"][0].bn1.running_mean.clone()
    model.backbone(torch.rand(2, 3, 64, 64))
    torch.testing.assert_close(body["layer1"][0].bn1.running_mean, frozen_mean)  # frozen stage: stats fixed
    assert not torch.allclose(body["layer2"][0].bn1.running_mean, trained_mean)
    frozen_bn = build_detector("faster_rcnn", norm="frozen_bn")
    assert isinstance(frozen_bn.backbone.body["layer3"][0].bn1, FrozenBatchNorm2d)
    assert all(p.requires_grad for p in build_detector("faster_rcnn").backbone.parameters())


def test_options_reach_torchvision() -> None:
    model = build_detector("mask_rcnn", box_detections_per_img=7, rpn_post_nms_top_n_test=50, min_size=H, max_size=W)
    assert model.roi_heads.detections_per_img == 7
    assert model.rpn._post_nms_top_n["testing"] == 50
    assert isinstance(build_detector("faster_rcnn", fpn_upsampler={"type": "nearest"}).backbone.fpn.upsamplers[0],
                      InterpolateUpsample)


def test_anchor_sizes_and_roi_levels_for_small_images() -> None:
    """``anchor_sizes``: the anchors of P2..P6 have those sides (ratio 1: a square of that side); the default is
    torchvision's. ``roi_canonical_scale`` c: a RoI of side s pools from level floor(4 + log2(s / c)) clamped to
    2..5, read off features that hold their level number everywhere."""
    from torchvision.models.detection.image_list import ImageList

    model = build_detector("faster_rcnn", num_classes=NUM_CLASSES, min_size=128, max_size=128,
                           anchor_sizes=[8, 16, 32, 64, 128], roi_canonical_scale=56)
    features = {f"p{level}": torch.full((1, 1, 128 // 2 ** level, 128 // 2 ** level), float(level))
                for level in range(2, 7)}
    anchors = model.rpn.anchor_generator(ImageList(torch.zeros(1, 3, 128, 128), [(128, 128)]),
                                         list(features.values()))[0]
    sides = sorted({round(float(w)) for w, h in zip(anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1])
                    if abs(float(w - h)) < 1e-3})
    assert sides == [8, 16, 32, 64, 128]
    assert build_detector("faster_rcnn").rpn.anchor_generator.sizes == ((32,), (64,), (128,), (256,), (512,))
    sides = [8, 16, 27, 33, 60, 120]
    boxes = torch.tensor([[4.0, 4.0, 4.0 + s, 4.0 + s] for s in sides])
    pooled = model.roi_heads.box_roi_pool(features, [boxes], [(128, 128)])
    expected = [min(max(math.floor(4 + math.log2(s / 56)), 2), 5) for s in sides]
    assert expected == [2, 2, 2, 3, 4, 5]
    assert pooled[:, 0, 3, 3].tolist() == [float(level) for level in expected]
    assert build_detector("mask_rcnn", num_classes=NUM_CLASSES, roi_canonical_scale=56
                          ).roi_heads.mask_roi_pool.canonical_scale == 56


@pytest.mark.parametrize("kwargs,error,match", [
    ({"arch": "retinanet"}, ValueError, "retinanet"),
    ({"num_classes": 1}, ValueError, "num_classes"),
    ({"num_classes": 8.0}, TypeError, "num_classes"),
    ({"norm": "group_norm"}, ValueError, "group_norm"),
    ({"depth": 34}, ValueError, "34"),
    ({"trainable_backbone_layers": 6}, ValueError, "6"),
    ({"size_divisible": 0}, ValueError, "size_divisible"),
    ({"min_size": []}, ValueError, "min_size"),
    ({"rpn_batch_size": 3}, TypeError, "rpn_batch_size"),
    ({"box_predictor": None}, TypeError, "box_predictor"),
    ({"fpn_upsampler": "sinc"}, KeyError, "sinc"),
    ({"anchor_sizes": [8, 16, 32]}, ValueError, "anchor_sizes"),
    ({"anchor_sizes": [8, 16, 32, 64, 12.5]}, TypeError, "anchor_sizes"),
    ({"roi_canonical_scale": 0}, ValueError, "roi_canonical_scale"),
])
def test_bad_arguments(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        build_detector(**kwargs)
