"""Test-only stand-in for ``torchvision`` (never installed, never shipped).

PyPI's torchvision cannot load beside the CPU torch build CI uses ("operator torchvision::nms
does not exist"), yet SGLang's EPLB modules reach ``import torchvision`` through multimodal
config modules that the EPLB code never calls. Tests that import those SGLang modules put
``tests/sglang_stubs`` first on ``sys.path`` (see ``tests/sglang_env.py``); every
``torchvision.*`` submodule then resolves to an empty module whose attributes are inert
placeholders, so the import chain completes and any real use fails loudly.

transformers sees the package through ``importlib.util.find_spec``; with no dist-info it
imports it and reads ``__version__`` (checked against transformers 5.19).
"""

from __future__ import annotations

import enum
import importlib.abc
import importlib.machinery
import sys
import types

__version__ = "0.0.0+eplbstub"
IS_EPLB_PLUGIN_STUB = True


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


class _Placeholder:
    """Stands for any torchvision class or function; using it raises."""

    def __init__(self, name: str):
        self._name = name

    def __call__(self, *args, **kwargs):
        raise RuntimeError(f"{self._name} is a test stand-in (tests/sglang_stubs): not usable")

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Placeholder(f"{self._name}.{attr}")

    def __mro_entries__(self, bases):  # ``class X(torchvision.Y)`` still defines X
        return (object,)


def _module_getattr(module_name: str):
    def __getattr__(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        if attr == "InterpolationMode":
            return InterpolationMode
        return _Placeholder(f"{module_name}.{attr}")

    return __getattr__


class _StubModuleLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []  # a package, so deeper submodules import too
        module.__getattr__ = _module_getattr(module.__name__)  # type: ignore[attr-defined]


class _StubFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(__name__ + "."):
            return importlib.machinery.ModuleSpec(fullname, _StubModuleLoader(), is_package=True)
        return None


if not any(isinstance(f, _StubFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _StubFinder())

__getattr__ = _module_getattr(__name__)
