"""torchvision's ResNet with its downsampling operators swappable (CARAFE++ section 4.1).

ResNet downsamples at seven places besides the stride-2 stem convolution: the stem max pool, and in the first
bottleneck of Res-3, Res-4 and Res-5 both the strided 3x3 conv and the strided 1x1 shortcut conv. With a
``downsampler``, each of the seven becomes that operator at stride 2 and the convolution after it runs at stride 1:

    stem:        conv7x7/2 -> BN -> ReLU -> down(64)                      (replaces max pool 3x3/2)
    bottleneck:  conv1x1 -> BN -> ReLU -> down(width) -> conv3x3/1 -> ...  (was conv3x3/2)
    shortcut:    down(in_channels) -> conv1x1/1 -> BN                      (was conv1x1/2 -> BN)

``downsampler=None`` keeps torchvision's network unchanged: the baseline ("strided conv" in CARAFE++ Table III,
"ResNet-50" in Table II). Every operator of ``carafe.build_downsampler`` maps H to ceil(H / 2), as the strided
convolutions and the max pool it replaces do, so feature-map sizes are the same for every choice.

``deformable_stages`` (detection's ResNet-DCNv2, CARAFE++ Table I) makes every bottleneck's 3x3 conv in those
stages a modulated deformable convolution (``tasks.common.deformable``). Where a downsampler took over a strided
3x3, the stride-1 3x3 after it is the deformable one: ``down(width) -> DCNv2 3x3/1``.
"""

from __future__ import annotations

import contextlib
import contextvars

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from carafe import build_downsampler
from tasks.common.deformable import ModulatedDeformConv2d
from tasks.common.io import content_digest, load_checkpoint
from tasks.common.provenance import REPO_ROOT

RESNET_LAYERS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
STAGES = ("layer1", "layer2", "layer3", "layer4")       # Res-2 .. Res-5 in the papers' naming
STAGES_WITH_STRIDE = ("layer2", "layer3", "layer4")  # Res-3, Res-4 and Res-5 in the papers' naming


def build_resnet(depth: int = 50, num_classes: int = 1000, downsampler: object = None,
                 zero_init_residual: bool = False, norm_layer: Callable[[int], nn.Module] | None = None,
                 deformable_stages: Sequence[str] = ()) -> ResNet:
    """A torchvision bottleneck ResNet (no pretrained weights) with ``downsampler`` at its seven downsampling places.

    ``downsampler``: None (torchvision's strided convs and max pool) or anything ``carafe.build_downsampler``
    takes (a name such as ``"carafe"``, a mapping with ``type``, a class or a ``functools.partial``).
    ``zero_init_residual`` starts each block's last BN at zero (Goyal et al., the CARAFE++ ImageNet setup).
    ``deformable_stages``: names among ``STAGES`` whose bottleneck 3x3 convs become DCNv2 (``make_deformable``).
    """
    if depth not in RESNET_LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
    model = ResNet(Bottleneck, list(RESNET_LAYERS[depth]), num_classes=num_classes,
                   zero_init_residual=zero_init_residual, norm_layer=norm_layer)
    if downsampler is not None:
        swap_downsamplers(model, downsampler)
    make_deformable(model, deformable_stages)  # after the swap: the stride-1 3x3 behind a downsampler deforms
    return model


def swap_downsamplers(model: ResNet, downsampler: object) -> ResNet:
    """Put ``downsampler`` (a ``build_downsampler`` spec, built with each place's channels) at the seven places."""
    def make(channels: int) -> nn.Module:
        return build_downsampler(downsampler, channels=channels, scale_factor=2)

    model.maxpool = make(model.conv1.out_channels)
    for stage_name in STAGES_WITH_STRIDE:
        block = getattr(model, stage_name)[0]
        if not isinstance(block, Bottleneck) or block.conv2.stride != (2, 2) or block.downsample is None:
            raise ValueError(f"{stage_name}[0] is not a strided bottleneck with a projection shortcut; "
                             "only torchvision's standard bottleneck ResNets are supported")
        block.conv2.stride = (1, 1)
        block.conv2 = nn.Sequential(make(block.conv2.in_channels), block.conv2)
        shortcut_conv, shortcut_norm = block.downsample
        shortcut_conv.stride = (1, 1)
        block.downsample = nn.Sequential(make(shortcut_conv.in_channels), shortcut_conv, shortcut_norm)
    return model


