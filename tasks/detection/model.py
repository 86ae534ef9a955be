"""Faster / Mask R-CNN with ResNet-FPN as in the papers, built from torchvision's detection code.

torchvision supplies everything except three parts the papers change: the FPN (``tasks.common.fpn``, any
top-down upsampler), the mask predictor's 2x upsampling (``MaskPredictor``, any upsampler) and the backbone's seven
downsamplers (``tasks.common.resnet``, which also makes the 3x3 convs of chosen stages DCNv2 for ResNet-101-DCNv2). RPN, RoI heads, box / mask losses, ``MultiScaleRoIAlign`` and
``GeneralizedRCNNTransform`` (resize, normalise, pad) are torchvision's own.

    model = build_detector("mask_rcnn", fpn_upsampler="carafe", mask_upsampler="carafe", min_size=160, max_size=267)

Differences from the papers' mmdetection code, kept because they are torchvision's: the box head's smooth-L1 uses
beta = 1/9 (mmdetection: 1.0), anchors crossing the image border are not ignored, and the box head's linear layers
keep PyTorch's default initialisation.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import FrozenBatchNorm2d, MultiScaleRoIAlign

from carafe import build_upsampler
from carafe.ops import check_int
from tasks.common.resnet import build_resnet
from tasks.common.fpn import UpsamplerFPN
from tasks.common.upsampling import init_upsampler_convs

ARCHS = ("faster_rcnn", "mask_rcnn")
NORMS = {"frozen_bn": FrozenBatchNorm2d, "bn": nn.BatchNorm2d}
RETURN_LAYERS = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}
LAYER_OF_STAGE = {stage: layer for layer, stage in RETURN_LAYERS.items()}
# Backbone stages from input to output; trainable_backbone_layers = k trains the last k of them.
STAGES = (("conv1", "bn1", "maxpool"), ("layer1",), ("layer2",), ("layer3",), ("layer4",))
ROI_LEVELS = ["p2", "p3", "p4", "p5"]  # P6 feeds only the RPN, as in the papers' configs
# Set by build_detector itself; every other keyword of torchvision's FasterRCNN / MaskRCNN may be passed through.
_RESERVED = {"self", "backbone", "num_classes", "min_size", "max_size", "box_roi_pool", "box_predictor",
             "mask_roi_pool", "mask_predictor", "rpn_anchor_generator", "kwargs"}
_TRANSFORM_OPTIONS = {"size_divisible", "fixed_size"}
#: the papers' (and torchvision's) anchors, one size per FPN level P2..P6 (8 x the level's stride), three ratios
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
#: RoIs of this size pool from P4 (the FPN paper's k0 = 4 at 224 px, torchvision's LevelMapper default)
CANONICAL_SCALE = 224


class ResNetFPNBackbone(nn.Module):
    """ResNet C2..C5 (``IntermediateLayerGetter``) followed by ``UpsamplerFPN``; ``out_channels`` as torchvision wants.

    The first ``5 - trainable_layers`` stages (stem = conv1 + bn1 + the stem downsampler, then layer1..layer4) are
    frozen: their parameters get ``requires_grad=False`` and, so that BatchNorm statistics stay fixed too, they stay
    in eval mode when the model is put in training mode (mmdetection's ``frozen_stages``).

    Shape: Tensor[N, 3, H, W] -> ``OrderedDict`` of ``p2``..``p6``, Tensor[N, 256, ceil(H / 2^l), ceil(W / 2^l)].
    """

    def __init__(self, resnet: nn.Module, fpn: UpsamplerFPN, trainable_layers: int = 5) -> None:
        super().__init__()
        trainable_layers = check_int("trainable_backbone_layers", trainable_layers, 0)
        if trainable_layers > len(STAGES):
            raise ValueError(f"trainable_backbone_layers must be in [0, {len(STAGES)}], got {trainable_layers}")
        self.body = IntermediateLayerGetter(resnet, return_layers=dict(RETURN_LAYERS))
        self.fpn = fpn
        self.out_channels = fpn.out_channels
        self.trainable_layers = trainable_layers
        self.frozen_modules = [name for stage in STAGES[:len(STAGES) - trainable_layers] for name in stage]
        for name in self.frozen_modules:
            self.body[name].requires_grad_(False)

    def train(self, mode: bool = True) -> ResNetFPNBackbone:
        super().train(mode)
        for name in self.frozen_modules:
            self.body[name].eval()
        return self

    def forward(self, images: Tensor) -> OrderedDict[str, Tensor]:
        return self.fpn(self.body(images))


#: the mask head's usual upsampler: a 2x2, stride-2 deconvolution (torchvision's ``conv5_mask``, mmdetection's
#: ``FCNMaskHead``); the zoo's ``deconv`` defaults to Table 2's FPN kernel 3 (``conf/upsampler/deconv_mask.yaml``).
MASK_HEAD_DECONV = {"type": "deconv", "kernel_size": 2}


class MaskPredictor(nn.Sequential):
    """torchvision's ``MaskRCNNPredictor`` with its 2x deconvolution (``conv5_mask``) replaced by any upsampler.

    upsample (``carafe.build_upsampler(upsampler, in_channels, 2)``) -> ReLU, only when the upsampler declares
    ``activation_follows`` (the deconvolution: mmdetection ``FCNMaskHead.forward`` applies ``relu`` only for
    ``upsample_method == 'deconv'``; a bare ``nn.ConvTranspose2d`` counts as one) -> 1x1 conv to per-class logits.
    Initialisation as ``FCNMaskHead.init_weights``: the logits conv and plain convolutional upsamplers
    kaiming-normal (fan_out, ReLU) with zero bias; operators declaring ``keeps_own_init`` (CARAFE) keep theirs.

    Shape: Tensor[R, C, 14, 14] -> Tensor[R, num_classes, 28, 28]; R = 0 (no RoIs) gives an empty result.
    """

    def __init__(self, in_channels: int, num_classes: int, upsampler: object = MASK_HEAD_DECONV) -> None:
        in_channels = check_int("in_channels", in_channels, 1)
        num_classes = check_int("num_classes", num_classes, 2)
        upsample = build_upsampler(upsampler, channels=in_channels, scale_factor=2)
        layers: list[tuple[str, nn.Module]] = [("upsample", upsample)]
        if getattr(upsample, "activation_follows", isinstance(upsample, nn.ConvTranspose2d)):
            layers.append(("relu", nn.ReLU(inplace=True)))
        logits = nn.Conv2d(in_channels, num_classes, 1)
        layers.append(("mask_fcn_logits", logits))
        super().__init__(OrderedDict(layers))

        def kaiming(weight: Tensor) -> None:
            nn.init.kaiming_normal_(weight, mode="fan_out", nonlinearity="relu")

        init_upsampler_convs(upsample, kaiming)
        kaiming(logits.weight)
        nn.init.zeros_(logits.bias)


def _check_sizes(min_size: object, max_size: object, size_divisible: object) -> tuple[int | tuple[int, ...], int, int]:
    if isinstance(min_size, Sequence) and not isinstance(min_size, (str, bytes)):
        if len(min_size) == 0:
            raise ValueError("min_size must be an int or a non-empty sequence of ints, got an empty sequence")
        sizes: int | tuple[int, ...] = tuple(check_int("min_size entry", s, 1) for s in min_size)
    else:
        sizes = check_int("min_size", min_size, 1)
    return sizes, check_int("max_size", max_size, 1), check_int("size_divisible", size_divisible, 1)


def _check_anchor_sizes(sizes: object) -> tuple[int, ...]:
    if isinstance(sizes, (str, bytes)) or not isinstance(sizes, Sequence) or len(sizes) != len(ROI_LEVELS) + 1:
        raise ValueError(f"anchor_sizes must be {len(ROI_LEVELS) + 1} ints, one per FPN level P2..P6, got {sizes!r}")
    return tuple(check_int("anchor_sizes entry", size, 1) for size in sizes)


def build_backbone(depth: int = 50, fpn_upsampler: object = "nearest", backbone_downsampler: object = None,
                   trainable_layers: int = 5, norm: str = "bn", fpn_channels: int = 256,
                   dcn_stages: Sequence[str] = ()) -> ResNetFPNBackbone:
    """ResNet-``depth`` (``tasks.common.resnet.build_resnet``, no pretrained weights) + ``UpsamplerFPN``.

    ``dcn_stages``: stages among ``c2``..``c5`` whose bottleneck 3x3 convs are modulated deformable (DCNv2; the
    DCNv2 paper and mmdetection's R-101-DCNv2 use ``c3``, ``c4``, ``c5``).

    ``norm``: ``"bn"`` (``nn.BatchNorm2d``, trained; convertible to SyncBN) or ``"frozen_bn"`` (torchvision's
    ``FrozenBatchNorm2d``: statistics and affine fixed, the setting for a pretrained backbone). The default follows
    torchvision's detection builders: BatchNorm when the backbone is not pretrained (it never is here), because a
    frozen identity BatchNorm leaves a ResNet trained from scratch without any normalisation.
    The CARAFE++ downsampler's own compressor BatchNorm is an ``nn.BatchNorm2d`` either way.
    """
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)}")
    unknown = sorted(set(dcn_stages) - set(LAYER_OF_STAGE))
    if unknown:
        raise ValueError(f"unknown dcn stage(s) {unknown}; choose from {sorted(LAYER_OF_STAGE)}")
    resnet = build_resnet(depth, num_classes=1000, downsampler=backbone_downsampler, norm_layer=NORMS[norm],
                          deformable_stages=[LAYER_OF_STAGE[stage] for stage in dcn_stages])
    in_channels = [getattr(resnet, name)[-1].conv3.out_channels for name in RETURN_LAYERS]
    fpn = UpsamplerFPN(in_channels, fpn_channels, upsampler=fpn_upsampler, extra_levels=1)
    return ResNetFPNBackbone(resnet, fpn, trainable_layers)


def build_detector(arch: str = "faster_rcnn", depth: int = 50, num_classes: int = 81,
                   fpn_upsampler: object = "nearest", mask_upsampler: object = MASK_HEAD_DECONV,
                   backbone_downsampler: object = None, min_size: int | Sequence[int] = 800, max_size: int = 1333,
                   size_divisible: int = 64, trainable_backbone_layers: int = 5, norm: str = "bn",
                   dcn_stages: Sequence[str] = (), **options: object) -> FasterRCNN:
    """Faster R-CNN or Mask R-CNN, ResNet-``depth``-FPN, with the papers' three swappable operators.

    Args:
        arch: ``"faster_rcnn"`` or ``"mask_rcnn"``.
        depth: ResNet depth, 50, 101 or 152.
        num_classes: classes including background (COCO: 81).
        fpn_upsampler: ``carafe.build_upsampler`` spec of the FPN's top-down upsampling (Table 2 / IV).
        mask_upsampler: spec of the mask predictor's 2x upsampling (Table 3 / VI); Mask R-CNN only, ignored by
            Faster R-CNN. The default, ``MASK_HEAD_DECONV``, is torchvision's and mmdetection's 2x2 stride-2
            deconvolution (the name ``"deconv"`` alone builds the zoo's kernel-3 deconvolution of Table 2).
        backbone_downsampler: ``carafe.build_downsampler`` spec for the ResNet's seven downsampling places
            (Table III), or None for torchvision's strided convs and max pool.
        min_size, max_size: ``GeneralizedRCNNTransform``'s resize: shorter side ``min_size`` (a sequence: one
            drawn at random per training batch), longer side at most ``max_size``. Papers: 800, 1333.
        size_divisible: the batch is zero-padded at the bottom/right to a multiple of this (papers: 64);
            forwarded to ``GeneralizedRCNNTransform(size_divisible=...)`` through ``FasterRCNN``'s ``**kwargs``.
        trainable_backbone_layers: how many of stem, layer1..layer4 train, counted from layer4 (0..5).
        norm: the backbone's normalisation, ``"frozen_bn"`` or ``"bn"`` (see ``build_backbone``).
        dcn_stages: backbone stages (``c2``..``c5``) whose 3x3 convs are DCNv2; ``()`` for none (Table I's
            ResNet-101-DCNv2: ``("c3", "c4", "c5")``). With ``backbone_downsampler``, a stride-2 DCNv2 becomes the
            downsampler followed by a stride-1 DCNv2.
        **options: any other keyword of torchvision's ``FasterRCNN`` / ``MaskRCNN`` (``rpn_post_nms_top_n_test``,
            ``box_detections_per_img``, ``image_mean``, ``fixed_size``, ...), and two of this builder's own, for
            images far smaller than COCO's: ``anchor_sizes``, one anchor side per level P2..P6 (default
            ``ANCHOR_SIZES``, the papers' 32..512, each with ratios 0.5, 1, 2), and ``roi_canonical_scale``, the
            RoI side that pools from P4 (default 224; a RoI of side s pools from level
            floor(4 + log2(s / roi_canonical_scale)), clamped to P2..P5).

    Returns: a torchvision ``FasterRCNN`` or ``MaskRCNN`` (no pretrained weights). In training mode
    ``model(images, targets)`` returns the loss dict; in eval mode ``model(images)`` the detections, boxes in the
    input images' coordinates (images: list of Tensor[3, H_i, W_i] in [0, 1]).
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown detector arch {arch!r}; choose one of {', '.join(ARCHS)}")
    num_classes = check_int("num_classes", num_classes, 2)
    anchor_sizes = _check_anchor_sizes(options.pop("anchor_sizes", ANCHOR_SIZES))
    canonical_scale = check_int("roi_canonical_scale", options.pop("roi_canonical_scale", CANONICAL_SCALE), 1)
    min_size, max_size, size_divisible = _check_sizes(min_size, max_size, size_divisible)
    detector_cls = MaskRCNN if arch == "mask_rcnn" else FasterRCNN
    allowed = (set(inspect.signature(detector_cls.__init__).parameters) | _TRANSFORM_OPTIONS) - _RESERVED
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"unknown {detector_cls.__name__} option(s) {unknown}; allowed: {sorted(allowed)}")

    backbone = build_backbone(depth, fpn_upsampler, backbone_downsampler, trainable_backbone_layers, norm,
                              dcn_stages=dcn_stages)
    box_head_size = 1024  # torchvision's TwoMLPHead width, the papers' 2 x 1024 shared FCs
    heads: dict[str, object] = {
        "rpn_anchor_generator": AnchorGenerator(tuple((size,) for size in anchor_sizes),
                                                (ANCHOR_RATIOS,) * len(anchor_sizes)),
        "box_roi_pool": MultiScaleRoIAlign(featmap_names=ROI_LEVELS, output_size=7, sampling_ratio=2,
                                           canonical_scale=canonical_scale),
        "box_predictor": FastRCNNPredictor(box_head_size, num_classes),
    }
    if arch == "mask_rcnn":
        heads["mask_roi_pool"] = MultiScaleRoIAlign(featmap_names=ROI_LEVELS, output_size=14, sampling_ratio=2,
                                                    canonical_scale=canonical_scale)
        heads["mask_predictor"] = MaskPredictor(256, num_classes, mask_upsampler)
    return detector_cls(backbone, num_classes=None, min_size=min_size, max_size=max_size,
                        size_divisible=size_divisible, **heads, **options)
