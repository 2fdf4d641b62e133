"""shrinkit: cut a smaller, ready-to-train student out of a pretrained transformer checkpoint.

The Python API (see the README):

    import shrinkit
    res = shrinkit.subclone(parent, recipe, out="student")   # recipe: a YAML path, a dict or a Recipe
    shrinkit.plan(parent, recipe); shrinkit.inspect(parent); shrinkit.verify(parent, child)

Importing shrinkit is light (torch and transformers load on the first call). The errors the
command line maps to exit codes are shrinkit.ShrinkitError and its subclasses.
"""

from __future__ import annotations

import sys as _sys
import types as _types
from typing import TYPE_CHECKING

from .errors import OutputError, ParentError, RecipeError, ShrinkitError, UsageError
from .malloc import gomp_default as _gomp_default

from .version import __version__

_gomp_default()  # before torch loads libgomp; a no-op once torch is imported or when the user set it

if TYPE_CHECKING:  # what type checkers and editors see
    from .api import current_report, inspect, load_recipe, plan, schema, subclone, verify
    from .pipeline import Result
    from .recipe import Recipe

_API = ("subclone", "plan", "verify", "inspect", "schema", "load_recipe", "current_report")
_LAZY = {"Result": ".pipeline", "Recipe": ".recipe"}
# plan, verify and inspect are also submodules of this package; the package attribute stays the
# API function, which forwards attribute access (shrinkit.plan.resolve_target, monkeypatching) to
# the submodule, so `import shrinkit.plan as p` and `from shrinkit.plan import X` keep working.
_SHADOWED = ("plan", "verify", "inspect")


class _Entry:
    # An API function that is also a window onto the submodule of the same name.
    __slots__ = ("_name",)
    __doc__ = property(lambda self: self._func().__doc__)  # type: ignore[assignment]
    __dict__ = property(lambda self: self._module().__dict__)  # type: ignore[assignment]  # so patch/undo see the module

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def _func(self):
        from . import api

        return getattr(api, self._name)

    def _module(self):
        import importlib

        return importlib.import_module(f"{__name__}.{self._name}")

    def __call__(self, *args, **kwargs):
        return self._func()(*args, **kwargs)

    def __getattr__(self, attr):
        if attr in ("__wrapped__", "__signature__", "__annotations__", "__qualname__", "__name__"):
            f = self._func()
            return f if attr == "__wrapped__" else getattr(f, attr)
        return getattr(self._module(), attr)

    def __setattr__(self, attr, value):
        setattr(self._module(), attr, value)

    def __delattr__(self, attr):
        delattr(self._module(), attr)

    def __repr__(self):
        return f"<shrinkit.{self._name}: the API function (and module shrinkit.{self._name})>"


class _Package(_types.ModuleType):
    def __setattr__(self, name, value):
        # importing the submodule sets it as an attribute of the package: keep the API entry
        if name in _SHADOWED and isinstance(value, _types.ModuleType):
            return
        super().__setattr__(name, value)


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_sys.modules[__name__].__class__ = _Package
for _n in _SHADOWED:
    object.__setattr__(_sys.modules[__name__], _n, _Entry(_n))
del _n

__all__ = ["__version__", *_API, "Result", "Recipe", "ShrinkitError", "UsageError", "RecipeError", "ParentError",
           "OutputError"]
