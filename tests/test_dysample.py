"""DySample in the zoo: shapes for every style, scope, scale and group count; a brute-force float64 oracle written
from the paper's definition (loops over output pixels, bilinear sampling clamped to the border); bilinear
interpolation at zero offsets; gradcheck; an empty batch; its FLOPs against a count of the aten operations it runs
and against hand arithmetic."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from carafe import build_upsampler
from carafe.costs import count_flops, flops_per_pixel, num_params
from carafe.upsamplers import DySampleUpsample

STYLES_AND_SCOPES = list(itertools.product(("lp", "pl"), (False, True)))
IDS = [f"{style}-{'dynamic' if dynamic else 'static'}" for style, dynamic in STYLES_AND_SCOPES]


def _randomised(module: DySampleUpsample, std: float = 0.5) -> DySampleUpsample:
    """Weights large enough for offsets of about a pixel, so sampling moves and clamps at the border."""
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(std * torch.randn_like(p))
    return module.double()


def brute_force(module: DySampleUpsample, x: torch.Tensor) -> torch.Tensor:
    """DySample by its definition, one output pixel and group at a time, in Python floats."""
    n, c, h, w = x.shape
    s, g, style = module.scale_factor, module.groups, module.style
    weight = module.offset.weight[:, :, 0, 0].tolist()
    bias = module.offset.bias.tolist()
    scope = module.scope.weight[:, :, 0, 0].tolist() if module.scope is not None else None
    xs = x.tolist()
    out = torch.zeros(n, c, s * h, s * w, dtype=torch.float64)
    for b, big_y, big_x in itertools.product(range(n), range(s * h), range(s * w)):
        i, sub_row = divmod(big_y, s)
        j, sub_col = divmod(big_x, s)
        if style == "lp":  # the input pixel's features; offset channel (axis, group, sub-row, sub-col)
            features = [xs[b][ch][i][j] for ch in range(c)]
        else:  # the pixel-shuffled input at this output pixel; offset channel (axis, group)
            features = [xs[b][ch * s * s + sub_row * s + sub_col][i][j] for ch in range(c // (s * s))]
        for group in range(g):
            position = []
            for axis, own in ((0, big_x), (1, big_y)):
                ch = (axis * g + group) if style == "pl" else (((axis * g + group) * s + sub_row) * s + sub_col)
                raw = sum(wt * f for wt, f in zip(weight[ch], features)) + bias[ch]
                if scope is None:
                    offset = 0.25 * raw
                else:
                    offset = raw * 0.5 / (1 + math.exp(-sum(wt * f for wt, f in zip(scope[ch], features))))
                position.append((own + 0.5) / s - 0.5 + offset)
            px = min(max(position[0], 0.0), w - 1.0)
            py = min(max(position[1], 0.0), h - 1.0)
            x0, y0 = math.floor(px), math.floor(py)
            x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
            fx, fy = px - x0, py - y0
            for ch in range(group * c // g, (group + 1) * c // g):
                plane = xs[b][ch]
                out[b, ch, big_y, big_x] = ((1 - fy) * ((1 - fx) * plane[y0][x0] + fx * plane[y0][x1])
                                            + fy * ((1 - fx) * plane[y1][x0] + fx * plane[y1][x1]))
    return out


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
@pytest.mark.parametrize("scale,groups,h,w", [(2, 4, 4, 6), (2, 1, 5, 3), (3, 2, 3, 4), (3, 4, 5, 5)])
def test_shapes_forward_backward(style: str, dynamic: bool, scale: int, groups: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    module = build_upsampler("dysample", 36, scale, style=style, groups=groups, dynamic_scope=dynamic)
    x = torch.randn(2, 36, h, w, requires_grad=True)
    y = module(x)
    assert y.shape == (2, 36, scale * h, scale * w)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in module.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
@pytest.mark.parametrize("scale,channels,groups", [(2, 8, 2), (3, 18, 3)])
def test_matches_the_brute_force_definition(style: str, dynamic: bool, scale: int, channels: int,
                                            groups: int) -> None:
    module = _randomised(DySampleUpsample(channels, scale, style=style, groups=groups, dynamic_scope=dynamic))
    torch.manual_seed(4)
    x = torch.randn(2, channels, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), brute_force(module, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
@pytest.mark.parametrize("scale", [2, 3])
def test_zero_offsets_are_bilinear_interpolation(style: str, dynamic: bool, scale: int) -> None:
    module = build_upsampler("dysample", 36, scale, style=style, groups=2, dynamic_scope=dynamic, init_std=0.0)
    x = torch.randn(2, 36, 5, 4, dtype=torch.float64)
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    torch.testing.assert_close(module.double()(x), expected, rtol=0, atol=1e-12)


def test_default_initialisation_is_the_authors_and_reset_parameters_restores_it() -> None:
    torch.manual_seed(0)
    module = build_upsampler("dysample", 256, 2, dynamic_scope=True)
    for _ in range(2):
        assert module.offset.weight.std().item() == pytest.approx(0.001, rel=0.05)
        assert not module.offset.bias.any() and not module.scope.weight.any() and module.scope.bias is None
        _randomised(module).float()
        module.reset_parameters()


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
def test_gradcheck(style: str, dynamic: bool) -> None:
    module = _randomised(DySampleUpsample(4, 2, style=style, groups=2, dynamic_scope=dynamic), std=0.3)
    torch.manual_seed(5)
    x = torch.randn(1, 4, 3, 2, dtype=torch.float64, requires_grad=True)
    names = [name for name, _ in module.named_parameters()]

    def run(inp: torch.Tensor, *weights: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(module, dict(zip(names, weights)), (inp,))

    weights = tuple(p.detach().requires_grad_() for p in module.parameters())
    assert torch.autograd.gradcheck(run, (x, *weights), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
def test_empty_batch(style: str, dynamic: bool) -> None:
    module = build_upsampler("dysample", 8, 2, style=style, groups=2, dynamic_scope=dynamic)
    x = torch.randn(0, 8, 3, 5, requires_grad=True)
    y = module(x)
    assert y.shape == (0, 8, 6, 10)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is not None and not p.grad.any() for p in module.parameters())


@pytest.mark.parametrize("style,dynamic", STYLES_AND_SCOPES, ids=IDS)
@pytest.mark.parametrize("scale,groups", [(2, 4), (3, 2)])
def test_flops_equal_the_counted_aten_operations(style: str, dynamic: bool, scale: int, groups: int) -> None:
    module = build_upsampler("dysample", 36, scale, style=style, groups=groups, dynamic_scope=dynamic)
    x = torch.randn(2, 36, 5, 3)
    counted = count_flops(module, x)
    with FlopCounterMode(display=False) as torch_counter, torch.no_grad():
        module(x)
    assert counted.total == flops_per_pixel(module) * 2 * 5 * 3, counted.by_op
    assert counted.conv_macs2 == torch_counter.get_total_flops()


def test_costs_at_c256_by_hand() -> None:
    """C = 256, sigma = 2, groups 4: 32 offsets per input pixel; bilinear sampling 8 * 4 * 256 = 8,192."""
    expected = {
        # 1x1 conv 256 -> 32 (+ bias) on the input; 32 additions to the base grid; sampling
        ("lp", False): (2 * 257 * 32 + 32 + 8_192, 256 * 32 + 32),
        # + the bias-free scope conv 256 -> 32 and 32 products
        ("lp", True): (2 * 257 * 32 + 2 * 256 * 32 + 32 + 32 + 8_192, 2 * 256 * 32 + 32),
        # 1x1 conv 64 -> 8 (+ bias) at each of the 4 output pixels
        ("pl", False): (4 * 2 * 65 * 8 + 32 + 8_192, 64 * 8 + 8),
        ("pl", True): (4 * (2 * 65 * 8 + 2 * 64 * 8) + 32 + 32 + 8_192, 2 * 64 * 8 + 8),
    }
    for (style, dynamic), (flops, params) in expected.items():
        with torch.device("meta"):
            module = build_upsampler("dysample", 256, 2, style=style, dynamic_scope=dynamic)
        assert (flops_per_pixel(module), num_params(module)) == (flops, params), (style, dynamic)
    assert expected[("lp", False)] == (24_672, 8_224) and expected[("pl", False)] == (12_384, 520)


def test_bad_arguments_raise() -> None:
    with pytest.raises(ValueError, match="style"):
        build_upsampler("dysample", 8, 2, style="ps")
    with pytest.raises(ValueError, match="groups=3 must divide channels=8"):
        build_upsampler("dysample", 8, 2, groups=3)
    with pytest.raises(ValueError, match="multiple of scale_factor"):
        build_upsampler("dysample", 8, 3, style="pl", groups=2)
    with pytest.raises(ValueError, match="init_std"):
        build_upsampler("dysample", 8, 2, init_std=-1.0)
    with pytest.raises(TypeError, match="dynamic_scope"):
        build_upsampler("dysample", 8, 2, dynamic_scope="yes")
    with pytest.raises(TypeError, match="groups"):
        build_upsampler("dysample", 8, 2, groups=2.0)
