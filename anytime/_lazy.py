"""Module attributes imported on first use, so light imports (readers, contracts, the runtime) stay torch-free."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any


def lazy_getattr(module: str, table: dict[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` that imports `name` from `table[name]` on first access and caches it."""

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name]), name)
            setattr(sys.modules[module], name, value)
            return value
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
