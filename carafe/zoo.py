"""The name -> operator registry behind ``build_upsampler`` and ``build_downsampler``."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from torch import nn


class Registry:
    """Operators of one direction by name, each a class plus the options that name implies.

    ``build`` accepts a name, a mapping with ``type`` or ``name`` (plus options), a class, or a callable (such as
    ``functools.partial`` or a Hydra ``_partial_`` object); unknown names raise ``KeyError`` listing the known ones.
    """

    def __init__(self, kind: str, entries: Mapping[str, tuple[type[nn.Module], Mapping[str, Any]]]) -> None:
        self.kind = kind
        self._entries = {name: (cls, dict(opts)) for name, (cls, opts) in entries.items()}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def entry(self, name: str) -> tuple[type[nn.Module], dict[str, Any]]:
        """The class and the fixed options registered under ``name``."""
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self._entries)}")
        cls, opts = self._entries[name]
        return cls, dict(opts)

    def build(self, spec: object, **kwargs: Any) -> nn.Module:
        if isinstance(spec, str):
            cls, opts = self.entry(spec)
            return cls(**{**opts, **kwargs})
        if isinstance(spec, Mapping):
            spec = dict(spec)
            keys = [k for k in ("type", "name") if k in spec]
            if len(keys) != 1:
                raise ValueError(f"a {self.kind} config needs exactly one of 'type' or 'name', got keys {sorted(spec)}")
            name = spec.pop(keys[0])
            if not isinstance(name, str):
                raise TypeError(f"{self.kind} {keys[0]} must be a string, got {name!r}")
            cls, opts = self.entry(name)
            return cls(**{**opts, **spec, **kwargs})
        if isinstance(spec, Callable):
            module = spec(**kwargs)
            if not isinstance(module, nn.Module):
                raise TypeError(f"{self.kind} factory {spec!r} returned {type(module).__name__}, not an nn.Module")
            return module
        raise TypeError(f"cannot build a {self.kind} from {type(spec).__name__}; pass a name "
                        f"({', '.join(self._entries)}), a mapping with 'type', a class or a callable")
