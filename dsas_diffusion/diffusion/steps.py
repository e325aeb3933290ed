"""Which denoising step runs now: switching steering on only at chosen steps, and only on the
conditional call of pipelines that run their guidance branches as separate calls."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Sequence
from typing import Any

from torch import nn

from ..config import is_step_window
from ..steering import SteeringError
from ..steering.hooks import SteeringSession
from .collect import timestep_key

__all__ = ["StepWindow", "check_step_window"]


def check_step_window(window: Sequence[float] | None) -> tuple[float, float] | None:
    """``(start, end)`` fractions of the schedule with ``0 <= start < end <= 1``, or ``None``.

    Examples:
        >>> check_step_window((0, 0.5))
        (0.0, 0.5)
    """
    if window is None:
        return None
    try:
        start, end = (float(v) for v in window)
    except (TypeError, ValueError):
        raise SteeringError(f"steering_steps must be (start, end) fractions of the schedule, got {window!r}") from None
    if not is_step_window((start, end)):
        raise SteeringError(f"steering_steps must satisfy 0 <= start < end <= 1, got {window!r}; e.g. (0, 0.5)")
    return start, end


class StepWindow:
    """A pre-hook on the denoiser that counts denoising steps (a new timestep is a new step)
    and the calls within a step, and switches ``sessions`` on only at steps whose position
    ``step / total`` lies in the session's window (``windows``: one per session, ``None`` for
    every step) and, with ``first_call_only``, on the first call of each step (the
    conditional one in diffusers' pipelines that call the denoiser once per guidance branch).
    Sessions with a per-sample decision observe the steps before their window. Only the thread
    that entered counts.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        sessions: Sequence[SteeringSession],
        *,
        windows: Sequence[tuple[float, float] | None],
        total: int,
        first_call_only: bool = False,
    ) -> None:
        self.denoiser, self.sessions = denoiser, list(sessions)
        self.windows = list(windows)
        if len(self.windows) != len(self.sessions):
            raise ValueError(f"StepWindow: {len(self.windows)} windows for {len(self.sessions)} sessions")
        self.total, self.first_call_only = max(1, int(total)), first_call_only
        self.step, self.call, self.timestep = -1, 0, None
        self._signature = inspect.signature(denoiser.forward)
        self._owner = threading.get_ident()
        self._handle: Any = None

    def __enter__(self) -> StepWindow:
        self._handle = self.denoiser.register_forward_pre_hook(self._before, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self._owner:
            return
        key = timestep_key(self._signature.bind(*args, **kwargs).arguments.get("timestep"))
        if self.step < 0 or key is None or key != self.timestep:
            self.step, self.call, self.timestep = self.step + 1, 0, key
        else:
            self.call += 1
        position = self.step / self.total
        first = not (self.first_call_only and self.call > 0)
        for session, window in zip(self.sessions, self.windows, strict=True):
            session.active = first and (window is None or window[0] <= position < window[1])
            # a per-sample decision is taken from the steps before the window
            session.observing = first and window is not None and position < window[0] and session.decision is not None
