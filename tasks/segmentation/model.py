"""UperNet (Xiao et al. 2018) as the official CSAIL code builds it, and PSPNet (Zhao et al. 2017), with the CARAFE
papers' upsampler slots (ICCV 2019 section 4.3, CARAFE++ section 4.4).

UperNet on a torchvision ResNet (C2..C5 at strides 4, 8, 16, 32; the backbone's seven downsamplers swappable as in
``tasks.common.resnet``):

    PPM:   C5 -> for s in (1, 2, 3, 6): avg-pool to s x s -> upsample to C5's size -> conv1x1 2048->head_dim
           + BN + ReLU;
           concat [C5, the four] -> conv3x3 -> fpn_dim + BN + ReLU                                 = F5
    FPN:   F = F5; for C4, C3, C2: lateral conv1x1 + BN + ReLU -> fpn_dim; F = lateral + upsample(F);
           P_i = conv3x3 + BN + ReLU (F)                                                    P5 = F5
    FUSE:  [P2, P3, P4, P5] at P2's size, concatenated (4 fpn_dim) -> conv3x3 -> fpn_dim + BN + ReLU -> conv1x1 to
           the class logits at 1/4 of the input; ``SegmentationModel`` resizes them bilinearly to the label's size.

Three upsampler slots; ``None`` in a slot is CSAIL's bilinear resize (``align_corners=False``) straight to the
target size, so ``build_segmenter()`` is CSAIL's UperNet. A zoo operator (``carafe.build_upsampler`` spec) goes in
as the papers put CARAFE there:

- ``ppm_upsampler``: each pooled map is resized bilinearly to *half* of C5's size, (ceil(H5 / 2), ceil(W5 / 2)),
  then upsampled x2 by the operator; with an odd H5 the 2 ceil(H5 / 2) rows are cropped to H5 keeping the top-left
  part (``crop_to``: the same ceil-division rule the ResNet's own downsampling follows). One module per pool scale.
- ``fpn_upsampler``: the top-down x2 step (one module per step, ``fpn_dim`` channels), cropped to the lateral's size.
- ``fuse_upsampler``: FUSE becomes the papers' sequential chain: X = P5; for P4, P3, P2: X = concat[P_i,
  crop(up(X))], so the operator works on fpn_dim, 2 fpn_dim and 3 fpn_dim channels. The result lists the levels in
  the same order as CSAIL's concat. Note that the chain of three bilinear x2 steps is *not* a direct bilinear x8
  resize (each step interpolates the previous step's samples; the nearest-neighbour chain is exact), which is why
  the baseline keeps CSAIL's direct resize rather than a bilinear chain (``tests/test_segmentation.py``).

PPM placement (open in both papers): ``ppm_placement="before_conv"`` (default) upsamples the pooled 2048-channel
maps and then applies the 1x1 conv, which is CSAIL's order, the code both papers built on, and the literal reading of
"the pooled maps are upsampled to half the conv5 size, then CARAFE"; with ``None`` in the slot it is exactly CSAIL's
PPM. ``"after_conv"`` (mmsegmentation's order) reduces to head_dim channels first (the papers' 512: a quarter of
the operator's channels and of its reassembly cost); ``ppm_operator_costs`` gives the FLOPs and parameters of both.

PSPNet: the same ResNet with layer3 / layer4 dilated (output stride 8, Zhao et al.'s setting) and a PPM head
(pool scales 1, 2, 3, 6; conv3x3 -> head_dim (512) + BN + ReLU, dropout 0.1, conv1x1 to the logits); the logits are
resized bilinearly to the label's size. Simplified from the original: torchvision's ResNet stem (not the deep stem). A
dilated ResNet has no stride-2 places in layer3 / layer4, so PSPNet takes no backbone downsampler.

Auxiliary head (``aux_head=True``, the task's ``model.aux_weight`` > 0): mmsegmentation's ``FCNHead`` on C4 (layer3,
1024 channels; stride 16 for UperNet, 8 for the dilated PSPNet): conv3x3 -> 256 + BN + ReLU, dropout 0.1, conv1x1 to
the logits, the deep supervision of Zhao et al. 2017 (PSPNet), weighted 0.4 there. Only ``forward(...,
with_aux=True)`` runs it (the task's training step); evaluation and inference never do. CSAIL's UperNet has none, so
the default builds no auxiliary head and the model is parameter for parameter the one without the option.

PSANet (Zhao et al. 2018, "PSANet: Point-wise Spatial Attention Network for Scene Parsing", ECCV): the dilated
ResNet of PSPNet (output stride 8, C5 of h x w) and the bi-directional point-wise spatial attention head:

    for each branch, collect and distribute (own weights):
        R = conv1x1 2048->head_dim + BN + ReLU (C5), shrunk bilinearly to h' x w' = ((h-1)//2+1) x ((w-1)//2+1)
        M = conv1x1 head_dim->head_dim + BN + ReLU -> conv1x1 -> mh * mw   the "over-completed" mask of every position
        A = the masks cropped to the map -> Tensor[N, h'w', h'w']  (``point_wise_attention``)
        Z = R @ A                                                  head_dim channels
    conv1x1 2 head_dim->2048 + BN + ReLU (concat[Z_collect, Z_distribute]), resized back to h x w;
    concat with C5 (4096) -> conv3x3 -> head_dim + BN + ReLU -> dropout 0.1 -> conv1x1 to the logits (stride 8).

Position i's mask holds one weight per offset d in [-(mh-1)/2, (mh-1)/2] x [-(mw-1)/2, (mw-1)/2]. Collect: i gathers
z_i = sum_j a_i[j - i] r_j with its own mask; distribute: z_i = sum_j a_j[i - j] r_j, each j spreading its feature
with its mask. With mh = 2h' - 1, mw = 2w' - 1 every offset on the map is covered: the paper's over-completed map,
cropped per position to the h' x w' window centred on it. Normalisation: a softmax over the inputs j of each output
i, as in the authors' released ADE20k model (their Caffe prototxt sets ``is_softmax: true`` with normalisation
factor 1; their PyTorch code's ``psa_softmax`` is on too); ``psa_softmax=False`` is the Caffe layer's default instead,
the raw mask divided by mh * mw. The shrink by 2 (bilinear, ``align_corners=True``) and back is the authors'
``shrink_factor`` 2.

Simplified from the original, which trains and tests on fixed 465 px crops (sliding windows at test time) so that
its mask size (59 x 59 for ADE20k: C5 59 x 59, shrunk 30 x 30) always covers the whole map: here the mask size is
fixed at construction (``psa_mask_size``, default that 59 x 59) and whole images of any size go through, so where the
shrunk map is larger than (mh + 1) / 2 x (mw + 1) / 2 a position attends only within its mask's window (offsets
beyond it weigh 0: left out of the softmax, where the authors' op would leave a 0 logit). The cropping is plain
PyTorch (a gather with an index built once per map size), not the authors' PSAMask CUDA op; their ``psa_type``
option (collect only, distribute only, the "compact" variant) is not offered: always bi-directional, the paper's
best. torchvision's stem as for PSPNet; the auxiliary head is optional (``aux_head``; the authors train with 0.4).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import Bottleneck, ResNet

from carafe import build_upsampler
from carafe.ops import check_int
from tasks.common.resnet import RESNET_LAYERS, build_resnet
from tasks.common.upsampling import crop_to, init_upsampler_convs

ARCHS = ("upernet", "pspnet", "psanet")
DILATED_ARCHS = ("pspnet", "psanet")  # output stride 8: layer3 / layer4 dilated
PSA_MODES = ("collect", "distribute")
PSA_MASK_SIZE = (59, 59)                 # the authors' ADE20k mask (465 px crops: C5 59, shrunk 30 = (59 + 1) / 2)
PPM_PLACEMENTS = ("before_conv", "after_conv")
POOL_SCALES = (1, 2, 3, 6)
HEAD_DIM = 512                           # CSAIL's PPM branch width; PSPNet's and PSANet's head width (head_dim)
AUX_CHANNELS = 256                       # mmsegmentation's auxiliary FCNHead width
AUX_LEVEL = 2                            # the auxiliary head reads C4 (layer3), the third of C2..C5
RESNET_CHANNELS = (256, 512, 1024, 2048)  # C2..C5 of a bottleneck ResNet
RETURN_LAYERS = {"layer1": "c2", "layer2": "c3", "layer3": "c4", "layer4": "c5"}


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """CSAIL's ``conv3x3_bn_relu`` (and its 1x1 variant): a bias-free conv, BatchNorm, ReLU."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def resize(x: Tensor, size: Sequence[int]) -> Tensor:
    """Bilinear resize (``align_corners=False``), CSAIL's resize everywhere."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def _build_slot(spec: object, channels: int) -> nn.Module | None:
    """A x2 upsampler for a slot (None: the slot keeps CSAIL's direct bilinear resize), initialised like the
    host's convs (kaiming normal, as PyTorch's conv default would otherwise leave to chance)."""
    if spec is None:
        return None
    upsampler = build_upsampler(spec, channels=channels, scale_factor=2)
    init_upsampler_convs(upsampler, lambda w: nn.init.kaiming_normal_(w, nonlinearity="relu"))
    return upsampler


def upsample_to(x: Tensor, like: Tensor, upsampler: nn.Module | None) -> Tensor:
    """``x`` brought to ``like``'s spatial size: bilinear resize when ``upsampler`` is None, else the x2 operator
    followed by ``crop_to`` (``x`` must then be ceil(H / 2) x ceil(W / 2) of ``like``'s H x W)."""
    if upsampler is None:
        return resize(x, like.shape[-2:])
    return crop_to(upsampler(x), like)


class PyramidPooling(nn.Module):
    """CSAIL's PPM with an optional upsampler per pool scale (see the module doc for ``placement``).

    Shape: Tensor[N, C, H, W] -> Tensor[N, C + len(pool_scales) * branch_channels, H, W] (the input first).
    """

    def __init__(self, in_channels: int = 2048, branch_channels: int = HEAD_DIM,
                 pool_scales: Sequence[int] = POOL_SCALES, upsampler: object = None,
                 placement: str = "before_conv") -> None:
        super().__init__()
        if placement not in PPM_PLACEMENTS:
            raise ValueError(f"ppm_placement must be one of {', '.join(PPM_PLACEMENTS)}, got {placement!r}")
        self.pool_scales = [check_int("pool scale", s, 1) for s in pool_scales]
        self.placement = placement
        self.convs = nn.ModuleList(conv_bn_relu(in_channels, branch_channels, 1) for _ in self.pool_scales)
        upsampler_channels = in_channels if placement == "before_conv" else branch_channels
        self.upsamplers = nn.ModuleList(_build_slot(upsampler, upsampler_channels) for _ in self.pool_scales) \
            if upsampler is not None else None
        self.out_channels = in_channels + len(self.pool_scales) * branch_channels

    def _upsample(self, pooled: Tensor, like: Tensor, index: int) -> Tensor:
        if self.upsamplers is None:
            return resize(pooled, like.shape[-2:])
        h, w = like.shape[-2:]
        half = resize(pooled, (-(-h // 2), -(-w // 2)))
        return upsample_to(half, like, self.upsamplers[index])

    def forward(self, x: Tensor) -> Tensor:
        branches = [x]
        for index, (scale, conv) in enumerate(zip(self.pool_scales, self.convs)):
            pooled = F.adaptive_avg_pool2d(x, scale)
            if self.placement == "before_conv":
                branches.append(conv(self._upsample(pooled, x, index)))
            else:
                branches.append(self._upsample(conv(pooled), x, index))
        return torch.cat(branches, 1)

    def extra_repr(self) -> str:
        return f"pool_scales={self.pool_scales}, placement={self.placement}"


class UperNetHead(nn.Module):
    """PPM + FPN + FUSE over C2..C5 (see the module doc).

    Shape: [Tensor[N, 256, H/4, W/4], ..., Tensor[N, 2048, H/32, W/32]] (sizes by ceil division) ->
    Tensor[N, num_classes, H/4, W/4].
    """

    def __init__(self, num_classes: int, in_channels: Sequence[int] = RESNET_CHANNELS, fpn_dim: int = 512,
                 pool_scales: Sequence[int] = POOL_SCALES, ppm_upsampler: object = None, fpn_upsampler: object = None,
                 fuse_upsampler: object = None, ppm_placement: str = "before_conv", head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        num_classes = check_int("num_classes", num_classes, 1)
        fpn_dim = check_int("fpn_dim", fpn_dim, 1)
        head_dim = check_int("head_dim", head_dim, 1)
        self.ppm = PyramidPooling(in_channels[-1], head_dim, pool_scales, ppm_upsampler, ppm_placement)
        self.ppm_last_conv = conv_bn_relu(self.ppm.out_channels, fpn_dim, 3)
        self.fpn_in = nn.ModuleList(conv_bn_relu(c, fpn_dim, 1) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(conv_bn_relu(fpn_dim, fpn_dim, 3) for _ in in_channels[:-1])
        levels = len(in_channels)
        # fpn_upsamplers[i] brings the top-down map to lateral i's size; fuse_upsamplers[i] the chain to level i's.
        self.fpn_upsamplers = nn.ModuleList(_build_slot(fpn_upsampler, fpn_dim) for _ in range(levels - 1)) \
            if fpn_upsampler is not None else None
        self.fuse_upsamplers = nn.ModuleList(_build_slot(fuse_upsampler, fpn_dim * (levels - 1 - i))
                                             for i in range(levels - 1)) if fuse_upsampler is not None else None
        self.conv_fusion = conv_bn_relu(levels * fpn_dim, fpn_dim, 3)
        self.classifier = nn.Conv2d(fpn_dim, num_classes, 1)

    def fuse(self, pyramid: list[Tensor]) -> Tensor:
        """[P2, ..., P5] -> Tensor[N, 4 fpn_dim, H2, W2], levels in that order (direct resize or the chain)."""
        if self.fuse_upsamplers is None:
            return torch.cat([pyramid[0], *(resize(p, pyramid[0].shape[-2:]) for p in pyramid[1:])], 1)
        chained = pyramid[-1]
        for i in range(len(pyramid) - 2, -1, -1):
            chained = torch.cat([pyramid[i], upsample_to(chained, pyramid[i], self.fuse_upsamplers[i])], 1)
        return chained

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        top = self.ppm_last_conv(self.ppm(features[-1]))
        pyramid = [top]
        for i in range(len(features) - 2, -1, -1):
            lateral = self.fpn_in[i](features[i])
            up = self.fpn_upsamplers[i] if self.fpn_upsamplers is not None else None
            top = lateral + upsample_to(top, lateral, up)
            pyramid.insert(0, self.fpn_out[i](top))
        return self.classifier(self.conv_fusion(self.fuse(pyramid)))


class PSPHead(nn.Module):
    """PSPNet's head: PPM -> conv3x3 -> head_dim + BN + ReLU -> dropout 0.1 -> conv1x1 to the logits.

    Shape: [..., Tensor[N, 2048, h, w]] -> Tensor[N, num_classes, h, w] (only the last map is used).
    """

    def __init__(self, num_classes: int, in_channels: int = 2048, pool_scales: Sequence[int] = POOL_SCALES,
                 ppm_upsampler: object = None, ppm_placement: str = "before_conv", head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        head_dim = check_int("head_dim", head_dim, 1)
        self.ppm = PyramidPooling(in_channels, head_dim, pool_scales, ppm_upsampler, ppm_placement)
        self.conv = conv_bn_relu(self.ppm.out_channels, head_dim, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(head_dim, check_int("num_classes", num_classes, 1), 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        return self.classifier(self.dropout(self.conv(self.ppm(features[-1]))))


class FCNAuxHead(nn.Module):
    """mmsegmentation's auxiliary ``FCNHead`` (one conv, no input concat): conv3x3 -> 256 + BN + ReLU, dropout 0.1,
    conv1x1 to the logits.

    Shape: Tensor[N, 1024, h, w] (C4) -> Tensor[N, num_classes, h, w].
    """

    def __init__(self, num_classes: int, in_channels: int = RESNET_CHANNELS[AUX_LEVEL],
                 channels: int = AUX_CHANNELS) -> None:
        super().__init__()
        self.conv = conv_bn_relu(in_channels, channels, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(channels, check_int("num_classes", num_classes, 1), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.dropout(self.conv(x)))


@lru_cache(maxsize=32)
def _offset_index(height: int, width: int, mask_h: int, mask_w: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """For a height x width map and an mh x mw mask: ``index[q, p]`` is the channel of position p's mask that holds
    the offset q - p (0 where it falls outside the mask) and ``inside[q, p]`` whether it is inside; p, q row-major.
    Built once per (map size, mask size, device)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    dy, dx = rows[:, None] - rows[None, :], cols[:, None] - cols[None, :]  # [q, p]: q - p
    half_h, half_w = (mask_h - 1) // 2, (mask_w - 1) // 2
    inside = (dy.abs() <= half_h) & (dx.abs() <= half_w)
    index = torch.where(inside, (dy + half_h) * mask_w + dx + half_w, torch.zeros_like(dy))
    return index, inside


def point_wise_attention(mask: Tensor, mask_size: Sequence[int], mode: str, softmax: bool = True) -> Tensor:
    """PSANet's attention matrix from the per-position over-completed masks (see the module doc).

    Args:
        mask: Tensor[N, mh * mw, H, W], position p's weight for offset (dy, dx) in channel
            (dy + (mh - 1) / 2) * mw + dx + (mw - 1) / 2.
        mask_size: (mh, mw), both odd.
        mode: ``"collect"`` (output p gathers input q with weight mask_p[q - p]) or ``"distribute"`` (input q sends
            to output p with weight mask_q[p - q]).
        softmax: normalise each output's weights over its inputs by a softmax; otherwise divide by mh * mw.
            Inputs outside the mask's window weigh 0 either way.

    Returns:
        Tensor[N, HW, HW] ``A`` with ``A[n, q, p]`` the weight of input q in output p, so that
        ``features.flatten(2) @ A`` aggregates Tensor[N, C, H, W] features (row-major positions).
    """
    if mode not in PSA_MODES:
        raise ValueError(f"PSA mode must be one of {', '.join(PSA_MODES)}, got {mode!r}")
    mask_h, mask_w = (check_int("PSA mask size", s, 1) for s in mask_size)
    if mask_h % 2 == 0 or mask_w % 2 == 0:
        raise ValueError(f"PSA mask size must be odd (a centre offset 0), got {tuple(mask_size)}")
    n, channels, height, width = mask.shape
    if channels != mask_h * mask_w:
        raise ValueError(f"a {mask_h} x {mask_w} PSA mask needs {mask_h * mask_w} channels, got {channels}")
    index, inside = _offset_index(height, width, mask_h, mask_w, mask.device)
    # gathered[n, q, p] = mask_p[q - p]: collect's matrix; distribute's is its transpose (A[q, p] = mask_q[p - q])
    gathered = torch.gather(mask.flatten(2), 1, index.expand(n, -1, -1))
    if mode == "distribute":
        gathered, inside = gathered.transpose(1, 2), inside.t()
    if softmax:
        return gathered.masked_fill(~inside, float("-inf")).softmax(1)
    return gathered.masked_fill(~inside, 0.0) / (mask_h * mask_w)


class PSAHead(nn.Module):
    """PSANet's bi-directional point-wise spatial attention head (see the module doc).

    Shape: [..., Tensor[N, 2048, h, w]] -> Tensor[N, num_classes, h, w] (only the last map is used).
    """

    def __init__(self, num_classes: int, in_channels: int = 2048, mask_size: Sequence[int] = PSA_MASK_SIZE,
                 shrink_factor: int = 2, softmax: bool = True, head_dim: int = HEAD_DIM) -> None:
        super().__init__()
        self.mask_size = tuple(check_int("psa_mask_size", s, 3) for s in mask_size)
        if len(self.mask_size) != 2 or any(s % 2 == 0 for s in self.mask_size):
            raise ValueError(f"psa_mask_size must be two odd integers >= 3, got {tuple(mask_size)}")
        self.shrink_factor = check_int("psa_shrink_factor", shrink_factor, 1)
        self.softmax = bool(softmax)
        mask_channels = self.mask_size[0] * self.mask_size[1]
        head_dim = check_int("head_dim", head_dim, 1)
        self.reduce = nn.ModuleDict({mode: conv_bn_relu(in_channels, head_dim, 1) for mode in PSA_MODES})
        self.attention = nn.ModuleDict({mode: nn.Sequential(conv_bn_relu(head_dim, head_dim, 1),
                                                            nn.Conv2d(head_dim, mask_channels, 1, bias=False))
                                        for mode in PSA_MODES})
        self.project = conv_bn_relu(len(PSA_MODES) * head_dim, in_channels, 1)
        self.conv = conv_bn_relu(2 * in_channels, head_dim, 3)
        self.dropout = nn.Dropout2d(0.1)
        self.classifier = nn.Conv2d(head_dim, check_int("num_classes", num_classes, 1), 1)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = features[-1]
        size = tuple(x.shape[-2:])
        shrunk = tuple((s - 1) // self.shrink_factor + 1 for s in size)
        aggregated = []
        for mode in PSA_MODES:
            reduced = self.reduce[mode](x)
            if shrunk != size:
                reduced = F.interpolate(reduced, size=shrunk, mode="bilinear", align_corners=True)
            attention = point_wise_attention(self.attention[mode](reduced), self.mask_size, mode, self.softmax)
            aggregated.append(torch.bmm(reduced.flatten(2), attention.to(reduced.dtype)).view_as(reduced))
        context = self.project(torch.cat(aggregated, 1))
        if shrunk != size:
            context = F.interpolate(context, size=size, mode="bilinear", align_corners=True)
        return self.classifier(self.dropout(self.conv(torch.cat([x, context], 1))))

    def extra_repr(self) -> str:
        return f"mask_size={self.mask_size}, shrink_factor={self.shrink_factor}, softmax={self.softmax}"


class SegmentationModel(nn.Module):
    """ResNet body (C2..C5) + a head (+ an optional auxiliary head on C4, run only with ``with_aux=True``); logits at
    the head's resolution, or resized to ``output_size``.

    Shape: Tensor[N, 3, H, W] -> Tensor[N, num_classes, h, w] (UperNet h = ceil(H / 4); PSPNet, PSANet ceil(H / 8)), or
    Tensor[N, num_classes, *output_size] when it is given. With ``with_aux=True``: (those logits, the auxiliary
    logits Tensor[N, num_classes, h4, w4] at C4's size, or at ``output_size`` when it is given).
    """

    def __init__(self, resnet: ResNet, head: nn.Module, aux_head: nn.Module | None = None) -> None:
        super().__init__()
        self.body = IntermediateLayerGetter(resnet, return_layers=dict(RETURN_LAYERS))
        self.head = head
        if aux_head is not None:  # no attribute at all otherwise: the state dict is the one without the option
            self.aux_head = aux_head

    def forward(self, images: Tensor, output_size: Sequence[int] | None = None,
                with_aux: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        features = list(self.body(images).values())
        logits = self.head(features)
        logits = logits if output_size is None else resize(logits, output_size)
        if not with_aux:
            return logits
        if not hasattr(self, "aux_head"):
            raise ValueError("with_aux=True needs a model built with an auxiliary head (model.aux_weight > 0)")
        aux = self.aux_head(features[AUX_LEVEL])
        return logits, (aux if output_size is None else resize(aux, output_size))


def build_segmenter(arch: str = "upernet", depth: int = 50, num_classes: int = 150, fpn_dim: int = 512,
                    pool_scales: Sequence[int] = POOL_SCALES, ppm_upsampler: object = None,
                    fpn_upsampler: object = None, fuse_upsampler: object = None, backbone_downsampler: object = None,
                    ppm_placement: str = "before_conv", aux_head: bool = False,
                    psa_mask_size: Sequence[int] = PSA_MASK_SIZE, psa_shrink_factor: int = 2,
                    psa_softmax: bool = True, head_dim: int = HEAD_DIM) -> SegmentationModel:
    """UperNet, PSPNet or PSANet on ResNet-``depth`` (no pretrained weights) for ``num_classes`` classes.

    Args:
        ppm_upsampler, fpn_upsampler, fuse_upsampler: ``carafe.build_upsampler`` specs, or None for CSAIL's direct
            bilinear resize (see the module doc). PSPNet has only the PPM slot, PSANet none.
        backbone_downsampler: a ``carafe.build_downsampler`` spec for the ResNet's seven downsampling places (CARAFE++
            Table IX "backbone"), or None for torchvision's strided convs. UperNet only.
        ppm_placement: ``"before_conv"`` (CSAIL's order) or ``"after_conv"``.
        aux_head: add the auxiliary FCN head on C4 (built last, so the other parameters draw the same random
            numbers with or without it).
        head_dim: the width of the PPM's per-scale 1x1 convs (all three archs; CSAIL's 512), of PSPNet's and
            PSANet's 3x3 head conv and of PSANet's attention branches (512 in Zhao et al.'s models).
        psa_mask_size, psa_shrink_factor, psa_softmax: PSANet's mask size (mh, mw), both odd, shrink before the
            attention and normalisation (see the module doc). PSANet only.
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"unknown segmentation arch {arch!r}; choose one of {', '.join(ARCHS)}")
    if depth not in RESNET_LAYERS:
        raise ValueError(f"ResNet depth must be one of {sorted(RESNET_LAYERS)}, got {depth!r}")
    if arch == "upernet":
        resnet = build_resnet(depth, 1000, backbone_downsampler)
        head: nn.Module = UperNetHead(num_classes, RESNET_CHANNELS, fpn_dim, pool_scales, ppm_upsampler,
                                      fpn_upsampler, fuse_upsampler, ppm_placement, head_dim)
    else:
        slots = (("ppm_upsampler", ppm_upsampler),) if arch == "psanet" else ()
        slots += (("fpn_upsampler", fpn_upsampler), ("fuse_upsampler", fuse_upsampler),
                  ("backbone_downsampler", backbone_downsampler))
        unused = [k for k, v in slots if v is not None]
        if unused:
            raise ValueError(f"{'PSPNet' if arch == 'pspnet' else 'PSANet'} has no {', '.join(unused)} slot (a "
                             "dilated ResNet has no stride-2 places in layer3 / layer4, and no FPN"
                             f"{'' if arch == 'pspnet' else ' or PPM'}); leave them null")
        resnet = ResNet(Bottleneck, list(RESNET_LAYERS[depth]), replace_stride_with_dilation=[False, True, True])
        if arch == "pspnet":
            head = PSPHead(num_classes, RESNET_CHANNELS[-1], pool_scales, ppm_upsampler, ppm_placement, head_dim)
        else:
            head = PSAHead(num_classes, RESNET_CHANNELS[-1], psa_mask_size, psa_shrink_factor, psa_softmax, head_dim)
    for m in head.modules():
        if isinstance(m, nn.Conv2d) and not _inside_upsampler(m, head):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    aux = FCNAuxHead(num_classes) if aux_head else None
    for m in aux.modules() if aux is not None else ():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    return SegmentationModel(resnet, head, aux)


def _inside_upsampler(conv: nn.Conv2d, head: nn.Module) -> bool:
    ppm = getattr(head, "ppm", None)
    slots = [getattr(head, name, None) for name in ("fpn_upsamplers", "fuse_upsamplers")]
    slots += [ppm.upsamplers] if ppm is not None else []
    return any(conv is m for slot in slots if slot is not None for m in slot.modules())


def ppm_operator_costs(upsampler: object, in_channels: int = 2048,
                       head_dim: int = HEAD_DIM) -> dict[str, dict[str, int]]:
    """FLOPs per input pixel and parameters of one PPM operator in each placement (``carafe.costs`` conventions):
    ``{"before_conv": {"flops": ..., "params": ...}, "after_conv": {...}}``; the PPM holds one per pool scale."""
    from carafe.costs import flops_per_pixel, num_params

    costs = {}
    for placement, channels in (("before_conv", in_channels), ("after_conv", head_dim)):
        module = build_upsampler(upsampler, channels=channels, scale_factor=2)
        costs[placement] = {"flops": int(flops_per_pixel(module)), "params": int(num_params(module))}
    return costs
