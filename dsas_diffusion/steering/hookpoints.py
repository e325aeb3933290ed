"""Naming where to steer: hook points, module lookup, output selection, layouts and pooling.

A hook point is a module name (as in ``model.named_modules()``), which element of the
module's output is the activation (``None`` for the output itself, an ``int`` for a
tuple element, a ``str`` for a dict / ``ModelOutput`` key), whether the module's output or
its input is read (``reads``: the input is the first positional tensor argument, else the
``hidden_states`` keyword) and the activation layout:

* ``"channels_last"``: features on the last dimension, ``(B, N, C)`` tokens or ``(B, C)``;
* ``"channels_first"``: features on dimension 1, ``(B, C, H, W)`` feature maps;
* ``"auto"``: 4-D and 5-D outputs are channels-first, everything else channels-last.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..names import GATE_READS
from .compiled import unwrap_compiled
from .context import ContextReader
from .errors import ActivationError, UnknownModuleError

__all__ = [
    "LAYOUTS",
    "HookPoint",
    "feature_dim",
    "gate_reading",
    "get_output",
    "pool",
    "position_rows",
    "read_input",
    "register_reader",
    "replace_output",
    "resolve_layout",
    "resolve_module",
    "same_positions",
]

LAYOUTS = ("auto", "channels_last", "channels_first")


@dataclass(frozen=True)
class HookPoint:
    """Where to read and steer an activation.

    Examples:
        >>> HookPoint("transformer.h.3")                       # a decoder block's output
        HookPoint(module='transformer.h.3', output_index=None, layout='auto', reads='output')
        >>> HookPoint("down_blocks.1.resnets.0", layout="channels_first")
        HookPoint(module='down_blocks.1.resnets.0', output_index=None, layout='channels_first', reads='output')
        >>> HookPoint("mid_block.attentions.0.transformer_blocks.0.attn2", reads="input").key
        'mid_block.attentions.0.transformer_blocks.0.attn2:input'
    """

    module: str
    output_index: int | str | None = None
    layout: str = "auto"
    reads: str = "output"

    def __post_init__(self) -> None:
        if not isinstance(self.module, str):
            raise UnknownModuleError(f"hook point module must be a module name (str), got {self.module!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        if self.reads not in GATE_READS:
            raise ValueError(f"reads must be one of {GATE_READS}, got {self.reads!r}")
        if self.reads == "input" and self.output_index is not None:
            raise ValueError(
                f"hook point {self.module!r} reads the module's input, which has no output_index; "
                f"set output_index=None (it is {self.output_index!r})"
            )

    @property
    def key(self) -> str:
        """The name its activations are kept under: the module name, with ``":input"`` or
        ``":context"`` appended when the gate reads those (a module name never holds a colon)."""
        return self.module if self.reads == "output" else f"{self.module}:{self.reads}"

    def reading(self, reads: str, source: str | None = None) -> HookPoint:
        """Where a gate reading ``reads`` of this point's module reads: the point itself for
        ``"output"``, the module's input (same layout) for ``"input"``, the context of its
        tokens (:mod:`.context`; the output still tells the tokens) for ``"context"``, or the
        context of the module ``source`` (a decoder layer, whose output is its tokens)."""
        if source is not None:
            if reads != "context":
                raise ValueError(f"a gate reads another module's context only, not gate_reads={reads!r}")
            return HookPoint(source, None, self.layout, reads="context")
        if reads == "output":
            return self
        return HookPoint(self.module, None if reads == "input" else self.output_index, self.layout, reads=reads)

    @classmethod
    def coerce(cls, value: HookPoint | str | Mapping[str, Any]) -> HookPoint:
        """Accept a ``HookPoint``, a module name, or a dict of ``HookPoint`` fields."""
        if isinstance(value, HookPoint):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, Mapping):
            return cls(**value)
        raise TypeError(f"cannot make a HookPoint from {type(value).__name__}: {value!r}")

    def to_dict(self) -> dict[str, Any]:
        entry = {"module": self.module, "output_index": self.output_index, "layout": self.layout}
        return entry if self.reads == "output" else {**entry, "reads": self.reads}


def same_positions(a: torch.Tensor, b: torch.Tensor, dim: int) -> bool:
    """Whether ``a`` and ``b`` have the same positions: equal shapes but for the features on ``dim``.

    Examples:
        >>> same_positions(torch.ones(2, 5, 3), torch.ones(2, 5, 8), -1), same_positions(torch.ones(2, 4, 3), torch.ones(2, 5, 3), -1)
        (True, False)
    """
    if a.ndim != b.ndim:
        return False
    if dim == -1:
        return a.shape[:-1] == b.shape[:-1]
    keep = [i for i in range(a.ndim) if i != dim % a.ndim]
    return all(a.shape[i] == b.shape[i] for i in keep)


def resolve_module(model: nn.Module, name: str) -> nn.Module:
    """Return ``model``'s submodule ``name`` (of the module ``torch.compile`` wrapped, for a
    compiled one); on a miss, raise with the closest names."""
    model = unwrap_compiled(model)
    try:
        return model.get_submodule(name)  # walks the name's path only
    except AttributeError:
        pass
    modules = dict(model.named_modules())
    if name in modules:
        return modules[name]
    close = difflib.get_close_matches(name, list(modules), n=5, cutoff=0.5)
    hint = f" Closest names: {', '.join(close)}." if close else ""
    raise UnknownModuleError(
        f"{type(model).__name__} has no module named {name!r}.{hint} "
        "List the valid names with [n for n, _ in model.named_modules()]."
    )


def get_output(output: Any, index: int | str | None, where: str = "") -> torch.Tensor:
    """Pick the activation tensor out of a module's output."""
    value = output
    if index is not None and torch.is_tensor(output):
        raise ActivationError(
            f"module {where!r} returned {_describe(output)}, not a tuple or dict: set the hook point's "
            f"output_index to None (it is {index!r})."
        )
    if index is not None:
        try:
            value = output[index]
        except (IndexError, KeyError, TypeError) as error:
            raise ActivationError(
                f"module {where!r} returned {_describe(output)}, which has no element "
                f"{index!r}; set the hook point's output_index to one that exists."
            ) from error
    if not torch.is_tensor(value):
        raise ActivationError(
            f"module {where!r} returned {_describe(output)} and output_index={index!r} selects "
            f"{_describe(value)}, not a tensor; set output_index to the element holding the "
            "hidden states (0 for most tuple outputs)."
        )
    return value


