"""The kernel prediction module of the papers plus reassembly: ``CARAFEPack`` (up) and ``CARAFEDownPack`` (down).

Kernel prediction = channel compressor (1x1 conv, C -> C_m; optional) -> content encoder (k_enc x k_enc conv to
G * k_up^2 kernels per output location) -> kernel normalizer over each group's k_up^2 taps. For upsampling the
encoder predicts sigma^2 kernels per input pixel, rearranged by pixel shuffle; for downsampling it has stride sigma.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carafe.backends import reference
from carafe.ops import carafe, carafe_down, check_inputs, check_int, check_odd

NORMALIZERS = ("softmax", "sigmoid", "sigmoid_normalized")

# torch.fx.symbolic_trace records the reassembly as one call (a leaf) instead of tracing into its input checks.
torch.fx.wrap("carafe")
torch.fx.wrap("carafe_down")
torch.fx.wrap("carafe_naive")
torch.fx.wrap("crop_to")


def normalize_kernels(logits: Tensor, kernel_size: int, normalizer: str = "softmax") -> Tensor:
    """Normalise raw kernels Tensor[N, G * k^2, H, W] over the k^2 taps of each group.

    ``softmax`` and ``sigmoid_normalized`` (sigmoid, then divided by the taps' sum) give kernels that sum to 1;
    ``sigmoid`` only squashes each weight into (0, 1) (Table 10 of the ICCV paper).
    """
    n, channels, h, w = logits.shape
    taps = kernel_size * kernel_size
    grouped = logits.view(n, channels // taps, taps, h, w)
    if normalizer == "softmax":
        kernels = F.softmax(grouped, dim=2)
    elif normalizer == "sigmoid":
        kernels = torch.sigmoid(grouped)
    elif normalizer == "sigmoid_normalized":
        kernels = torch.sigmoid(grouped)
        kernels = kernels / kernels.sum(dim=2, keepdim=True)
    else:
        raise ValueError(f"unknown kernel normalizer {normalizer!r}; choose one of {', '.join(NORMALIZERS)}")
    return kernels.view(n, channels, h, w)


def pixel_shuffle(x: Tensor, scale_factor: int) -> Tensor:
    """``F.pixel_shuffle`` spelled out: Tensor[N, C * s^2, H, W] -> Tensor[N, C, s * H, s * W].

    Written with view/permute because ``F.pixel_shuffle``'s backward returns a wrongly shaped gradient for an empty
    batch (seen with torch 2.15), and a mask head with no RoIs must still train.
    """
    n, channels, h, w = x.shape
    s = scale_factor
    x = x.reshape(n, channels // (s * s), s, s, h, w).permute(0, 1, 4, 2, 5, 3)
    return x.reshape(n, channels // (s * s), h * s, w * s)


class _KernelPrediction(nn.Module):
    """Shared settings, validation and initialisation of the up and down modules."""

    keeps_own_init: ClassVar[bool] = True  # the papers' initialisation; a host must not re-initialise it

    def __init__(self, channels: int, scale_factor: int, kernel_size: int, group_size: int, encoder_kernel: int,
                 encoder_dilation: int, compressed_channels: int | None, normalizer: str,
                 kernels_per_location: int, encoder_stride: int, compressor_norm: bool,
                 names: tuple[str, str] = ("kernel_size", "group_size")) -> None:
        super().__init__()
        kernel_name, group_name = names  # the caller's argument names, for the error messages
        self.channels = check_int("channels", channels, 1)
        self.scale_factor = check_int("scale_factor", scale_factor, 1)
        self.kernel_size = check_odd(kernel_name, kernel_size)
        self.group_size = check_int(group_name, group_size, 1)
        if channels % group_size != 0:
            raise ValueError(f"channels ({channels}) must be divisible by {group_name} ({group_size})")
        self.encoder_kernel = check_odd("encoder_kernel", encoder_kernel)
        self.encoder_dilation = check_int("encoder_dilation", encoder_dilation, 1)
        if compressed_channels is not None:
            compressed_channels = check_int("compressed_channels", compressed_channels, 1)
        self.compressed_channels = compressed_channels
        if normalizer not in NORMALIZERS:
            raise ValueError(f"unknown kernel normalizer {normalizer!r}; choose one of {', '.join(NORMALIZERS)}")
        self.normalizer = normalizer

        if compressed_channels is None:
            self.channel_compressor = nn.Identity()
            encoder_in = channels
        else:
            conv = nn.Conv2d(channels, compressed_channels, 1)
            self.channel_compressor = (nn.Sequential(conv, nn.BatchNorm2d(compressed_channels), nn.ReLU(inplace=True))
                                       if compressor_norm else conv)
            encoder_in = compressed_channels
        self.content_encoder = nn.Conv2d(
            encoder_in, kernels_per_location * group_size * kernel_size * kernel_size, encoder_kernel,
            stride=encoder_stride, padding=(encoder_kernel - 1) * encoder_dilation // 2, dilation=encoder_dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """As the papers' code: xavier-uniform convolutions with zero bias, then the encoder normal(std=0.001)."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()
        nn.init.normal_(self.content_encoder.weight, std=0.001)
        nn.init.zeros_(self.content_encoder.bias)

    def init_weights(self) -> None:
        """``mmcv.ops.CARAFEPack.init_weights``'s name for ``reset_parameters`` (the same initialisation)."""
        self.reset_parameters()

    def extra_repr(self) -> str:
        compressor = "none" if self.compressed_channels is None else self.compressed_channels
        return (f"channels={self.channels}, scale_factor={self.scale_factor}, kernel_size={self.kernel_size}, "
                f"group_size={self.group_size}, encoder_kernel={self.encoder_kernel}, "
                f"encoder_dilation={self.encoder_dilation}, compressed_channels={compressor}, "
                f"normalizer={self.normalizer}")


class CARAFEPack(_KernelPrediction):
    """CARAFE upsampling with its kernel prediction module; a drop-in for ``mmcv.ops.CARAFEPack``.

    Args:
        channels: C, the input (and output) channels.
        scale_factor: sigma, the integer upsampling ratio.
        up_kernel: k_up, the odd reassembly kernel size.
        up_group: G, channel groups that each get their own kernels.
        encoder_kernel: k_enc, the content encoder's kernel size.
        encoder_dilation: the content encoder's dilation.
        compressed_channels: C_m, output channels of the 1x1 channel compressor; ``None`` drops the compressor and
            the encoder reads the input directly (ICCV Table 8, "N/A").
        normalizer: ``softmax`` (default, mmcv's), ``sigmoid`` or ``sigmoid_normalized``.

    As in mmcv: parameters ``channel_compressor`` and ``content_encoder`` (an mmcv state_dict loads strictly),
    ``init_weights()``, ``kernel_normalizer(mask)`` (pixel shuffle, then the normaliser), ``feature_reassemble(x,
    mask)``, and the attributes ``up_kernel`` / ``up_group`` (settable; aliases of ``kernel_size`` / ``group_size``).

    Shape: Tensor[N, C, H, W] -> Tensor[N, C, sigma * H, sigma * W]; ``forward(x, output_size=(H_out, W_out))``
    crops that to an odd size, e.g. an FPN level of 25 from one of 13 (see ``carafe.modules.crop_to``).
    """

    def __init__(self, channels: int, scale_factor: int, up_kernel: int = 5, up_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int | None = 64,
                 normalizer: str = "softmax") -> None:
        scale_factor = check_int("scale_factor", scale_factor, 1)
        super().__init__(channels, scale_factor, up_kernel, up_group, encoder_kernel, encoder_dilation,
                         compressed_channels, normalizer, kernels_per_location=scale_factor * scale_factor,
                         encoder_stride=1, compressor_norm=False, names=("up_kernel", "up_group"))

    @property
    def up_kernel(self) -> int:
        return self.kernel_size

    @up_kernel.setter
    def up_kernel(self, value: int) -> None:
        self.kernel_size = check_odd("up_kernel", value)

    @property
    def up_group(self) -> int:
        return self.group_size

    @up_group.setter
    def up_group(self, value: int) -> None:
        self.group_size = check_int("up_group", value, 1)

    def kernel_normalizer(self, mask: Tensor) -> Tensor:
        """The content encoder's output Tensor[N, G * k_up^2 * sigma^2, H, W] as normalised reassembly kernels
        Tensor[N, G * k_up^2, sigma * H, sigma * W]: pixel shuffle, then the normaliser over each group's taps."""
        return normalize_kernels(pixel_shuffle(mask, self.scale_factor), self.kernel_size, self.normalizer)

    def feature_reassemble(self, x: Tensor, mask: Tensor) -> Tensor:
        """``carafe(x, mask, up_kernel, up_group, scale_factor)``."""
        # Under autocast the kernels may come out in another precision than x (softmax runs in float32).
        return carafe(x, mask.to(x.dtype), self.kernel_size, self.group_size, self.scale_factor)

    def predict_kernels(self, x: Tensor) -> Tensor:
        """Normalised reassembly kernels Tensor[N, G * k_up^2, sigma * H, sigma * W] for input Tensor[N, C, H, W]."""
        return self.kernel_normalizer(self.content_encoder(self.channel_compressor(x)))

    def forward(self, x: Tensor, output_size: int | Sequence[int] | None = None) -> Tensor:
        # Always through crop_to, a leaf for torch.fx: symbolic tracing makes output_size a proxy, never None.
        return crop_to(self.feature_reassemble(x, self.predict_kernels(x)), output_size, x.shape[-2:],
                       self.scale_factor)


def crop_to(out: Tensor, output_size: int | Sequence[int] | None, input_size: Sequence[int],
            scale_factor: int) -> Tensor:
    """The top-left ``output_size`` of a sigma-fold upsampled ``out`` (``out`` itself for None): what an odd-sized
    level of a pyramid needs (mmdet's FPN_CARAFE crops the same way). Each output (p, q) keeps its reassembly
    centre (p // sigma, q // sigma), so the size must round up to the input's: ``ceil(H_out / sigma) == H`` (and
    likewise for W)."""
    if output_size is None:
        return out
    size = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    if len(size) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in size):
        raise TypeError(f"output_size must be an int or a pair of ints (H_out, W_out), got {output_size!r}")
    for name, got, have in zip(("H", "W"), size, input_size):
        if not (have - 1) * scale_factor < got <= have * scale_factor:
            raise ValueError(f"output_size {name}_out={got} is not a {scale_factor}-fold upsampling of {name}={have}: "
                             f"it must be in ({(have - 1) * scale_factor}, {have * scale_factor}]")
    return out[..., :size[0], :size[1]]


