"""Optional parts and the extras that install them: each optional subpackage checks at import
that what it needs is installed and otherwise names the ``pip install`` that brings it."""

from __future__ import annotations

import importlib.util

__all__ = ["require"]


def require(part: str, extra: str, *modules: str) -> None:
    """Raise ``ImportError`` naming ``extra`` if any of ``modules`` is not installed (looked up
    with ``importlib.util.find_spec``, which imports nothing).

    Examples:
        >>> require("dsas_diffusion.steering", "core", "torch")
        >>> require("dsas_diffusion.example", "example", "no_such_module")
        Traceback (most recent call last):
        ...
        ImportError: dsas_diffusion.example needs no_such_module, which is not installed: pip install 'dsas-diffusion[example]'
    """
    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"{part} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not installed: "
            f"pip install 'dsas-diffusion[{extra}]'"
        )
