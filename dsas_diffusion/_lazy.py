"""Package exports imported on first use (PEP 562), so that importing a package does not
load torch, diffusers or gradio before one of its heavy names is asked for."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose name ``n`` lives in module
    ``exports[n]`` (relative to the package, e.g. ``".sweep"``).

    Examples:
        >>> getattr_, dir_ = lazy_exports("dsas_diffusion", {"read_prompts": ".prompts"})
        >>> getattr_("read_prompts").__name__
        'read_prompts'
    """

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name], package), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__