class CARAFE(nn.Module):
    """The reassembly alone, with kernels given: ``mmcv.ops.CARAFE(kernel_size, group_size, scale_factor)``.

    ``forward(features, masks)`` is ``carafe(features, masks, kernel_size, group_size, scale_factor)``; the
    three settings are plain attributes, checked again on every call.
    """

    def __init__(self, kernel_size: int, group_size: int, scale_factor: int) -> None:
        super().__init__()
        self.kernel_size = check_odd("kernel_size", kernel_size)
        self.group_size = check_int("group_size", group_size, 1)
        self.scale_factor = check_int("scale_factor", scale_factor, 1)

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        return carafe(features, masks, self.kernel_size, self.group_size, self.scale_factor)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, group_size={self.group_size}, scale_factor={self.scale_factor}"


def carafe_naive(features: Tensor, masks: Tensor, kernel_size: int, group_size: int, scale_factor: int) -> Tensor:
    """``mmcv.ops.carafe_naive``: the same result as ``carafe``, computed by the plain-PyTorch reference (one
    gather per tap, differentiated by autograd) whatever the device, without the compiled kernels or the
    registered operator. Slow; for checking, and for devices the compiled backends do not serve."""
    k, g, s = check_inputs(features, masks, kernel_size, group_size, scale_factor, up=True)
    return reference.reassemble(features, masks, k, g, s, up=True)


