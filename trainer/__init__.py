"""layerscope.trainer — the library a training script imports.

``from layerscope.trainer import watch``. Importing this package (or its
``wire`` module) must not import torch: the server imports ``wire``. ``watch`` is
loaded on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["watch"]


def __getattr__(name: str) -> Any:
    if name == "watch":
        from layerscope.trainer.watch import watch

        # Importing the submodule binds the package attribute ``watch`` to the module;
        # rebind it to the function so ``from layerscope.trainer import watch`` gets it.
        globals()["watch"] = watch
        return watch
    raise AttributeError(f"module 'layerscope.trainer' has no attribute {name!r}")
