"""CARAFEPack / CARAFEDownPack: shapes, parameter counts, normalisers, initialisation, argument checks."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from carafe import (CARAFE, CARAFEDownPack, CARAFENaive, CARAFEPack, carafe, carafe_down, carafe_naive,
                    normalize_kernels, use_backend)
from carafe.modules import pixel_shuffle
from conftest import assert_matches_oracle, brute_force, reassembly_inputs


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
    (dict(up_kernel=4), "up_kernel must be odd, got 4"),
    (dict(encoder_kernel=2), "encoder_kernel must be odd, got 2"),
    (dict(compressed_channels=0), "compressed_channels must be >= 1, got 0"),
    (dict(normalizer="relu"), "unknown kernel normalizer 'relu'"),
    (dict(up_group=3), r"channels \(8\) must be divisible by up_group \(3\)"),
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


# --- the mmcv drop-in: CARAFE, CARAFENaive / carafe_naive, CARAFEPack's methods ----------------------------------
# mmcv's own CARAFE tests use kernel 5, group 4, scale 2 on features (2, 64, 3, 3) and masks (2, 100, 6, 6), forward
# and backward with an all-ones output gradient, and gradcheck in float64; here against the float64 loop oracle.

def brute_force_grads(x: np.ndarray, m: np.ndarray, grad: np.ndarray, k: int, groups: int, scale: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """d loss / d features and d loss / d masks of CARAFE upsampling for an output gradient ``grad``, as loops in
    float64: every tap that reads input (iy, ix) adds its weight times the output gradient there, and each tap's
    weight gets the sum over its group's channels of the input it reads times the output gradient."""
    n, c, h, w = x.shape
    out_h, out_w = m.shape[2:]
    per_group, r = c // groups, k // 2
    grad_x, grad_m = np.zeros_like(x), np.zeros_like(m)
    for b, p, q, ky, kx in itertools.product(range(n), range(out_h), range(out_w), range(k), range(k)):
        iy, ix = p // scale + ky - r, q // scale + kx - r
        if not (0 <= iy < h and 0 <= ix < w):
            continue
        for g in range(groups):
            channels = slice(g * per_group, (g + 1) * per_group)
            tap = g * k * k + ky * k + kx
            grad_x[b, channels, iy, ix] += m[b, tap, p, q] * grad[b, channels, p, q]
            grad_m[b, tap, p, q] += (x[b, channels, iy, ix] * grad[b, channels, p, q]).sum()
    return grad_x, grad_m


