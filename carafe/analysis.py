"""Looking inside CARAFE: the reassembly kernels a ``CARAFEPack`` applies, and where an output location's value
comes from on the input grid (ICCV 2019 Figure 5).

CARAFE (Wang et al., ICCV 2019, Sec. 3) computes each output location l' = (p, q) of the sigma-times larger map as
a weighted sum of the k_up x k_up input neighbourhood N(l, k_up) around l = (p // sigma, q // sigma):

    out[c, l'] = sum_{n in N(l, k_up)} W_{l'}[n] * x[c, n]                                          (Eq. 3)

so, as a linear map of x, reassembly has an adjoint that sends a weight map on the output grid back to the input
grid: each output location's weight is spread over its k_up x k_up input neighbourhood, in proportion to its kernel.
A one-hot weight map gives the input locations (and their weights) that one output unit reassembles; chained
through the top-down pathway of a feature pyramid it gives the "red units" of ICCV 2019 Figure 5 on every coarser
level, each weighted by the product of the kernels along every path to it, summed over the paths.

    kernels = reassembly_kernels(up, x)                          # Tensor[N, G * k^2, sigma * H, sigma * W]
    where = reassembly_adjoint(one_hot, kernels, up.up_kernel, up.scale_factor, up.up_group)   # [N, G, H, W]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

from carafe.modules import CARAFEPack
from carafe.ops import check_int, check_odd


def reassembly_kernels(module: CARAFEPack, x: Tensor) -> Tensor:
    """The normalised reassembly kernels ``module`` applies to ``x``: exactly the masks its forward passes to
    ``carafe`` (kernel prediction = compressor, content encoder, pixel shuffle, kernel normalizer; ICCV 2019 Sec. 3.2).

    Args:
        module: a ``CARAFEPack`` (the weights of a trained model, in eval mode for a figure).
        x: its input Tensor[N, C, H, W].

    Returns:
        Tensor[N, G * k_up^2, sigma * H, sigma * W], in ``x``'s dtype; channel ``g * k_up^2 + ky * k_up + kx`` is
        the weight of input ``(p // sigma + ky - k_up // 2, q // sigma + kx - k_up // 2)`` for output ``(p, q)`` of
        channel group ``g``. ``carafe(x, kernels, k_up, G, sigma)`` equals ``module(x)``.
    """
    if not isinstance(module, CARAFEPack):
        raise TypeError(f"module must be a carafe.CARAFEPack, got {type(module).__name__}")
    return module.predict_kernels(x).to(x.dtype)


def reassembly_adjoint(weights: Tensor, kernels: Tensor, kernel_size: int, scale_factor: int,
                       group_size: int = 1) -> Tensor:
    """The adjoint of CARAFE reassembly: a weight map on the output grid, taken back to the input grid.

    ``result[n, g, i, j] = sum over (p, q, ky, kx) with p // s + ky - r = i and q // s + kx - r = j of
    weights[n, g, p, q] * kernels[n, g * k^2 + ky * k + kx, p, q]`` (r = k // 2, s = sigma). Taps that fall
    outside the input are dropped, as the op's zero padding reads nothing there, so with softmax kernels the total
    weight is preserved except what falls off the border. For every features x of the input's shape and group g,
    ``sum(carafe(x, kernels)[:, group g channels] * weights[:, g]) == sum(x[:, group g channels] *
    result[:, g])`` (summed over the group's channels): the features' gradient of reassembly, per group.

    Args:
        weights: Tensor[N, G, sigma * H, sigma * W], or Tensor[N, 1, sigma * H, sigma * W] for the same map in
            every group (e.g. one-hot at the output locations of interest).
        kernels: Tensor[N, G * k^2, sigma * H, sigma * W] (``reassembly_kernels``).
        kernel_size: k_up (odd).
        scale_factor: sigma.
        group_size: G, the kernel groups.

    Returns:
        Tensor[N, G, H, W] on the input grid.
    """
    k = check_odd("kernel_size", kernel_size)
    s = check_int("scale_factor", scale_factor, 1)
    g = check_int("group_size", group_size, 1)
    if weights.dim() != 4 or kernels.dim() != 4:
        raise ValueError(f"weights and kernels must be 4-D (N, C, H, W), got shapes {tuple(weights.shape)} and "
                         f"{tuple(kernels.shape)}")
    n, taps_channels, out_h, out_w = kernels.shape
    if taps_channels != g * k * k:
        raise ValueError(f"kernels must have group_size * kernel_size**2 = {g * k * k} channels, got {taps_channels}")
    if out_h % s or out_w % s:
        raise ValueError(f"the kernels' grid {(out_h, out_w)} is not a multiple of scale_factor={s}")
    if weights.shape[0] != n or weights.shape[1] not in (1, g) or tuple(weights.shape[2:]) != (out_h, out_w):
        raise ValueError(f"weights must have shape ({n}, 1 or {g}, {out_h}, {out_w}) to match kernels of shape "
                         f"{tuple(kernels.shape)}; got {tuple(weights.shape)}")
    h, w = out_h // s, out_w // s
    # Every output location's weight times its kernel: the weight each tap sends to its input location.
    sent = weights[:, :, None] * kernels.view(n, g, k * k, out_h, out_w)                  # [N, G, k^2, sH, sW]
    # The s x s output locations that share an input centre (p // s, q // s) send their taps to the same places.
    by_centre = sent.view(n, g, k * k, h, s, w, s).sum(dim=(4, 6))                        # [N, G, k^2, H, W]
    # fold adds tap (ky, kx) of centre (i, j) at (i + ky - r, j + kx - r) and drops what lands in the padding.
    return F.fold(by_centre.reshape(n, g * k * k, h * w), (h, w), k, padding=k // 2).view(n, g, h, w)


def chained_reassembly_adjoint(weights: Tensor, steps: Sequence[tuple[Tensor, int, int, int]]) -> list[Tensor]:
    """Take a weight map down a chain of reassemblies, finest first (an FPN's top-down path read backwards).

    Step t reassembled level t + 1 into level t: ``steps[t] = (kernels, kernel_size, scale_factor, group_size)``
    with ``kernels`` Tensor[N, G * k^2, H_t', W_t'] on its output grid. The output grid may be larger than the
    weight map that arrives there (an FPN crops the upsampled map's bottom/right to its lateral's size,
    ``tasks.common.upsampling.crop_to``): the cropped-away locations carry no weight, so the map is zero-padded
    at the bottom/right first.

    Args:
        weights: Tensor[N, 1 or G, H_0, W_0] on the finest grid.
        steps: one entry per reassembly, finest first; every step must have the same group count G.

    Returns:
        The weight maps on levels 1, 2, ...: Tensor[N, G, H_t, W_t] each, the effective weight of every coarse
        location in the finest map's weighted sum (products of kernels along each path, summed over paths).
    """
    maps = []
    for index, (kernels, kernel_size, scale_factor, group_size) in enumerate(steps):
        out_h, out_w = kernels.shape[-2:]
        h, w = weights.shape[-2:]
        if h > out_h or w > out_w:
            raise ValueError(f"step {index}: the weight map {(h, w)} is larger than the kernels' grid "
                             f"{(out_h, out_w)}; steps must be ordered finest first")
        weights = F.pad(weights, (0, out_w - w, 0, out_h - h))
        weights = reassembly_adjoint(weights, kernels, kernel_size, scale_factor, group_size)
        maps.append(weights)
    return maps
