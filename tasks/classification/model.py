"""The classifier of CARAFE++ Tables II and XII: a torchvision ResNet with its seven downsamplers swappable."""

from __future__ import annotations

from torchvision.models.resnet import ResNet

from tasks.common.resnet import build_resnet


def build_classifier(depth: int = 50, num_classes: int = 1000, downsampler: object = None,
                     zero_init_residual: bool = True) -> ResNet:
    """ResNet-``depth`` for ``num_classes`` classes, no pretrained weights; ``downsampler`` as in ``build_resnet``
    (None: torchvision's network, the "ResNet-50" row; ``"carafe"``: the "w/ CARAFE++" row)."""
    return build_resnet(depth, num_classes, downsampler, zero_init_residual=zero_init_residual)
