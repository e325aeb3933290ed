"""Calibrating a steerer's per-image decision (``FitConfig(sample_decision="accumulated")`` or
``"stacked"``) on the fitting prompts' denoising runs, through the hooks that take it at
generation time.

The control prompts (and, for a stacked decision, the source prompts) are rendered
(``decision_seeds`` seeds each) up to the start of the steerer's steering window while a session
observes; the runs' sample-gate logits then set each layer's scale, the layers' weights and the
threshold (:func:`~dsas_diffusion.steering.decision.calibrate_decision`). With
``decision_quantile=1`` a call steers an image only where its score lies above that of every
held-out control image, by ``decision_margin`` standard deviations of their scores.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import FitConfig
from ..steering import Steerer, SteeringError
from ..steering.decision import DECISION_KEY, SampleDecision, calibrate_decision
from ..steering.hooks import SteeringSession
from .collect import StopDenoising, run_until_stopped
from .steps import StepWindow

__all__ = ["calibrate_sample_decision", "check_decision_call"]


def calibrate_sample_decision(
    pipe: Any,
    steerer: Steerer,
    control_prompts: Sequence[str],
    source_prompts: Sequence[str],
    config: FitConfig,
    *,
    rows: Callable[[int], slice] | None,
    separate_cond: bool,
    num_inference_steps: int,
    batch_size: int,
    progress: bool,
    pipeline_kwargs: Mapping[str, Any],
) -> None:
    """Render ``control_prompts`` (and for a stacked decision ``source_prompts``),
    ``config.decision_seeds`` seeds each (prompt ``i`` of seed round ``r`` with
    ``torch.Generator().manual_seed(config.seed + r * len(prompts) + i)``), up to the start of
    ``config.steering_steps``, observing every layer's sample gate on ``rows`` of each call (the
    conditional half under guidance); record the decision's settings in
    ``steerer.config["decision"]``."""
    denoiser: nn.Module = pipe.denoiser
    start = config.steering_steps[0]
    stacked = config.sample_decision == "stacked"
    sets = {"control": list(control_prompts), **({"source": list(source_prompts)} if stacked else {})}
    chunks = [
        (label, round_, begin)
        for label, prompts in sets.items()
        for round_ in range(config.decision_seeds)
        for begin in range(0, len(prompts), batch_size)
    ]
    runs: dict[str, list[list[list[tuple[str, torch.Tensor]]]]] = {
        label: [[] for _ in range(config.decision_seeds)] for label in sets
    }
    for label, round_, begin in tqdm(chunks, desc="calibrate decision", disable=not progress):
        prompts = sets[label]
        chunk = prompts[begin : begin + batch_size]
        first = config.seed + round_ * len(prompts) + begin
        decision = SampleDecision(0.0, record=True)
        session = SteeringSession(steerer.layers, denoiser, strength=0.0, gated=True, decision=decision)
        session.batch_rows = rows
        window = StepWindow(
            denoiser, [session], windows=[(start, 1.0)], total=num_inference_steps, first_call_only=separate_cond
        )

        def stop(module: nn.Module, args: tuple, kwargs: dict, window: StepWindow = window) -> None:
            if window.step / window.total >= start:
                raise StopDenoising

        with session, window:
            handle = denoiser.register_forward_pre_hook(stop, with_kwargs=True)
            try:
                generators = [torch.Generator().manual_seed(first + i) for i in range(len(chunk))]
                run_until_stopped(
                    pipe,
                    chunk,
                    num_inference_steps=num_inference_steps,
                    generator=generators,
                    steering_strength=0.0,
                    **pipeline_kwargs,
                )
            finally:
                handle.remove()
        runs[label][round_].append(decision.records)
    settings, scores = calibrate_decision(
        steerer.layers,
        runs["control"],
        config.decision_quantile,
        source=runs.get("source"),
        margin=config.decision_margin,
    )
    steerer.config[DECISION_KEY] = {
        "kind": config.sample_decision,
        **settings,
        "quantile": config.decision_quantile,
        "margin": config.decision_margin,
        "samples": int(scores.numel()),
        "num_inference_steps": num_inference_steps,
    }


def check_decision_call(
    steerers: Mapping[str, Steerer], windows: Mapping[str, Any], gates: str | Mapping[str, str], steps: int
) -> None:
    """:class:`SteeringError` if a steerer that decides per image over the steps before its
    window is asked to steer, through its gates (``gates``: one word, or one per name), in a
    window that starts at 0; a warning if the call's schedule is not the one its decision was
    calibrated on."""
    for name, steerer in steerers.items():
        saved = steerer.config.get(DECISION_KEY)
        gate = gates if isinstance(gates, str) else gates.get(name, "dsas")
        if saved is None or gate == "none":
            continue
        window = windows.get(name)
        if window is None or window[0] <= 0:
            raise SteeringError(
                f"steering {name!r} decides per image from the denoising steps before its steering window, but this "
                f"call steers in {window or 'every step'}: give steering_steps starting after 0 (its saved window is "
                f"{steerer.steering_steps}) or steer uniformly with steering_gate='none'"
            )
        calibrated = saved.get("num_inference_steps")
        if calibrated is not None and int(steps) != int(calibrated):
            warnings.warn(
                f"steering {name!r} decides per image from evidence calibrated on {calibrated} denoising steps; this "
                f"call runs {steps}, on which its threshold may flag more or fewer images. Generate with "
                f"num_inference_steps={calibrated}, or refit with decision_inference_steps={steps}",
                stacklevel=4,
            )
