"""The feature pyramid of the papers' detection code (mmdetection's ``FPN_CARAFE``), with any top-down upsampler;
shared by the hosts that need one (the detectors' FPN, UperNet's FPN).

Structure (ResNet C2..C5 in, P2..P6 out, 256 channels each; identical for every upsampler, so that the rows of
ICCV 2019 Table 2 / CARAFE++ Table IV differ only in the operator):

    lateral_convs[i]:     1x1 conv C_{i+2} -> 256                              (P2..P5 laterals)
    extra_lateral_convs:  3x3 conv, stride 2, on C5 -> 256                     (P6 lateral)
    top-down:             L6 -> L5 + up(L6) -> L4 + up(M5) -> L3 + up(M4) -> L2 + up(M3)
    output_convs[i]:      3x3 conv 256 -> 256 on each merged map M2..M6        (P2..P6)

Extra level: ``FPN_CARAFE`` (``num_outs=5`` in ``faster_rcnn_r50_fpn_carafe_1x``) builds P6 from C5 with a stride-2
3x3 conv and, unlike the standard FPN, puts it at the top of the top-down path (so there are four upsamplers, P6->P5
included) and gives it a 3x3 output conv. torchvision's FPN instead max-pools P5 (``LastLevelMaxPool``); that is not
what the papers' code did for any of the upsamplers it compares, so it is not used here. No activations, no norms
(``norm_cfg=None, act_cfg=None``).

Size alignment: the upsampled map is cropped to the lateral's size (``tasks.common.upsampling.crop_to``). With
``size_divisible`` a multiple of 64 (the papers' padding) every level is exact and nothing is cropped.

Initialisation: the FPN's own convolutions are xavier-uniform with zero bias (``FPN_CARAFE.init_weights``); the
upsamplers keep the initialisation of their class in ``carafe`` (CARAFE: the papers' xavier + normal(0.001) encoder),
except that plain convolutional upsamplers (deconv, pixel shuffle, N.C., B.C., S.A.) are xavier-initialised like the
FPN's convs, as ``FPN_CARAFE.init_weights`` does to every conv it holds; see ``init_upsampler_convs``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from carafe import build_upsampler
from carafe.ops import check_int
from tasks.common.upsampling import crop_to, init_upsampler_convs


class UpsamplerFPN(nn.Module):
    """Feature pyramid (mmdetection ``FPN_CARAFE``) whose top-down upsampling is any ``carafe.build_upsampler`` spec.

    Args:
        in_channels_list: channels of the backbone maps, finest first (ResNet-50: 256, 512, 1024, 2048).
        out_channels: channels of every pyramid level (256 in the papers).
        upsampler: a ``build_upsampler`` spec (``"nearest"``, ``"carafe"``, a mapping with ``type``, a callable);
            one module is built per top-down step, with ``channels=out_channels, scale_factor=2``.
        extra_levels: levels above the coarsest input, each a stride-2 3x3 conv on the previous one (the first on
            the coarsest backbone map); 1 gives P6 as in the papers' Faster / Mask R-CNN.
        first_level: the pyramid index of the finest input, used only to name the outputs (``p2`` for ResNet C2).

    Shape: a mapping (or sequence) of Tensor[N, C_i, H_i, W_i], finest first, with H_{i+1} = ceil(H_i / 2) ->
    an ``OrderedDict`` ``{"p2": Tensor[N, 256, H_0, W_0], ..., "p6": Tensor[N, 256, ceil(H_3 / 2), ceil(W_3 / 2)]}``.
    """

    def __init__(self, in_channels_list: Sequence[int], out_channels: int = 256, upsampler: object = "nearest",
                 extra_levels: int = 1, first_level: int = 2) -> None:
        super().__init__()
        if isinstance(in_channels_list, (str, bytes)) or not isinstance(in_channels_list, Sequence):
            raise TypeError(f"in_channels_list must be a sequence of ints, got {in_channels_list!r}")
        if len(in_channels_list) < 1:
            raise ValueError(f"in_channels_list must name at least one input, got {in_channels_list!r}")
        self.in_channels_list = [check_int("in_channels_list entry", c, 1) for c in in_channels_list]
        self.out_channels = check_int("out_channels", out_channels, 1)
        self.extra_levels = check_int("extra_levels", extra_levels, 0)
        self.first_level = check_int("first_level", first_level, 0)

        self.lateral_convs = nn.ModuleList(nn.Conv2d(c, out_channels, 1) for c in self.in_channels_list)
        self.extra_lateral_convs = nn.ModuleList(
            nn.Conv2d(self.in_channels_list[-1] if i == 0 else out_channels, out_channels, 3, stride=2, padding=1)
            for i in range(extra_levels))
        num_levels = len(self.in_channels_list) + extra_levels
        # upsamplers[i] brings level i + 1 to the size of level i.
        self.upsamplers = nn.ModuleList(build_upsampler(upsampler, channels=out_channels, scale_factor=2)
                                        for _ in range(num_levels - 1))
        self.output_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1)
                                          for _ in range(num_levels))
        self.level_names = [f"p{first_level + i}" for i in range(num_levels)]
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Xavier-uniform convs with zero bias, as ``FPN_CARAFE.init_weights``; upsamplers: see the module doc."""
        for convs in (self.lateral_convs, self.extra_lateral_convs, self.output_convs):
            for conv in convs:
                nn.init.xavier_uniform_(conv.weight)
                nn.init.zeros_(conv.bias)
        for up in self.upsamplers:
            init_upsampler_convs(up, nn.init.xavier_uniform_)

    def forward(self, features: Mapping[str, Tensor] | Sequence[Tensor]) -> OrderedDict[str, Tensor]:
        maps = list(features.values()) if isinstance(features, Mapping) else list(features)
        if len(maps) != len(self.lateral_convs):
            raise ValueError(f"expected {len(self.lateral_convs)} feature maps (channels {self.in_channels_list}), "
                             f"got {len(maps)}")
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, maps)]
        extra_input = maps[-1]
        for conv in self.extra_lateral_convs:
            extra_input = conv(extra_input)
            laterals.append(extra_input)
        for i in range(len(laterals) - 1, 0, -1):
            up = self.upsamplers[i - 1](laterals[i])
            laterals[i - 1] = laterals[i - 1] + crop_to(up, laterals[i - 1])
        return OrderedDict((name, conv(x)) for name, conv, x in zip(self.level_names, self.output_convs, laterals))

    def extra_repr(self) -> str:
        return (f"in_channels_list={self.in_channels_list}, out_channels={self.out_channels}, "
                f"extra_levels={self.extra_levels}, levels={self.level_names}")
