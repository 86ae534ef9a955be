"""DCNv2 (``tasks.common.deformable``) against plain convolutions: at its zero initialisation it is the convolution
times sigmoid(0) = 0.5, a whole-pixel offset is the convolution of the shifted image, gradients reach the offset /
modulation predictor; and ``make_deformable`` puts it where ResNet-DCNv2 has it (behind a downsampler, stride 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import deform_conv2d

from carafe import CARAFEDownPack
from tasks.common.deformable import ModulatedDeformConv2d
from tasks.common.resnet import build_resnet, make_deformable

DCNV2_INITIAL_MODULATION = 0.5  # the DCNv2 paper: "the initial values of dp_k and dm_k are 0 and 0.5"


def test_torchvision_deform_conv_with_zero_offsets_and_unit_mask_is_a_convolution() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, generator=gen)
    weight = torch.randn(4, 5, 3, 3, dtype=torch.float64, generator=gen)
    offset = torch.zeros(2, 18, 5, 6, dtype=torch.float64)
    mask = torch.ones(2, 9, 5, 6, dtype=torch.float64)
    out = deform_conv2d(x, offset, weight, stride=(2, 2), padding=(1, 1), mask=mask)
    torch.testing.assert_close(out, F.conv2d(x, weight, stride=2, padding=1))


@pytest.mark.parametrize("stride,bias", [(1, False), (2, True)])
def test_at_initialisation_it_is_the_convolution_times_the_dcnv2_modulation(stride: int, bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=stride, padding=1, bias=bias).double()
    dcn = ModulatedDeformConv2d.from_conv(conv)
    x = torch.randn(2, 6, 10, 7, dtype=torch.float64)
    expected = DCNV2_INITIAL_MODULATION * F.conv2d(x, conv.weight, None, stride, 1)
    if bias:
        expected = expected + conv.bias.view(1, -1, 1, 1)  # the bias is added after the modulated sum
    torch.testing.assert_close(dcn(x), expected)
    assert torch.equal(dcn.weight, conv.weight) and dcn.weight is not conv.weight


def test_a_whole_pixel_offset_is_the_convolution_of_the_shifted_image() -> None:
    """Every tap moved by dx = +1 samples x one column to the right; outside the image it reads zero."""
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        dcn.offset_mask.bias[1:18:2] = 1.0  # channels 2t + 1: tap t's dx
    x = torch.randn(1, 3, 6, 8, dtype=torch.float64)
    padded = F.pad(x, (1, 2, 1, 1))[..., 1:]  # column j of this is input column j (j = -1 .. W), as the taps read
    expected = DCNV2_INITIAL_MODULATION * F.conv2d(padded, dcn.weight)
    torch.testing.assert_close(dcn(x), expected)


def test_gradients_reach_the_offsets_and_the_modulation() -> None:
    torch.manual_seed(0)
    dcn = ModulatedDeformConv2d(4, 4, 3, stride=2, padding=1)
    x = torch.randn(2, 4, 9, 9, requires_grad=True)
    dcn(x).square().sum().backward()
    taps = 9
    grad = dcn.offset_mask.weight.grad
    assert grad[:2 * taps].abs().sum() > 0, "no gradient to the offset predictor"
    assert grad[2 * taps:].abs().sum() > 0, "no gradient to the modulation predictor"
    assert dcn.weight.grad.abs().sum() > 0 and x.grad.abs().sum() > 0


def test_only_square_ungrouped_convolutions_convert() -> None:
    with pytest.raises(ValueError, match="square, ungrouped"):
        ModulatedDeformConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2, padding=1))
    with pytest.raises(ValueError, match="kernel_size"):
        ModulatedDeformConv2d(4, 4, 0)


def test_resnet_dcnv2_stages_and_carafe_downsampling_before_a_stride_1_dcn() -> None:
    plain = build_resnet(50, num_classes=10, deformable_stages=("layer2", "layer3", "layer4"))
    assert sum(isinstance(m, ModulatedDeformConv2d) for m in plain.modules()) == 4 + 6 + 3
    assert isinstance(plain.layer1[0].conv2, nn.Conv2d)
    assert plain.layer2[0].conv2.stride == 2  # DCNv2 strides where the plain ResNet does
    carafe = build_resnet(50, num_classes=10, downsampler="carafe", deformable_stages=("layer2", "layer3", "layer4"))
    for stage in (carafe.layer2, carafe.layer3, carafe.layer4):
        down, dcn = stage[0].conv2
        assert isinstance(down, CARAFEDownPack) and isinstance(dcn, ModulatedDeformConv2d) and dcn.stride == 1
    x = torch.randn(1, 3, 64, 64)
    assert carafe(x).shape == plain(x).shape == (1, 10)
    with pytest.raises(ValueError, match="layer5"):
        make_deformable(plain, ["layer5"])
