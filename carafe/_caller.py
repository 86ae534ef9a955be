"""Where a warning of the package should point: the first frame outside ``carafe`` and ``torch``."""

from __future__ import annotations

import sys

_INTERNAL = ("carafe", "torch")


def _internal(module: str) -> bool:
    return any(module == name or module.startswith(name + ".") for name in _INTERNAL)


def caller_stacklevel() -> int:
    """The ``stacklevel`` with which the function calling this one should call ``warnings.warn`` so that the warning
    names the user's line, past the operator's wrappers and torch's dispatcher, however deep they are."""
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and _internal(frame.f_globals.get("__name__", "")):
        frame = frame.f_back
        level += 1
    return level