def mmcv_case(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    x, m, _ = reassembly_inputs(2, 64, 3, 3, 5, 4, 2, True, dtype=torch.float64, seed=3)
    return x.to(dtype), m.sigmoid().to(dtype)


@pytest.mark.parametrize("module_cls", [CARAFE, CARAFENaive])
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
def test_mmcv_carafe_modules_match_the_oracle(module_cls, channels_last):
    x, m = mmcv_case()
    if channels_last:
        x, m = x.to(memory_format=torch.channels_last), m.to(memory_format=torch.channels_last)
    x.requires_grad_(True)
    m.requires_grad_(True)
    out = module_cls(5, 4, 2)(x, m)
    out.backward(torch.ones_like(out))
    x64, m64 = x.detach().double().numpy(), m.detach().double().numpy()
    want = brute_force(x64, m64, 5, 4, 2, True)
    want_gx, want_gm = brute_force_grads(x64, m64, np.ones_like(want), 5, 4, 2)
    assert_matches_oracle(out, torch.from_numpy(want), torch.float32, "output")
    assert_matches_oracle(x.grad, torch.from_numpy(want_gx), torch.float32, "features' gradient")
    assert_matches_oracle(m.grad, torch.from_numpy(want_gm), torch.float32, "masks' gradient")


@pytest.mark.parametrize("module_cls", [CARAFE, CARAFENaive])
def test_mmcv_carafe_modules_pass_gradcheck(module_cls):
    x, m = mmcv_case(torch.float64)
    torch.autograd.gradcheck(module_cls(5, 4, 2), (x.requires_grad_(), m.requires_grad_()), atol=1e-8,
                             fast_mode=True)


def test_carafe_naive_runs_without_the_registered_operator():
    # The reference computation straight through autograd: no carafe:: operator appears in the graph.
    x, m = mmcv_case(torch.float64)
    out = carafe_naive(x.requires_grad_(), m, 5, 4, 2)
    assert "carafe" not in type(out.grad_fn).__name__.lower()
    with pytest.raises(ValueError, match=r"masks must have shape .* = \(2, 100, 6, 6\)"):
        carafe_naive(x, m[..., :5], 5, 4, 2)


def test_carafe_module_arguments_are_named():
    with pytest.raises(ValueError, match="kernel_size must be odd, got 4"):
        CARAFE(4, 1, 2)
    with pytest.raises(TypeError, match=r"scale_factor must be an integer, got 2.0 \(float\)"):
        CARAFENaive(5, 1, 2.0)


def test_carafe_pack_has_mmcvs_methods_and_state_dict_names():
    torch.manual_seed(0)
    module = CARAFEPack(16, 2, up_kernel=3, up_group=2, compressed_channels=8).double()
    # An mmcv-named state_dict (mmcv.ops.CARAFEPack's parameter names and shapes) loads strictly.
    state = {"channel_compressor.weight": torch.randn(8, 16, 1, 1), "channel_compressor.bias": torch.randn(8),
             "content_encoder.weight": torch.randn(2 * 9 * 4, 8, 3, 3) * 0.1, "content_encoder.bias": torch.randn(72)}
    module.load_state_dict(state, strict=True)
    x = torch.randn(2, 16, 4, 5, dtype=torch.float64)
    raw = F.conv2d(F.conv2d(x, state["channel_compressor.weight"].double(), state["channel_compressor.bias"].double()),
                   state["content_encoder.weight"].double(), state["content_encoder.bias"].double(), padding=1)
    # kernel_normalizer: torch's pixel shuffle, then a softmax over each group's k_up^2 taps.
    shuffled = F.pixel_shuffle(raw, 2)
    want_kernels = torch.softmax(shuffled.view(2, 2, 9, 8, 10), dim=2).view(2, 18, 8, 10)
    torch.testing.assert_close(module.kernel_normalizer(raw), want_kernels)
    want = brute_force(x.numpy(), want_kernels.numpy(), 3, 2, 2, True)
    torch.testing.assert_close(module.feature_reassemble(x, want_kernels), torch.from_numpy(want))
    torch.testing.assert_close(module(x), torch.from_numpy(want))
    # init_weights: mmcv's initialisation again (xavier-uniform convolutions, zero biases, encoder std 0.001).
    module.init_weights()
    assert (module.content_encoder.bias == 0).all() and (module.channel_compressor.bias == 0).all()
    assert module.content_encoder.weight.std().item() < 0.002


def test_settable_attributes_are_checked():
    module = CARAFEPack(8, 2, up_kernel=5, compressed_channels=4)
    module.up_group = 2
    module.up_kernel = 3
    assert (module.up_kernel, module.kernel_size, module.up_group, module.group_size) == (3, 3, 2, 2)
    with pytest.raises(ValueError, match="up_kernel must be odd, got 2"):
        module.up_kernel = 2
    down = CARAFEDownPack(8)
    down.down_kernel = 3
    assert down.kernel_size == 3
    with pytest.raises(ValueError, match="down_kernel must be odd, got 4"):
        CARAFEDownPack(8, down_kernel=4)
    with pytest.raises(ValueError, match="down_group must be >= 1, got 0"):
        down.down_group = 0


def test_output_size_crops_an_odd_level():
    torch.manual_seed(0)
    module = CARAFEPack(4, 2, up_kernel=3, compressed_channels=4).double()
    x = torch.randn(1, 4, 13, 7, dtype=torch.float64)
    kernels = module.predict_kernels(x)
    want = brute_force(x.numpy(), kernels.detach().numpy(), 3, 1, 2, True)[..., :25, :13]
    torch.testing.assert_close(module(x, output_size=(25, 13)), torch.from_numpy(want))
    assert module(x, output_size=torch.Size([26, 14])).shape == (1, 4, 26, 14)
    with pytest.raises(ValueError, match=r"H_out=24 is not a 2-fold upsampling of H=13: it must be in \(24, 26\]"):
        module(x, output_size=(24, 13))
    with pytest.raises(TypeError, match="output_size must be an int or a pair of ints"):
        module(x, output_size=(25.0, 13))


def test_mmengine_builds_the_modules_from_a_config():
    registry = pytest.importorskip("mmengine.registry", reason="mmengine is not installed (it is optional)")
    import carafe.mmengine  # noqa: F401 -- registers the modules

    module = registry.MODELS.build(dict(type="CARAFEPack", channels=8, scale_factor=2, compressed_channels=4))
    assert isinstance(module, CARAFEPack) and module(torch.randn(1, 8, 3, 3)).shape == (1, 8, 6, 6)
    assert isinstance(registry.MODELS.build(dict(type="carafe", channels=8, scale_factor=2)), CARAFEPack)
    down = registry.MODELS.build(dict(type="CARAFEDownPack", channels=8, down_kernel=3))
    assert isinstance(down, CARAFEDownPack) and down.down_kernel == 3
