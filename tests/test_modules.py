"""CARAFEPack / CARAFEDownPack: shapes, parameter counts, normalisers, initialisation, argument checks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carafe import CARAFEDownPack, CARAFEPack, carafe, carafe_down, normalize_kernels, use_backend
from carafe.modules import pixel_shuffle


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_carafe_pack_parameter_count_at_paper_defaults():
    # ICCV Table 2: 74k parameters at C = 256; compressor 256*64 + 64, encoder 64*(25*4)*9 + 100.
    assert n_params(CARAFEPack(256, 2)) == 74_148


@pytest.mark.parametrize("cm,kenc,kup,expected", [
    (16, 3, 5, 256 * 16 + 16 + 16 * 100 * 9 + 100),
    (None, 3, 5, 256 * 100 * 9 + 100),
    (64, 5, 7, 256 * 64 + 64 + 64 * 196 * 25 + 196),
])
def test_carafe_pack_parameter_count_formula(cm, kenc, kup, expected):
    module = CARAFEPack(256, 2, up_kernel=kup, encoder_kernel=kenc, compressed_channels=cm)
    assert n_params(module) == expected


def test_down_pack_parameter_count():
    # Compressor 1x1 conv (+ bias) and BN (weight, bias), encoder k_enc = 3 to 25 kernels, no pixel shuffle.
    module = CARAFEDownPack(256)
    assert n_params(module) == (256 * 16 + 16) + 2 * 16 + (16 * 25 * 9 + 25)
    assert isinstance(module.channel_compressor[1], nn.BatchNorm2d)
    assert isinstance(module.channel_compressor[2], nn.ReLU)


@pytest.mark.parametrize("scale,h,w", [(2, 5, 7), (3, 4, 4), (1, 3, 2)])
@pytest.mark.parametrize("group", [1, 2])
def test_carafe_pack_shapes(scale, h, w, group):
    module = CARAFEPack(8, scale, up_kernel=3, up_group=group, compressed_channels=4)
    x = torch.randn(2, 8, h, w)
    assert module(x).shape == (2, 8, h * scale, w * scale)
    assert module.predict_kernels(x).shape == (2, group * 9, h * scale, w * scale)


@pytest.mark.parametrize("scale,h,w", [(2, 5, 7), (2, 8, 8), (3, 7, 4), (4, 1, 9)])
def test_down_pack_shapes(scale, h, w):
    module = CARAFEDownPack(8, scale, compressed_channels=4)
    out = module(torch.randn(2, 8, h, w))
    assert out.shape == (2, 8, math.ceil(h / scale), math.ceil(w / scale))


def test_modules_run_on_an_empty_batch():
    for module in (CARAFEPack(8, 2, compressed_channels=4), CARAFEDownPack(8).eval()):
        x = torch.randn(0, 8, 5, 5, requires_grad=True)
        out = module(x)
        out.sum().backward()
        assert out.shape[0] == 0


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid_normalized"])
def test_normalised_kernels_sum_to_one(normalizer):
    logits = torch.randn(2, 3 * 25, 4, 6, dtype=torch.float64) * 5
    kernels = normalize_kernels(logits, 5, normalizer).view(2, 3, 25, 4, 6)
    torch.testing.assert_close(kernels.sum(2), torch.ones(2, 3, 4, 6, dtype=torch.float64))
    assert (kernels > 0).all()


def test_sigmoid_normaliser_is_elementwise_and_unnormalised():
    logits = torch.randn(1, 9, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(normalize_kernels(logits, 3, "sigmoid"), 1 / (1 + torch.exp(-logits)))


def test_softmax_normaliser_by_hand():
    logits = torch.tensor([0.0, math.log(2.0), math.log(3.0), math.log(4.0)], dtype=torch.float64)
    logits = torch.cat([logits, logits + 7, torch.zeros(1, dtype=torch.float64)]).repeat(2)
    # Two groups of k = 3 (9 taps each): tap weights are proportional to exp(logit).
    kernels = normalize_kernels(logits.view(1, 18, 1, 1), 3, "softmax").view(2, 9)
    expected = torch.tensor([1, 2, 3, 4, math.exp(7), 2 * math.exp(7), 3 * math.exp(7), 4 * math.exp(7), 1],
                            dtype=torch.float64)
    torch.testing.assert_close(kernels, (expected / expected.sum()).expand(2, 9))


@pytest.mark.parametrize("module_cls", [CARAFEPack, CARAFEDownPack])
def test_forward_is_prediction_plus_reassembly(module_cls):
    module = module_cls(6, 2, compressed_channels=3).double().eval()
    x = torch.randn(1, 6, 5, 4, dtype=torch.float64)
    kernels = module.predict_kernels(x)
    op = carafe if module_cls is CARAFEPack else carafe_down
    torch.testing.assert_close(module(x), op(x, kernels, 5, 1, 2))


def test_pixel_shuffle_order_matches_mmcv():
    # The encoder's channel (i * sigma^2 + sub-position) holds tap i of the kernel of that sub-pixel.
    module = CARAFEPack(4, 2, up_kernel=1, compressed_channels=None, normalizer="sigmoid")
    with torch.no_grad():
        module.content_encoder.weight.zero_()
        module.content_encoder.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    kernels = module.predict_kernels(torch.zeros(1, 4, 1, 1))
    torch.testing.assert_close(kernels[0, 0], torch.sigmoid(torch.tensor([[1.0, 2.0], [3.0, 4.0]])))


def test_pixel_shuffle_matches_torch():
    x = torch.randn(2, 3 * 9, 4, 5)
    torch.testing.assert_close(pixel_shuffle(x, 3), F.pixel_shuffle(x, 3), rtol=0, atol=0)


def test_initialisation_follows_the_papers_code():
    torch.manual_seed(0)
    module = CARAFEPack(256, 2)
    encoder = module.content_encoder.weight
    assert abs(encoder.std().item() - 0.001) < 1e-4 and abs(encoder.mean().item()) < 1e-4
    assert (module.content_encoder.bias == 0).all() and (module.channel_compressor.bias == 0).all()
    # Xavier-uniform bound for a 1x1 conv 256 -> 64: sqrt(6 / (256 + 64)).
    bound = math.sqrt(6 / (256 + 64))
    weight = module.channel_compressor.weight
    assert weight.abs().max() <= bound and weight.abs().max() > 0.95 * bound
    # With near-zero logits the initial kernels are almost uniform: the module starts close to an average filter.
    kernels = module.predict_kernels(torch.randn(1, 256, 4, 4))
    torch.testing.assert_close(kernels, torch.full_like(kernels, 1 / 25), atol=1e-2, rtol=0)


def test_modules_use_the_fast_backend_and_the_reference_identically():
    torch.manual_seed(0)
    for module in (CARAFEPack(16, 2, up_group=2, compressed_channels=8), CARAFEDownPack(16, 2).eval()):
        x = torch.randn(2, 16, 7, 6)
        with use_backend("reference"):
            expected = module(x)
        with use_backend("cpu"):
            torch.testing.assert_close(module(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs,message", [
    (dict(up_kernel=4), "kernel_size must be odd, got 4"),
    (dict(encoder_kernel=2), "encoder_kernel must be odd, got 2"),
    (dict(compressed_channels=0), "compressed_channels must be >= 1, got 0"),
    (dict(normalizer="relu"), "unknown kernel normalizer 'relu'"),
    (dict(up_group=3), r"channels \(8\) must be divisible by the group size \(3\)"),
    (dict(scale_factor=0), "scale_factor must be >= 1, got 0"),
])
def test_bad_module_arguments_are_named(kwargs, message):
    args = {"channels": 8, "scale_factor": 2, **kwargs}
    with pytest.raises(ValueError, match=message):
        CARAFEPack(**args)


def test_extra_repr_lists_the_settings():
    text = repr(CARAFEPack(256, 2, compressed_channels=None, normalizer="sigmoid"))
    assert "compressed_channels=none" in text and "normalizer=sigmoid" in text and "kernel_size=5" in text


def test_downsampler_trains():
    # A few SGD steps reduce a loss through both the kernel prediction and the reassembly (gradients flow end to end).
    torch.manual_seed(0)
    module = CARAFEDownPack(4, 2, compressed_channels=4)
    x = torch.randn(4, 4, 8, 8)
    target = F.avg_pool2d(x, 2) * 2
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(module(x), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert module.content_encoder.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("normalizer", ["softmax", "sigmoid"])
def test_modules_run_under_cpu_autocast(normalizer):
    # Autocast gives the encoder bfloat16 outputs while softmax returns float32: the reassembly must still get
    # features and kernels of one dtype.
    for module in (CARAFEPack(8, 2, compressed_channels=4, normalizer=normalizer),
                   CARAFEDownPack(8, 2, normalizer=normalizer)):
        x = torch.randn(1, 8, 5, 5, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        out.float().sum().backward()
        assert x.grad is not None and torch.isfinite(x.grad).all()
