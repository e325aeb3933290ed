"""Two guards around a steered pipeline call: one call at a time per pipeline object, and no
silently non-finite image.

* :class:`OneCallAtATime`: diffusers pipelines keep per-call state in their scheduler (its
  timesteps and step index) and tokenizers, so one pipeline object called from two threads
  at once corrupts both calls (an ``IndexError`` inside the scheduler). A second concurrent
  call on the same object is refused with a :class:`SteeringError` that says how to get a
  pipeline per thread (:meth:`~.pipelines.DSASPipelineMixin.for_thread`).
* :class:`FiniteOutputCheck`: with steering on, the denoiser's output is checked to be finite
  at every step without a device sync (the flags are combined on the device and read once
  at the end of the call), and a NaN or infinity raises :class:`ActivationError` naming the
  steerers, their strengths and any layer whose tensors are not finite, instead of a black
  image.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..steering import ActivationError, SteeringError
from ..steering.hooks import SteeringSession
from ..steering.plan import CallPlan
from ..steering.strengths import describe_strength

__all__ = [
    "COMPOSING_HOOKS",
    "FiniteOutputCheck",
    "OneCallAtATime",
    "ResidentFiniteCheck",
    "check_collection_arguments",
    "check_diffusers_hooks",
    "thread_copies",
]

#: diffusers' model hooks that steering composes with (tested): they move or cast weights
#: and leave every block's computation as it is
COMPOSING_HOOKS = frozenset(
    {
        "group_offloading",
        "lazy_prefetch_group_offloading",
        "layer_execution_tracker",
        "layerwise_casting",
        "peft_autocast_disable",
    }
)


def check_diffusers_hooks(denoiser: nn.Module) -> None:
    """Refuse steering on a denoiser with diffusers hooks that skip or reuse blocks (caches
    such as the first-block cache, layer skipping): steering hooks on a skipped block do
    not run, and a cached residual replays an earlier step's steering, so the images would
    be steered on some steps and not others. Group offloading and layerwise casting
    compose and pass."""
    found = set()
    for module in denoiser.modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            found |= set(getattr(registry, "hooks", {})) - COMPOSING_HOOKS
    if found:
        raise SteeringError(
            f"the denoiser has diffusers hooks that skip or reuse blocks ({', '.join(sorted(found))}); "
            "steering hooks would act on some steps and not on others. Disable them for steered calls "
            "(e.g. pipe.transformer.disable_cache()) or call with steering_strength=0."
        )


class OneCallAtATime:
    """``with OneCallAtATime(pipe):`` around a call; a call from another thread while one runs
    raises :class:`SteeringError`. The same thread may re-enter (a pipeline calling itself)."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.state = pipe.__dict__.setdefault("_dsas_call_state", {"lock": threading.Lock(), "owner": None, "depth": 0})

    def __enter__(self) -> OneCallAtATime:
        state, me = self.state, threading.get_ident()
        with state["lock"]:
            if state["owner"] not in (None, me):
                raise SteeringError(
                    f"this {type(self.pipe).__name__} is already running a call in another thread, and a pipeline "
                    "keeps per-call state (the scheduler's timesteps, the tokenizers' settings): give each thread "
                    "its own pipeline with pipe.for_thread(), which shares the weights"
                )
            state["owner"], state["depth"] = me, state["depth"] + 1
        return self

    def __exit__(self, *exc: Any) -> None:
        state = self.state
        with state["lock"]:
            state["depth"] -= 1
            if state["depth"] == 0:
                state["owner"] = None


class FiniteOutputCheck:
    """A forward hook on the denoiser that ANDs ``isfinite(output).all()`` over the call on the
    device; :meth:`raise_if_not_finite` reads it once."""

    def __init__(self, denoiser: nn.Module) -> None:
        self.flag: torch.Tensor | None = None
        self.handle = denoiser.register_forward_hook(self._hook)

    def _checks_this_call(self) -> bool:
        return True

    def _hook(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self._checks_this_call():
            return
        tensor = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if torch.is_tensor(tensor):
            finite = torch.isfinite(tensor).all()
            self.flag = finite if self.flag is None else self.flag & finite

    def __enter__(self) -> FiniteOutputCheck:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()

    def raise_if_not_finite(self, plan: CallPlan) -> None:
        """:class:`ActivationError` if the call steered by ``plan`` made a non-finite output."""
        if self.flag is None or bool(self.flag):
            return
        active = plan.active
        bad_layers = [f"{name}:{layer}" for name, call in active.items() for layer in call.steerer.non_finite_layers()]
        applied = ", ".join(f"{name!r} at strength {describe_strength(call.strength)}" for name, call in active.items())
        cause = (
            f"layers {bad_layers} hold NaN or infinite values: refit or reload the steering"
            if bad_layers
            else "lower the strength, or check the steering was fitted on this model"
        )
        raise ActivationError(f"steering {applied} made the denoiser's output NaN or infinite; {cause}")


class ResidentFiniteCheck(FiniteOutputCheck):
    """The check kept attached to a compiled denoiser with its resident steering: it checks the
    calls in which ``session`` acts, and its flag is a tensor from the start of each call
    (:meth:`reset`), so the traced hook is the same graph at every call."""

    def __init__(self, denoiser: nn.Module, session: SteeringSession) -> None:
        super().__init__(denoiser)
        self.session = session
        weight = next(denoiser.parameters(), None)
        self.device = torch.device("cpu") if weight is None else weight.device

    def _checks_this_call(self) -> bool:
        return self.session.in_context

    def reset(self) -> ResidentFiniteCheck:
        self.flag = torch.ones((), dtype=torch.bool, device=self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        """Kept attached: :meth:`remove` takes it off."""

    def remove(self) -> None:
        self.handle.remove()


def check_collection_arguments(collect_steps: Sequence[int] | str, num_inference_steps: Any, batch_size: Any) -> None:
    """``fit_steering``'s collection settings, checked before any run: whole numbers >= 1 and
    step indices inside the schedule."""
    for name, value in (("num_inference_steps", num_inference_steps), ("batch_size", batch_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise SteeringError(f"{name} must be a whole number >= 1, got {value!r}")
    if isinstance(collect_steps, str):
        if collect_steps != "all":
            raise SteeringError(f"collect_steps must be 'all' or a list of step indices, got {collect_steps!r}")
        return
    steps = list(collect_steps)
    if not steps or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
        raise SteeringError(f"collect_steps must be 'all' or a non-empty list of step indices, got {collect_steps!r}")
    outside = [s for s in steps if not 0 <= s < num_inference_steps]
    if outside:
        raise SteeringError(
            f"collect_steps {outside} lie outside the {num_inference_steps} collection steps "
            f"(indices 0 to {num_inference_steps - 1})"
        )


def thread_copies(pipe: Any) -> dict[str, Any]:
    """Private copies of the components that keep per-call state: the scheduler (its
    timesteps) and the tokenizers (a fast tokenizer's padding settings, which diffusers'
    ``encode_prompt`` switches in every call)."""
    copies = {"scheduler": copy.deepcopy(pipe.scheduler)}
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):
        tokenizer = getattr(pipe, name, None)
        if tokenizer is not None:
            copies[name] = copy.deepcopy(tokenizer)
    return copies
