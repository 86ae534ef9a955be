"""carafe.analysis: the kernels a CARAFEPack applies and the adjoint of reassembly, against loops in float64."""

from __future__ import annotations

import pytest
import torch

from carafe import CARAFEPack, carafe, use_backend
from carafe.analysis import chained_reassembly_adjoint, reassembly_adjoint, reassembly_kernels


def kernels_by_loops(module: CARAFEPack, x: torch.Tensor) -> torch.Tensor:
    """ICCV 2019 Sec. 3.2 written out: the encoder predicts sigma^2 * G * k^2 logits per input location; output
    (p, q) takes sub-position (p % s, q % s) of input (p // s, q // s) and softmaxes over each group's k^2 taps."""
    s, k, g = module.scale_factor, module.up_kernel, module.up_group
    encoded = module.content_encoder(module.channel_compressor(x))  # [N, G k^2 s^2, H, W], channels (g, t, a, b)
    n, _, h, w = encoded.shape
    out = torch.zeros(n, g * k * k, s * h, s * w, dtype=x.dtype)
    for b in range(n):
        for p in range(s * h):
            for q in range(s * w):
                for group in range(g):
                    logits = torch.stack([encoded[b, ((group * k * k + t) * s + p % s) * s + q % s, p // s, q // s]
                                          for t in range(k * k)])
                    weights = torch.exp(logits - logits.max())
                    out[b, group * k * k:(group + 1) * k * k, p, q] = weights / weights.sum()
    return out


def adjoint_by_loops(weights: torch.Tensor, kernels: torch.Tensor, k: int, s: int, g: int) -> torch.Tensor:
    """Every output location's weight times each tap of its kernel, added at the tap's input location if inside."""
    n, _, out_h, out_w = kernels.shape
    h, w, r = out_h // s, out_w // s, k // 2
    out = torch.zeros(n, g, h, w, dtype=kernels.dtype)
    for b in range(n):
        for group in range(g):
            for p in range(out_h):
                for q in range(out_w):
                    for ky in range(k):
                        for kx in range(k):
                            i, j = p // s + ky - r, q // s + kx - r
                            if 0 <= i < h and 0 <= j < w:
                                out[b, group, i, j] += (weights[b, group if weights.shape[1] > 1 else 0, p, q]
                                                        * kernels[b, group * k * k + ky * k + kx, p, q])
    return out


@pytest.mark.parametrize("scale,kernel,groups", [(2, 3, 1), (2, 5, 2), (3, 3, 1)])
def test_kernels_are_what_the_module_applies(scale: int, kernel: int, groups: int) -> None:
    torch.manual_seed(0)
    module = CARAFEPack(4, scale, up_kernel=kernel, up_group=groups, compressed_channels=3).double()
    torch.nn.init.normal_(module.content_encoder.weight, std=0.5)  # far from uniform kernels
    x = torch.randn(2, 4, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        kernels = reassembly_kernels(module, x)
        assert kernels.shape == (2, groups * kernel * kernel, 3 * scale, 4 * scale)
        torch.testing.assert_close(kernels, kernels_by_loops(module, x))
        with use_backend("reference"):
            torch.testing.assert_close(carafe(x, kernels, kernel, groups, scale), module(x))


@pytest.mark.parametrize("scale,kernel,groups,weight_groups", [(2, 3, 1, 1), (2, 5, 2, 2), (2, 3, 2, 1),
                                                               (3, 5, 1, 1)])
def test_adjoint_matches_loops_and_is_the_transpose_of_reassembly(scale: int, kernel: int, groups: int,
                                                                   weight_groups: int) -> None:
    torch.manual_seed(1)
    h, w, channels_per_group = 3, 4, 2
    kernels = torch.rand(2, groups * kernel * kernel, h * scale, w * scale, dtype=torch.float64)
    weights = torch.randn(2, weight_groups, h * scale, w * scale, dtype=torch.float64)
    result = reassembly_adjoint(weights, kernels, kernel, scale, groups)
    assert result.shape == (2, groups, h, w)
    torch.testing.assert_close(result, adjoint_by_loops(weights, kernels, kernel, scale, groups))
    # <carafe(x), weights> = <x, adjoint(weights)>, group by group, for any x (the reference op's zero padding).
    x = torch.randn(2, groups * channels_per_group, h, w, dtype=torch.float64)
    with use_backend("reference"):
        out = carafe(x, kernels, kernel, groups, scale).view(2, groups, channels_per_group, h * scale, w * scale)
    spread = weights.expand(2, groups, h * scale, w * scale)
    lhs = (out * spread[:, :, None]).sum(dim=(0, 2, 3, 4))
    rhs = (x.view(2, groups, channels_per_group, h, w) * result[:, :, None]).sum(dim=(0, 2, 3, 4))
    torch.testing.assert_close(lhs, rhs)


def test_one_hot_output_location_by_hand() -> None:
    # k = 3, sigma = 2, a 2 x 2 input: output (1, 2) is centred on input (0, 1); its taps in row -1 fall outside.
    kernels = torch.arange(1, 10, dtype=torch.float64).view(1, 9, 1, 1).expand(1, 9, 4, 4).contiguous()
    one_hot = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    one_hot[0, 0, 1, 2] = 1.0
    expected = torch.tensor([[4.0, 5.0], [7.0, 8.0]], dtype=torch.float64)  # taps (ky, kx) = (1..2, 0..1)
    torch.testing.assert_close(reassembly_adjoint(one_hot, kernels, 3, 2)[0, 0], expected)


def test_softmax_kernels_keep_an_interior_units_weight() -> None:
    torch.manual_seed(2)
    kernels = torch.softmax(torch.randn(1, 25, 16, 16, dtype=torch.float64), dim=1)
    one_hot = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    one_hot[0, 0, 8, 9] = 1.0
    spread = reassembly_adjoint(one_hot, kernels, 5, 2)
    torch.testing.assert_close(spread.sum(), torch.tensor(1.0, dtype=torch.float64))
    assert (spread[0, 0, 2:7, 2:7] > 0).all() and spread[0, 0].count_nonzero() == 25  # the 5 x 5 around (4, 4)


def test_chain_pads_a_cropped_grid_and_multiplies_along_paths() -> None:
    torch.manual_seed(3)
    # Level 0 is 5 x 6; level 1 (3 x 3) upsampled is 6 x 6 and cropped to 5 x 6; level 2 (2 x 2) -> 4 x 4 -> 3 x 3.
    k0 = torch.rand(1, 9, 6, 6, dtype=torch.float64)
    k1 = torch.rand(1, 9, 4, 4, dtype=torch.float64)
    weights = torch.rand(1, 1, 5, 6, dtype=torch.float64)
    level1, level2 = chained_reassembly_adjoint(weights, [(k0, 3, 2, 1), (k1, 3, 2, 1)])
    padded = torch.zeros(1, 1, 6, 6, dtype=torch.float64)
    padded[:, :, :5] = weights
    expected1 = adjoint_by_loops(padded, k0, 3, 2, 1)
    torch.testing.assert_close(level1, expected1)
    padded1 = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    padded1[:, :, :3, :3] = expected1
    torch.testing.assert_close(level2, adjoint_by_loops(padded1, k1, 3, 2, 1))
    with pytest.raises(ValueError, match="finest first"):
        chained_reassembly_adjoint(weights, [(k1, 3, 2, 1)])


def test_bad_arguments_are_named() -> None:
    kernels = torch.rand(1, 9, 4, 4)
    with pytest.raises(ValueError, match="group_size \\* kernel_size\\*\\*2 = 25"):
        reassembly_adjoint(torch.rand(1, 1, 4, 4), kernels, 5, 2)
    with pytest.raises(ValueError, match="weights must have shape \\(1, 1 or 1, 4, 4\\)"):
        reassembly_adjoint(torch.rand(1, 1, 2, 2), kernels, 3, 2)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        reassembly_adjoint(torch.rand(1, 1, 4, 4), kernels, 2, 2)
    with pytest.raises(TypeError, match="CARAFEPack, got Upsample"):
        reassembly_kernels(torch.nn.Upsample(scale_factor=2), torch.rand(1, 4, 2, 2))
