"""The stages: one module each, found here by walking this package.

Each module defines a `StageConfig` subclass (compress.stage), which registers itself; nothing
else in the library lists stage kinds. Modules import only light things at the top (pydantic,
the contract) and the heavy libraries inside `apply`, so planning a recipe stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

from compress.stage import StageConfig, registered


def registry() -> dict[str, type[StageConfig]]:
    """kind -> config class, for every stage module in this package (imported once)."""
    for info in pkgutil.iter_modules(__path__):
        if not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")
    return registered()