def make_deformable(model: ResNet, stages: Sequence[str]) -> ResNet:
    """Replace every bottleneck's 3x3 conv (``conv2``, or the conv behind a downsampler) in ``stages`` by a
    ``ModulatedDeformConv2d`` with the same weights, stride and padding."""
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise ValueError(f"unknown ResNet stage(s) {unknown} for deformable convolutions; choose from {STAGES}")
    for stage_name in stages:
        for block in getattr(model, stage_name):
            if isinstance(block.conv2, nn.Sequential):  # down(width) -> conv3x3/1, from swap_downsamplers
                block.conv2[-1] = ModulatedDeformConv2d.from_conv(block.conv2[-1])
            else:
                block.conv2 = ModulatedDeformConv2d.from_conv(block.conv2)
    return model


def count_downsamplers(model: nn.Module, kind: type[nn.Module]) -> int:
    """How many modules of ``kind`` the model holds (the tests check that there are seven)."""
    return sum(isinstance(m, kind) for m in model.modules())


_WEIGHTS_PENDING: contextvars.ContextVar[bool] = contextvars.ContextVar("backbone_weights_pending", default=False)


@contextlib.contextmanager
def backbone_weights_pending() -> Iterator[None]:
    """Within the block ``check_backbone_weights`` accepts a file that does not exist yet: composing a table's rows
    to list or render them names the checkpoints of pretraining runs that are trained only when the rows run."""
    token = _WEIGHTS_PENDING.set(True)
    try:
        yield
    finally:
        _WEIGHTS_PENDING.reset(token)


def backbone_weights_path(path: str | Path) -> Path:
    """``model.backbone_weights`` as a file: a relative path is the repository's (the pretraining checkpoints of the
    runs store are named so, which keeps their rows' config hashes the same in every checkout)."""
    path = Path(path)
    return path if path.is_absolute() else REPO_ROOT / path


def check_backbone_weights(path: str | Path | None) -> None:
    """The config check behind ``model.backbone_weights``: None / empty (train from scratch) or an existing file."""
    if path and not backbone_weights_path(path).is_file() and not _WEIGHTS_PENDING.get():
        raise ValueError(f"model.backbone_weights={path} is not a file; give torchvision's ImageNet ResNet weights "
                         "(.pth) or a checkpoint of scripts/train.py task=classification")


def load_backbone_weights(body: nn.Module, path: str | Path) -> str:
    """Load ImageNet weights into a task's ResNet body (detection's ``backbone.body``, segmentation's ``body``):
    torchvision's ``resnet50-*.pth`` state dict or a checkpoint of ``scripts/train.py task=classification`` (same
    depth and ``downsampler`` as the body). The classifier (``fc.*``) is dropped; the DCNv2 offset / modulation
    predictors, which an ImageNet ResNet has not, keep their zero initialisation (the DCNv2 paper's recipe); any
    other key that does not match is an error naming the keys. Dilation (PSPNet's layer3 / layer4) changes no
    parameter, so a plain ResNet's weights load into a dilated one.

    Returns the SHA-256 of the file's weights by content (``content_digest`` of the state dict, classifier included),
    which the run records (``Task.loaded_weights``); a run also records that digest of its own final weights
    (``weights_sha256``), so a table can tell which training of a pretraining config its rows started from: two
    machines can train one config to different weights."""
    path = backbone_weights_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone_weights={path} does not exist")
    state = load_checkpoint(path)
    state = state.get("model", state)
    digest = content_digest(state)
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = body.load_state_dict(state, strict=False)
    predictors = {f"{name}.offset_mask.{param}" for name, module in body.named_modules()
                  if isinstance(module, ModulatedDeformConv2d) for param in ("weight", "bias")}
    missing = [key for key in missing if key not in predictors]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the backbone (same depth and downsampler?): "
                         f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                         f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}")
    return digest
