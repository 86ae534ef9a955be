"""What a network hosting a zoo upsampler needs: initialising it like the host's own convolutions, and aligning the
upsampled map with the map it is merged into. Hosts: the FPN (``tasks.common.fpn``), the detectors' mask head,
UperNet, the inpainting generators."""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn


def init_upsampler_convs(upsampler: nn.Module, init: Callable[[Tensor], object]) -> None:
    """Initialise the convolutions of a plain convolutional upsampler the way its host initialises its own convs.

    Upsamplers with a designed initialisation keep it: the zoo's operators declare it with the class attribute
    ``keeps_own_init = True`` (CARAFE's kernel prediction module; GUM, whose offset branch starts at zero so that it
    starts as bilinear upsampling); a module from outside the zoo keeps its own when it defines ``reset_parameters``
    (a bare ``nn.ConvTranspose2d`` passed as the upsampler).
    """
    if getattr(upsampler, "keeps_own_init", hasattr(upsampler, "reset_parameters")):
        return
    for m in upsampler.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            init(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def crop_to(x: Tensor, like: Tensor) -> Tensor:
    """Crop Tensor[N, C, H', W'] to ``like``'s spatial size (H, W), keeping the top-left part; needs H' >= H, W' >= W.

    Why the top-left part: ResNet halves sizes with ceiling division (stride-2 convs with padding), so a coarse map
    of ceil(H / 2) upsampled by 2 has 2 * ceil(H / 2) >= H rows; coarse pixel j is centred on fine pixel 2j, so the
    surplus row or column is the one past the fine map's bottom/right edge (mmdetection's ``FPN_CARAFE.slice_as``).

    Raises ValueError when ``x`` is smaller than ``like``, which means the upsampler did not upsample by 2.
    """
    h, w = like.shape[-2:]
    if x.shape[-2] < h or x.shape[-1] < w:
        raise ValueError(f"upsampled map {tuple(x.shape[-2:])} is smaller than the map {(h, w)} it is merged into; "
                         "the upsampler must upsample by the ratio of the two maps' sizes (2 in an FPN)")
    if x.shape[-2] == h and x.shape[-1] == w:
        return x
    return x[..., :h, :w]