class CARAFENaive(CARAFE):
    """``mmcv.ops.CARAFENaive``: ``CARAFE`` computed by ``carafe_naive``."""

    def forward(self, features: Tensor, masks: Tensor) -> Tensor:
        return carafe_naive(features, masks, self.kernel_size, self.group_size, self.scale_factor)


class CARAFEDownPack(_KernelPrediction):
    """CARAFE++ downsampling: kernel prediction with a stride-sigma content encoder, then ``carafe_down``.

    As in the CARAFE++ classification setup, the 1x1 channel compressor (default C_m = 16) is followed by BatchNorm
    and ReLU. Arguments mirror ``CARAFEPack``.

    Shape: Tensor[N, C, H, W] -> Tensor[N, C, ceil(H / sigma), ceil(W / sigma)].
    """

    def __init__(self, channels: int, scale_factor: int = 2, down_kernel: int = 5, down_group: int = 1,
                 encoder_kernel: int = 3, encoder_dilation: int = 1, compressed_channels: int | None = 16,
                 normalizer: str = "softmax") -> None:
        scale_factor = check_int("scale_factor", scale_factor, 1)
        super().__init__(channels, scale_factor, down_kernel, down_group, encoder_kernel, encoder_dilation,
                         compressed_channels, normalizer, kernels_per_location=1, encoder_stride=scale_factor,
                         compressor_norm=True, names=("down_kernel", "down_group"))

    @property
    def down_kernel(self) -> int:
        return self.kernel_size

    @down_kernel.setter
    def down_kernel(self, value: int) -> None:
        self.kernel_size = check_odd("down_kernel", value)

    @property
    def down_group(self) -> int:
        return self.group_size

    @down_group.setter
    def down_group(self, value: int) -> None:
        self.group_size = check_int("down_group", value, 1)

    def predict_kernels(self, x: Tensor) -> Tensor:
        """Normalised kernels Tensor[N, G * k^2, ceil(H / sigma), ceil(W / sigma)] for input Tensor[N, C, H, W]."""
        return normalize_kernels(self.content_encoder(self.channel_compressor(x)), self.kernel_size, self.normalizer)

    def forward(self, x: Tensor) -> Tensor:
        kernels = self.predict_kernels(x).to(x.dtype)  # see CARAFEPack.forward
        return carafe_down(x, kernels, self.kernel_size, self.group_size, self.scale_factor)
