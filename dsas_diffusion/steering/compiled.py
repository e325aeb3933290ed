"""Recognising compiled models: the module ``torch.compile`` wrapped, whether any part of a
model runs compiled, and running a call eagerly although it is.

The three ways users compile a model are told apart here: ``torch.compile(module)`` returns an
``OptimizedModule`` wrapping the module as ``_orig_mod``; ``module.compile()`` (in place) and
diffusers' regional ``compile_repeated_blocks()`` leave the module as it is and set
``_compiled_call_impl`` on it or on its repeated blocks. Nothing here imports dynamo: a model
that ``torch.compile`` touched has already imported it.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["compiled_kind", "forget_compiled_code", "is_compiled", "run_eagerly", "unwrap_compiled"]


def _optimized_module_class() -> type | None:
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", None)


def unwrap_compiled(module: nn.Module) -> nn.Module:
    """The module that ``torch.compile(module)`` wrapped (``module`` itself if not wrapped).

    Examples:
        >>> layer = nn.Linear(2, 2)
        >>> unwrap_compiled(torch.compile(layer)) is layer, unwrap_compiled(layer) is layer
        (True, True)
    """
    optimized = _optimized_module_class()
    while optimized is not None and isinstance(module, optimized):
        module = module._orig_mod
    return module


def compiled_kind(module: nn.Module) -> str | None:
    """How ``module`` is compiled: ``"wrapped"`` (``torch.compile(module)``), ``"in-place"``
    (``module.compile()``), ``"regional"`` (some submodules compiled, e.g. by diffusers'
    ``compile_repeated_blocks()``), or ``None``.

    Examples:
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        >>> compiled_kind(model)
        >>> model[0].compile()
        >>> compiled_kind(model)
        'regional'
    """
    if unwrap_compiled(module) is not module:
        return "wrapped"
    if getattr(module, "_compiled_call_impl", None) is not None:
        return "in-place"
    if any(getattr(sub, "_compiled_call_impl", None) is not None for sub in module.modules()):
        return "regional"
    return None


def is_compiled(module: nn.Module) -> bool:
    """Whether any part of ``module`` runs compiled when it is called."""
    return compiled_kind(module) is not None


@contextlib.contextmanager
def run_eagerly() -> Iterator[None]:
    """Run every compiled function eagerly inside the block (``torch.compiler.set_stance
    ("force_eager")``): compiled code neither runs nor compiles, and hooks run as Python."""
    with torch.compiler.set_stance("force_eager"):
        yield


def forget_compiled_code() -> None:
    """Drop the graphs dynamo compiled so far (``torch._dynamo.reset_code_caches()``); each
    compiled function traces again on its next call. Needed after hooks are added to a
    module that was traced without any: dynamo does not guard empty hook dictionaries, so
    the old graph would run on without the new hooks."""
    dynamo = sys.modules.get("torch._dynamo")
    if dynamo is not None:
        dynamo.reset_code_caches()
