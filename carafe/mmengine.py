"""Registers the package's modules in mmengine's ``MODELS`` registry, so mmdet / mmseg configs can name them.

    custom_imports = dict(imports=["carafe.mmengine"], allow_failed_imports=False)
    neck = dict(type="FPN_CARAFE", upsample_cfg=dict(type="carafe", up_kernel=5, ...))   # mmdet, as with mmcv
    MODELS.build(dict(type="CARAFEPack", channels=256, scale_factor=2))

Names: ``CARAFEPack``, ``CARAFEDownPack``, ``CARAFE``, ``CARAFENaive``, and ``carafe`` (mmcv's name for
``CARAFEPack``, which mmcv's ``build_upsample_layer`` and mmdet's ``FPN_CARAFE`` look up). A name that is already
taken (mmcv installed too) is left to its owner. Importing this module without mmengine raises ImportError.
"""

from __future__ import annotations

from mmengine.registry import MODELS

from carafe.modules import CARAFE, CARAFEDownPack, CARAFENaive, CARAFEPack

NAMES = {"CARAFEPack": CARAFEPack, "CARAFEDownPack": CARAFEDownPack, "CARAFE": CARAFE, "CARAFENaive": CARAFENaive,
         "carafe": CARAFEPack}


def register(registry: object = MODELS) -> list[str]:
    """Register every name of ``NAMES`` not yet in ``registry``; return the names registered."""
    added = []
    for name, cls in NAMES.items():
        # module_dict, not registry.get: get("carafe") would import this package by its dotted name.
        if name not in registry.module_dict:
            registry.register_module(name=name, module=cls)
            added.append(name)
    return added


REGISTERED = register()