def read_input(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str = "") -> torch.Tensor:
    """A module call's input activation: its first positional argument if that is a tensor,
    else its ``hidden_states`` keyword argument (how diffusers' blocks are called).

    Examples:
        >>> x = torch.ones(1, 2)
        >>> read_input((x,), {}) is x, read_input((), {"hidden_states": x}) is x
        (True, True)
    """
    if args and torch.is_tensor(args[0]):
        return args[0]
    value = kwargs.get("hidden_states")
    if torch.is_tensor(value):
        return value
    raise ActivationError(
        f"module {where!r} was called without a tensor as its first argument or as hidden_states=, so "
        "a gate cannot read its input; read its output (reads='output') or hook another module"
    )


def gate_reading(
    module: nn.Module, point: HookPoint, handles: list[Any]
) -> Callable[[tuple, Mapping[str, Any], Any], torch.Tensor]:
    """What ``point`` reads of one call of ``module``, as a function of the call's positional
    and keyword arguments and its output: the output element, the input (``reads="input"``)
    or the tokens' context (``reads="context"``, :mod:`.context`). A hook it needs before
    the call is registered on ``module`` and its handle appended to ``handles``."""
    if point.reads == "context":
        reader = ContextReader(module, point.module)
        handles.append(reader.register(module))
        return lambda args, kwargs, output: reader(
            args, kwargs, get_output(output, point.output_index, point.module).shape[1]
        )
    if point.reads == "input":
        return lambda args, kwargs, output: read_input(args, kwargs, point.module)
    return lambda args, kwargs, output: get_output(output, point.output_index, point.module)


def register_reader(module: nn.Module, point: HookPoint, read: Callable[[torch.Tensor], None]) -> list[Any]:
    """Register a forward hook on ``module`` passing what ``point`` reads of every call
    (:func:`gate_reading`) to ``read``; returns the handles placed (remove them all)."""
    if point.reads == "output":

        def output_hook(module: nn.Module, args: tuple, output: Any) -> None:
            read(get_output(output, point.output_index, point.module))

        return [module.register_forward_hook(output_hook)]
    handles: list[Any] = []
    reading = gate_reading(module, point, handles)

    def reading_hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        read(reading(args, kwargs, output))

    try:
        handles.append(module.register_forward_hook(reading_hook, with_kwargs=True))
    except BaseException:
        for handle in handles:
            handle.remove()
        raise
    return handles


def replace_output(output: Any, index: int | str | None, value: torch.Tensor) -> Any:
    """Return ``output`` with the activation at ``index`` replaced by ``value``."""
    if index is None:
        return value
    if isinstance(output, tuple) and not hasattr(output, "_fields"):
        items = list(output)
        items[index] = value
        return tuple(items)
    if isinstance(output, tuple):  # namedtuple
        return output._replace(**{output._fields[index]: value})
    if isinstance(output, list):
        items = list(output)
        items[index] = value
        return items
    replaced = copy.copy(output)
    replaced[index] = value
    return replaced


def resolve_layout(tensor: torch.Tensor, layout: str) -> str:
    if layout != "auto":
        return layout
    return "channels_first" if tensor.ndim >= 4 else "channels_last"


def feature_dim(layout: str) -> int:
    return 1 if layout == "channels_first" else -1


def position_rows(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """View an activation as ``(B, positions, C)``."""
    if tensor.ndim < 2:
        raise ActivationError(f"expected an activation with a batch and a feature dimension, got {tuple(tensor.shape)}")
    if layout == "channels_first":
        return tensor.flatten(2).transpose(1, 2)
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def pool(tensor: torch.Tensor, layout: str, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over positions per sample, in float32: ``(B, C)``; ``mask`` is ``(B, positions)``."""
    rows = position_rows(tensor, layout).float()
    if mask is None:
        return rows.mean(dim=1)
    weights = mask.reshape(rows.shape[0], -1).to(device=rows.device, dtype=rows.dtype)
    if weights.shape[1] != rows.shape[1]:
        raise ActivationError(
            f"padding mask has {weights.shape[1]} positions per sample but the activation has "
            f"{rows.shape[1]}; pass the attention mask of the batch that produced it."
        )
    total = weights.sum(dim=1, keepdim=True)
    if bool((total == 0).any()):
        raise ActivationError("a sample's padding mask is all zeros: every sample needs at least one real token")
    return (rows * weights.unsqueeze(-1)).sum(dim=1) / total


def _describe(value: Any) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        return f"a {type(value).__name__} of {len(value)} elements"
    return f"a {type(value).__name__}"
