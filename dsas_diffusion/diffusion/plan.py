"""A pipeline call's steering plan: the core's :class:`~dsas_diffusion.steering.plan.CallPlan`
plus what only denoising has: classifier-free guidance and the rows it steers, each steerer's
step window, the schedule, and whether the call runs eagerly on a compiled denoiser."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..names import CFG_MODES
from ..steering import SteeringError
from ..steering.plan import CallPlan
from .decision import check_decision_call
from .steps import check_step_window

__all__ = ["CONDITIONAL_HALF", "ImageCallPlan"]


class _RowsOfConditionalHalf:
    """``batch_rows`` for the conditional half of a ``[unconditional; conditional]`` batch."""

    def __call__(self, batch: int) -> slice:
        return slice(batch // 2, batch)


#: one object for every call: a compiled graph guards on which object it read
CONDITIONAL_HALF = _RowsOfConditionalHalf()


@dataclass(frozen=True)
class ImageCallPlan:
    """One pipeline call's steering, resolved and checked before the denoiser runs.

    Attributes:
        plan: the steerers' strengths, gates and gate recording (the core's plan).
        guidance: whether the call runs classifier-free guidance.
        cfg: ``"cond"`` (steer the conditional branch) or ``"both"``.
        separate_cond: guidance runs as separate denoiser calls, of which the first, the
            conditional one, is steered (FLUX).
        windows: each active steerer's step window (the call's, else its saved one; ``None``:
            every step).
        steps: the number of denoising steps.
    """

    plan: CallPlan
    guidance: bool
    cfg: str
    separate_cond: bool
    windows: dict[str, tuple[float, float] | None]
    steps: int

    @classmethod
    def resolve(
        cls,
        plan: CallPlan,
        *,
        guidance: bool,
        layout: str,
        cfg: str,
        window: Any,
        steps: int,
    ) -> ImageCallPlan:
        """The image part of a call's plan (``layout``: the pipeline's ``dsas_cfg_layout``,
        ``window``: the call's ``steering_steps``, checked where some steerer acts);
        :class:`SteeringError` for a call the steerers cannot serve (a per-image decision
        without steps before its window)."""
        if cfg not in CFG_MODES:
            raise SteeringError(f"steering_cfg must be one of {CFG_MODES}, got {cfg!r}")
        active = plan.active
        window = check_step_window(window) if active else None  # (a call that does not steer runs stock)
        windows = {name: window or call.steerer.steering_steps for name, call in active.items()}
        gates: Mapping[str, str] = {name: call.gate for name, call in active.items()}
        check_decision_call({name: call.steerer for name, call in active.items()}, windows, gates, steps)
        separate_cond = cfg == "cond" and guidance and layout != "batched"
        return cls(plan, guidance, cfg, separate_cond, windows, steps)

    @property
    def rows(self) -> _RowsOfConditionalHalf | None:
        """The batch rows steered: the conditional half of a batched guidance call with
        ``cfg="cond"``, else all."""
        return CONDITIONAL_HALF if self.cfg == "cond" and self.guidance and not self.separate_cond else None

    @property
    def stepped(self) -> bool:
        """Whether some active steerer steers only in a window of the steps."""
        return any(window is not None for window in self.windows.values())

    @property
    def eager(self) -> bool:
        """Whether a compiled denoiser runs this call eagerly: gate maps record every gate
        value, a step window switches steering per denoising step, and a separate conditional
        call is told from the unconditional one per call; none of these is traced."""
        return self.plan.record_gates or self.stepped or self.separate_cond

    @property
    def halves(self) -> bool:
        """Whether the gate maps hold both halves of a guidance batch."""
        return self.guidance and self.cfg == "both"
