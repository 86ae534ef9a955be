"""CARAFE and CARAFE++: content-aware reassembly of features, for upsampling and downsampling.

    from carafe import carafe, carafe_down, CARAFEPack, CARAFEDownPack, use_backend
    from carafe import CARAFE, CARAFENaive, carafe_naive   # the rest of mmcv.ops.carafe's names
    from carafe import build_upsampler, build_downsampler   # the zoo of operators the papers compare
    from carafe import reassembly_kernels, reassembly_adjoint   # what a CARAFEPack reassembles from where

With mmengine, ``import carafe.mmengine`` (or ``custom_imports=dict(imports=['carafe.mmengine'])`` in a config)
registers the modules in its ``MODELS`` registry; that happens on ``import carafe`` too when mmengine is loaded.
"""

import sys

__version__ = "0.1.0"  # the distribution carafe-repro's version; tests/test_wheel.py checks it against pyproject.toml

from carafe.backends import BACKENDS, BackendUnavailableError, backends_used, current_backend, use_backend
from carafe.backends.cuda import warmup as cuda_warmup
from carafe.modules import CARAFE, CARAFEDownPack, CARAFENaive, CARAFEPack, carafe_naive, normalize_kernels
from carafe.analysis import chained_reassembly_adjoint, reassembly_adjoint, reassembly_kernels
from carafe.library import reassembly_flops
from carafe.ops import carafe, carafe_down
from carafe.downsamplers import DOWNSAMPLERS, build_downsampler
from carafe.upsamplers import UPSAMPLERS, build_upsampler

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "CARAFE",
    "CARAFEDownPack",
    "CARAFENaive",
    "CARAFEPack",
    "DOWNSAMPLERS",
    "UPSAMPLERS",
    "__version__",
    "backends_used",
    "build_downsampler",
    "build_upsampler",
    "carafe",
    "carafe_down",
    "carafe_naive",
    "chained_reassembly_adjoint",
    "cuda_warmup",
    "current_backend",
    "normalize_kernels",
    "reassembly_adjoint",
    "reassembly_flops",
    "reassembly_kernels",
    "use_backend",
]

if "mmengine.registry" in sys.modules:  # mmengine is in use: make dict(type='CARAFEPack', ...) configs work
    import carafe.mmengine  # noqa: F401
