"""Integrations with other libraries, registered on ``import nwcfmt`` without importing them.

transformers is heavy to import (about 1.5 s for its quantizer registry), and most users of ``nwc`` never
need it. :func:`install` therefore registers the NWC quantizer right away when transformers' quantizer
registry is already imported, and otherwise arranges for it to be registered the moment it is.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from types import ModuleType

REGISTRY_MODULE = "transformers.quantizers.auto"


INTEGRATION_MODULE = "nwcfmt.integrations.transformers"


def _register(registry: ModuleType) -> None:
    partial = sys.modules.get(INTEGRATION_MODULE)
    if partial is not None and not hasattr(partial, "register"):
        return  # the registry loads because our module is importing transformers: it registers itself when done
    from nwcfmt.integrations.transformers import register

    register(registry)


class _LoaderWithHook(importlib.abc.Loader):
    """Runs the wrapped loader, then registers nwcfmt in the freshly executed module."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self.loader.exec_module(module)
        _register(module)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """A one-shot finder: hooks the import of transformers' quantizer registry."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _LoaderWithHook(spec.loader)
        return spec


def install() -> None:
    """Register nwcfmt with transformers now if its registry is loaded, else when it gets imported."""
    registry = sys.modules.get(REGISTRY_MODULE)
    if registry is not None:
        _register(registry)
    elif not any(isinstance(finder, _RegisterOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterOnImport())
