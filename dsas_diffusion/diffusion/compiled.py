"""Steered calls of a pipeline whose denoiser runs compiled.

Whatever way the denoiser was compiled (``pipe.unet.compile()``, ``pipe.unet =
torch.compile(pipe.unet)``, ``pipe.unet.compile_repeated_blocks()``), its steering is kept
attached between calls (:class:`~dsas_diffusion.steering.resident.ResidentSteering`, with a
resident NaN check) and changed per call through tensors, so the compiled graph runs the
steering hooks without recompiling for a new strength, a new call or λ = 0. Calls that need
something a traced graph cannot do per call run eagerly instead, with the same hooks as in an
uncompiled pipeline: recording gate maps, a ``steering_steps`` window and FLUX's separate
conditional call (:attr:`~.plan.ImageCallPlan.eager`).

A steerer's first compiled use on a pipeline first runs one eager denoising step of the call
(own generator, no output) to check that each hook point is on the image stream, the check
uncompiled calls make on the fly.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..steering import Steerer
from ..steering.compiled import run_eagerly
from ..steering.hooks import Rows
from ..steering.plan import CallPlan
from ..steering.resident import ResidentSteering
from .collect import ImageStreamCheck
from .guards import ResidentFiniteCheck
from .plan import ImageCallPlan

__all__ = [
    "CompiledSteering",
    "checked_steerers",
    "probe_hook_points",
    "steer_compiled",
]

#: call arguments the probe step leaves out (it makes no images and calls back nothing)
_PROBE_DROPS = ("callback_on_step_end", "callback", "callback_steps", "generator", "output_type", "return_dict")


def checked_steerers(pipe: Any) -> weakref.WeakSet:
    """The steerers whose hook points were checked on this pipeline (on their first use)."""
    return pipe.__dict__.setdefault("_dsas_checked", weakref.WeakSet())


class CompiledSteering:
    """A pipeline's steerers kept attached to its compiled denoiser, with the NaN check."""

    def __init__(self, denoiser: nn.Module, steerers: Mapping[str, Steerer]) -> None:
        self.resident = ResidentSteering(denoiser, steerers)
        try:
            self.finite = ResidentFiniteCheck(self.resident.model, next(iter(self.resident.sessions.values())))
        except BaseException:
            self.resident.detach()
            raise

    def serves(self, denoiser: nn.Module, steerers: Mapping[str, Steerer]) -> bool:
        return self.resident.serves(denoiser, steerers)

    @contextlib.contextmanager
    def run(self, plan: CallPlan, rows: Rows) -> Iterator[ResidentFiniteCheck]:
        """Steer the denoiser calls inside the block as ``plan`` says; yields the call's NaN check."""
        with self.resident.run(plan, rows):
            yield self.finite.reset()

    def detach(self) -> None:
        self.finite.remove()
        self.resident.detach()


def probe_hook_points(
    pipe: Any,
    stock_call: Callable[..., Any],
    denoiser: nn.Module,
    steerers: Sequence[Steerer],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> None:
    """Run one eager denoising step of the call (its own generator, latents out, no callbacks,
    no progress bar) with an :class:`ImageStreamCheck` per steerer, and raise if a hook point
    is not on the image stream."""
    call = {key: value for key, value in kwargs.items() if key not in _PROBE_DROPS}
    call.update(num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    had_config = "_progress_bar_config" in pipe.__dict__
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    try:
        with run_eagerly(), contextlib.ExitStack() as stack:
            checks = [
                stack.enter_context(ImageStreamCheck(denoiser, [layer.hook_point for layer in steerer.layers]))
                for steerer in steerers
            ]
            stock_call(*args, **call)
    finally:
        if had_config:
            pipe._progress_bar_config = saved
        else:
            pipe.__dict__.pop("_progress_bar_config", None)
    for check in checks:
        check.raise_if_wrong()


def steer_compiled(
    pipe: Any,
    stock_call: Callable[..., Any],
    resident: CompiledSteering,
    call: ImageCallPlan,
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> Any:
    """The stock call steered as ``call`` says through the resident hooks of the compiled
    denoiser (the hook points of a steerer's first use probed first)."""
    checked = checked_steerers(pipe)
    unchecked = [c.steerer for c in call.plan.active.values() if c.steerer not in checked]
    if unchecked:
        probe_hook_points(pipe, stock_call, resident.resident.model, unchecked, args, kwargs)
        checked.update(unchecked)
    with resident.run(call.plan, call.rows) as finite:
        output = stock_call(*args, **kwargs)
    finite.raise_if_not_finite(call.plan)
    return output
