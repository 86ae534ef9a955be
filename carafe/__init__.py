"""CARAFE and CARAFE++: content-aware reassembly of features, for upsampling and downsampling.

    from carafe import carafe, carafe_down, CARAFEPack, CARAFEDownPack, use_backend
"""

from carafe.backends import BACKENDS, BackendUnavailableError, current_backend, use_backend
from carafe.modules import CARAFEDownPack, CARAFEPack, normalize_kernels
from carafe.ops import carafe, carafe_down, reassembly_flops

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CARAFEDownPack",
    "CARAFEPack",
    "carafe",
    "carafe_down",
    "current_backend",
    "normalize_kernels",
    "reassembly_flops",
    "use_backend",
]
