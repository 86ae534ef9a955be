"""The inpainting networks of the CARAFE papers (ICCV 2019 section 4.4, CARAFE++ section 4.3): the Global&Local
generator (Iizuka et al. 2017) with an upsampler and a downsampler slot, its Partial Conv variant (Liu et al. 2018),
and one PatchGAN-style discriminator on the inpainted region.

Generator (mmagic's ``GLEncoderDecoder`` layout, widths for ``base_channels`` b = 64; every conv but the last is
followed by BatchNorm and ReLU):

    encoder  5x5/1 -> b,  3x3/2 -> 2b,  3x3/1 -> 2b,  3x3/2 -> 4b,  3x3/1 -> 4b,  3x3/1 -> 4b
    neck     four 3x3 convs, 4b channels, dilation 2, 4, 8, 16
    decoder  3x3 -> 4b,  3x3 -> 4b,  UP x2 -> 2b,  3x3 -> 2b,  UP x2 -> b,  3x3 -> b/2,  3x3 -> 3, clamped to [-1, 1]

Input: the image with its holes zeroed and the hole mask (4 channels); output composited
``y = (1 - M) * x + M * y_hat`` (M = 1 in the hole).

Slots:
- ``upsampler`` (the two UP layers; ICCV "CARAFE replaces the generator's two upsampling layers"): None is
  Global&Local's own 4x4 stride-2 deconvolution C -> C / 2, followed by BN + ReLU. A zoo operator keeps its C
  channels (it upsamples, it does not mix channels), so the decoder's next 3x3 conv takes C instead of C / 2 inputs.
- ``downsampler`` (CARAFE++ section 4.3: "each strided conv becomes CARAFE++ followed by a stride-1 conv"): None is
  the two 3x3 stride-2 convs; an operator replaces each by operator(C) -> 3x3 stride-1 conv C -> 2C + BN + ReLU.

Partial Conv (``partial=True``): every conv becomes a ``PartialConv2d`` and the valid-pixel mask (1 - M) travels with
the features (the input's mask channel is zeroed by the first partial conv's x * mask, so in effect the generator
sees RGB only, as NVIDIA's PConv does). Through an UP layer the mask follows
CARAFE's own kernels when the operator is CARAFE (ICCV: "the mask is reassembled with the same kernels"), and
nearest-neighbour upsampling for every other operator (NVIDIA's PConv U-Net upsamples its masks that way); a
downsampler passes the mask on by max pooling (a pixel is valid when any of its 2x2 inputs is).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from carafe import build_downsampler, build_upsampler
from carafe.modules import CARAFEPack
from carafe.ops import carafe, check_int
from tasks.common.upsampling import init_upsampler_convs

GENERATORS = ("global_local", "partial_conv")
NECK_DILATIONS = (2, 4, 8, 16)
DISCRIMINATOR_REGIONS = ("hole", "image")
RENORM_EPS = 1e-8  # NVIDIA's


class PartialConv2d(nn.Conv2d):
    """NVIDIA's partial convolution (``models/partialconv2d.py``, single-channel mask), forward(x, mask):

        u = conv(mask, ones(k_h, k_w)),  ratio = k_h k_w / (u + 1e-8) * clamp(u, 0, 1),
        out = ((conv(x * mask) - b) * ratio + b) * clamp(u, 0, 1),   new mask = clamp(u, 0, 1).

    Shapes: x Tensor[N, C_in, H, W], mask Tensor[N, 1, H, W] (1 = valid) -> (Tensor[N, C_out, H', W'],
    Tensor[N, 1, H', W']). The mask takes values in [0, 1]; a soft mask (after CARAFE) counts fractionally.
    """

    def forward(self, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        with torch.no_grad():
            ones = torch.ones(1, 1, *self.kernel_size, dtype=mask.dtype, device=mask.device)
            coverage = F.conv2d(mask, ones, stride=self.stride, padding=self.padding, dilation=self.dilation)
            new_mask = coverage.clamp(0, 1)
            ratio = self.kernel_size[0] * self.kernel_size[1] / (coverage + RENORM_EPS) * new_mask
        raw = super().forward(x * mask)
        if self.bias is None:
            return raw * ratio * new_mask, new_mask
        bias = self.bias.view(1, -1, 1, 1)
        return ((raw - bias) * ratio + bias) * new_mask, new_mask


class ConvBlock(nn.Module):
    """conv (partial or plain) -> BN + ReLU, or the bare conv when ``activate`` is False.

    Shapes: (Tensor[N, C_in, H, W], mask Tensor[N, 1, H, W] or None) -> the same pair at the output size; a plain
    conv passes the mask through untouched.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 partial: bool = False, activate: bool = True) -> None:
        super().__init__()
        conv = PartialConv2d if partial else nn.Conv2d
        self.partial = partial
        self.conv = conv(in_channels, out_channels, kernel_size, stride=stride,
                         padding=dilation * (kernel_size - 1) // 2, dilation=dilation)
        self.post = nn.Sequential(nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)) if activate else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.partial:
            x, mask = self.conv(x, mask)
        else:
            x = self.conv(x)
        return self.post(x), mask


