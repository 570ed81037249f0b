"""layerscope.trainer — the library a training script imports.

``from layerscope.trainer import watch``. Importing this package (or its
``wire`` module) must not import torch: the server imports ``wire``. ``watch`` is
loaded on first use.

The package attribute ``watch`` is always the function, never its submodule
``layerscope.trainer.watch`` (which stays reachable as ``sys.modules`` holds it: ``from
layerscope.trainer.watch import Watch``, ``importlib.import_module``). Python binds a
submodule to its package's attribute of the same name once it is loaded; a script that
imported ``layerscope.trainer.watch`` first (a type hint's ``Watch``, or ``layerscope
train``'s experiment module) then got the module from ``from layerscope.trainer import
watch``, and ``watch(model, optimizer)`` failed with "'module' object is not callable".
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["watch"]


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value: Any) -> None:
        if name == "watch" and isinstance(value, types.ModuleType):
            value = value.watch  # the submodule, loaded: bind its function instead
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name == "watch":
        from layerscope.trainer.watch import watch

        globals()["watch"] = watch  # also bound by _Package once the submodule is loaded
        return watch
    raise AttributeError(f"module 'layerscope.trainer' has no attribute {name!r}")
