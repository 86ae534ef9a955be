"""CARAFE and CARAFE++: content-aware reassembly of features, for upsampling and downsampling.

    from carafe import carafe, carafe_down, CARAFEPack, CARAFEDownPack, use_backend
    from carafe import build_upsampler, build_downsampler   # the zoo of operators the papers compare
    from carafe import reassembly_kernels, reassembly_adjoint   # what a CARAFEPack reassembles from where
"""

from carafe.backends import BACKENDS, BackendUnavailableError, current_backend, use_backend
from carafe.backends.cuda import warmup as cuda_warmup
from carafe.modules import CARAFEDownPack, CARAFEPack, normalize_kernels
from carafe.analysis import chained_reassembly_adjoint, reassembly_adjoint, reassembly_kernels
from carafe.library import reassembly_flops
from carafe.ops import carafe, carafe_down, check_int, check_odd
from carafe.downsamplers import DOWNSAMPLERS, build_downsampler
from carafe.upsamplers import UPSAMPLERS, build_upsampler

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CARAFEDownPack",
    "CARAFEPack",
    "DOWNSAMPLERS",
    "UPSAMPLERS",
    "build_downsampler",
    "build_upsampler",
    "carafe",
    "carafe_down",
    "chained_reassembly_adjoint",
    "cuda_warmup",
    "check_int",
    "check_odd",
    "current_backend",
    "normalize_kernels",
    "reassembly_adjoint",
    "reassembly_flops",
    "reassembly_kernels",
    "use_backend",
]