class UpsampleLayer(nn.Module):
    """One of the decoder's two x2 layers (see the module doc): G&L's deconv C -> C / 2 + BN + ReLU when
    ``upsampler`` is None (``out_channels`` = C / 2), else the zoo operator on C channels (``out_channels`` = C).

    Shapes: (Tensor[N, C, H, W], mask Tensor[N, 1, H, W] or None) -> (Tensor[N, out_channels, 2H, 2W], mask at 2H x 2W).
    """

    def __init__(self, channels: int, upsampler: object, partial: bool) -> None:
        super().__init__()
        self.partial = partial
        if upsampler is None:
            self.operator = None
            self.out_channels = channels // 2
            self.deconv = nn.ConvTranspose2d(channels, self.out_channels, 4, stride=2, padding=1)
            self.post: nn.Module = nn.Sequential(nn.BatchNorm2d(self.out_channels), nn.ReLU(inplace=True))
        else:
            self.operator = build_upsampler(upsampler, channels=channels, scale_factor=2)
            init_upsampler_convs(self.operator, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
            self.out_channels = channels
            self.post = nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.operator is None:
            x = self.post(self.deconv(x * mask if self.partial else x))
        elif self.partial and isinstance(self.operator, CARAFEPack):
            return carafe_with_mask(self.operator, x, mask)
        else:
            x = self.operator(x)
        if self.partial:
            mask = F.interpolate(mask, scale_factor=2, mode="nearest")
            x = x * mask
        return x, mask


def carafe_with_mask(operator: CARAFEPack, x: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Upsample features and their valid-pixel mask with the same CARAFE kernels, predicted from the features.

    x: Tensor[N, C, H, W], mask: Tensor[N, 1, H, W] in [0, 1] -> (Tensor[N, C, 2H, 2W], Tensor[N, 1, 2H, 2W]).
    The kernels are normalised (each sums to 1 with ``softmax``), so the mask stays in [0, 1]: the reassembled mask
    at a pixel is the share of the kernel's weight that falls on valid source pixels. One kernel group per mask:
    the operator must have ``up_group=1``.
    """
    if operator.group_size != 1:
        raise ValueError(f"the Partial Conv generator reassembles its one-channel mask with CARAFE's kernels, which "
                         f"needs up_group=1 (got {operator.group_size})")
    kernels = operator.predict_kernels(x).to(x.dtype)
    k, s = operator.kernel_size, operator.scale_factor
    return carafe(x, kernels, k, 1, s), carafe(mask.to(x.dtype), kernels, k, 1, s)


class DownsampleLayer(nn.Module):
    """One of the encoder's two x1/2 steps: G&L's 3x3 stride-2 conv C -> 2C, or (``downsampler`` given) the operator
    on C channels followed by a 3x3 stride-1 conv C -> 2C (CARAFE++ section 4.3). With ``partial`` the mask follows
    the operator by 2x2 max pooling (ceil mode, matching the ceil(H / 2) output).

    Shapes: (Tensor[N, C, H, W], mask or None) -> (Tensor[N, 2C, ceil(H / 2), ceil(W / 2)], mask at that size).
    """

    def __init__(self, channels: int, out_channels: int, downsampler: object, partial: bool) -> None:
        super().__init__()
        self.partial = partial
        # A downsampler keeps its own initialisation, as in the ResNet's downsampler slots (tasks.common.resnet).
        self.operator = None if downsampler is None else build_downsampler(downsampler, channels=channels,
                                                                           scale_factor=2)
        self.conv = ConvBlock(channels, out_channels, 3, stride=2 if self.operator is None else 1, partial=partial)

    def forward(self, x: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
        if self.operator is not None:
            x = self.operator(x * mask if self.partial else x)
            if self.partial:
                mask = F.max_pool2d(mask, 2, ceil_mode=True)
        return self.conv(x, mask)


class GlobalLocalGenerator(nn.Module):
    """The Global&Local encoder-dilated-decoder (module doc), plain or Partial Conv.

    forward(images, masks): images Tensor[N, 3, H, W] in [-1, 1], masks Tensor[N, 1, H, W] with 1 = hole;
    H, W multiples of 4. Returns (composited Tensor[N, 3, H, W], raw prediction y_hat Tensor[N, 3, H, W]).
    """

    def __init__(self, base_channels: int = 64, upsampler: object = None, downsampler: object = None,
                 partial: bool = False) -> None:
        super().__init__()
        b = check_int("base_channels", base_channels, 2)
        self.partial = partial
        block = functools.partial(ConvBlock, partial=partial)
        self.encoder = nn.ModuleList([block(4, b, 5), DownsampleLayer(b, 2 * b, downsampler, partial),
                                      block(2 * b, 2 * b, 3), DownsampleLayer(2 * b, 4 * b, downsampler, partial),
                                      block(4 * b, 4 * b, 3), block(4 * b, 4 * b, 3)])
        self.neck = nn.ModuleList(block(4 * b, 4 * b, 3, dilation=d) for d in NECK_DILATIONS)
        first_up = UpsampleLayer(4 * b, upsampler, partial)
        second_up_in = 2 * b
        after_first = block(first_up.out_channels, second_up_in, 3)
        second_up = UpsampleLayer(second_up_in, upsampler, partial)
        self.decoder = nn.ModuleList([block(4 * b, 4 * b, 3), block(4 * b, 4 * b, 3), first_up, after_first,
                                      second_up, block(second_up.out_channels, b // 2, 3),
                                      block(b // 2, 3, 3, activate=False)])

    def forward(self, images: Tensor, masks: Tensor) -> tuple[Tensor, Tensor]:
        if images.shape[-2] % 4 or images.shape[-1] % 4:
            raise ValueError(f"image size {tuple(images.shape[-2:])} must be a multiple of 4 (two x2 steps)")
        valid = 1 - masks
        x = torch.cat([images * valid, masks], 1)
        mask = valid if self.partial else None
        for layer in (*self.encoder, *self.neck, *self.decoder):
            x, mask = layer(x, mask)
        predicted = x.clamp(-1, 1)
        return valid * images + masks * predicted, predicted


class PatchDiscriminator(nn.Module):
    """SN-PatchGAN (DeepFill v2): 5x5 stride-2 convs with spectral norm and LeakyReLU(0.2) on [image, hole mask]
    (4 channels), the last conv without activation, one score per patch.

    Shape: (Tensor[N, 3, H, W], Tensor[N, 1, H, W]) -> Tensor[N, 1, H / 2^L, W / 2^L] for L = len(channels) layers
    (DeepFill v2: channels 64, 128, 256, 256, 256, 256 on 256 px -> 4 x 4 patches). The last conv maps to one
    channel, so a score needs no flattening.
    """

    def __init__(self, channels: Sequence[int] = (64, 128, 256, 256, 256, 256)) -> None:
        super().__init__()
        channels = [check_int("discriminator channels", c, 1) for c in channels]
        if not channels:
            raise ValueError("the discriminator needs at least one layer (discriminator_channels is empty)")
        layers: list[nn.Module] = []
        in_channels = 4
        for index, out_channels in enumerate(channels):
            layers.append(nn.utils.spectral_norm(nn.Conv2d(in_channels, out_channels, 5, stride=2, padding=2)))
            layers.append(nn.LeakyReLU(0.2, inplace=True))
            in_channels = out_channels
        layers.append(nn.utils.spectral_norm(nn.Conv2d(in_channels, 1, 3, padding=1)))
        self.layers = nn.Sequential(*layers)
        self.downsampling = 2 ** len(channels)

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        return self.layers(torch.cat([images, masks], 1))


class InpaintingGAN(nn.Module):
    """The generator and the discriminator; ``forward`` is the generator (what evaluation and speed measure)."""

    def __init__(self, generator: GlobalLocalGenerator, discriminator: PatchDiscriminator) -> None:
        super().__init__()
        self.generator = generator
        self.discriminator = discriminator

    def forward(self, images: Tensor, masks: Tensor) -> Tensor:
        return self.generator(images, masks)[0]


def patch_weights(masks: Tensor, downsampling: int, region: str) -> Tensor:
    """Which discriminator patches the adversarial losses count: Tensor[N, 1, H / d, W / d] of 0 / 1.

    ``hole`` (default): the patches whose d x d cell of the image overlaps the hole (the hole mask max-pooled by
    d). Outside the hole the composite *is* the real image, so those patches hold no fake pixel and scoring them as
    fake teaches the discriminator nothing true; this is the reading of "a discriminator on the inpainted region"
    that keeps one PatchGAN over the whole composite (context included in every patch's receptive field).
    ``image``: every patch, as DeepFill v2's SN-PatchGAN does.
    """
    if region not in DISCRIMINATOR_REGIONS:
        raise ValueError(f"discriminator region {region!r} is not one of {', '.join(DISCRIMINATOR_REGIONS)}")
    pooled = F.max_pool2d(masks, downsampling, ceil_mode=True)
    return (pooled > 0).to(masks.dtype) if region == "hole" else torch.ones_like(pooled)


def masked_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Mean of ``values`` over the positions where ``weights`` is 1 (broadcast); 0 when there is none."""
    weights = weights.expand_as(values)
    return (values * weights).sum() / weights.sum().clamp(min=1)


def build_inpainting_model(base_channels: int = 64, upsampler: object = None, downsampler: object = None,
                           partial: bool = False,
                           discriminator_channels: Sequence[int] = (64, 128, 256, 256, 256, 256)) -> InpaintingGAN:
    """The generator (G&L, or Partial Conv with ``partial``) and the SN-PatchGAN discriminator; see the module doc."""
    generator = GlobalLocalGenerator(base_channels, upsampler, downsampler, partial)
    for m in generator.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and not _inside_operator(m, generator):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return InpaintingGAN(generator, PatchDiscriminator(discriminator_channels))


def _inside_operator(conv: nn.Module, generator: GlobalLocalGenerator) -> bool:
    operators = [layer.operator for layer in (*generator.encoder, *generator.decoder)
                 if isinstance(layer, (UpsampleLayer, DownsampleLayer)) and layer.operator is not None]
    return any(conv is m for op in operators for m in op.modules())
