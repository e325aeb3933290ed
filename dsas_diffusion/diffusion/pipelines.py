"""Drop-in diffusers pipelines with DSAS: fit, load, apply and inspect steering.

Each ``DSAS*Pipeline`` is the stock diffusers class plus :class:`DSASPipelineMixin`, so
``from_pretrained``, ``from_pipe`` (no weight reload), schedulers, offloading and every
call argument work as before. Steering is added by::

    pipe.fit_steering(source_prompts, target_prompts, control_prompts)  # CAA + DSAS gates on the cross-attention
    pipe.load_steering("steering-dir")           # or a Steerer; several may be loaded
    out = pipe(prompt, steering_strength=1.0, return_gate_maps=True)
    out.images, out.gate_maps                    # gate maps: {steerer: {layer: (steps, B, H, W)}}

Hooks live only for the duration of one call and only act on that call's thread / task
(the core's scoped sessions), and they are removed when the call ends, also on an
exception; on a compiled denoiser they stay attached between calls instead (:mod:`.compiled`). A pipeline object runs one call at a time: its scheduler and tokenizers keep
per-call state, so a second call from another thread while one runs raises
:class:`SteeringError`. For concurrent requests give each thread ``pipe.for_thread()``, which
shares the weights and the loaded steerers (several threads, each with its own steering
settings, then run at once). With steering on, a NaN or infinite denoiser output raises
:class:`~dsas_diffusion.steering.ActivationError` instead of a black image.
"""

from __future__ import annotations

import contextlib
import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import (
    FluxPipeline,
    PixArtAlphaPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from torch import nn

from ..config import FitConfig
from ..names import CFG_MODES, DEFAULT_DIFFUSION_PRESET
from ..prompts import check_prompt_list
from ..steering import HookPoint, Steerer, SteeringError, fit_steerer
from ..steering.compiled import is_compiled, run_eagerly, unwrap_compiled
from ..steering.registry import DEFAULT_STEERER, SteererRegistry, fit_provenance
from ..steering.resident import drop_resident, resident_for
from .architectures import hook_points as preset_hook_points
from .collect import ImageStreamCheck, check_image_stream, record_denoiser_calls, run_denoiser_call
from .compiled import CompiledSteering, checked_steerers, steer_compiled
from .decision import calibrate_sample_decision
from .gatemaps import map_size, session_gate_maps
from .guards import (
    FiniteOutputCheck,
    OneCallAtATime,
    check_collection_arguments,
    check_diffusers_hooks,
    thread_copies,
)
from .plan import CONDITIONAL_HALF, ImageCallPlan
from .signature import steered_call, stock_call, stock_class
from .steps import StepWindow

__all__ = [
    "CFG_MODES",
    "DSASFluxPipeline",
    "DSASPipelineMixin",
    "DSASPixArtAlphaPipeline",
    "DSASStableDiffusion3Pipeline",
    "DSASStableDiffusionPipeline",
    "DSASStableDiffusionXLPipeline",
]


def _fit_sets(
    source_prompts: Sequence[str], target_prompts: Sequence[str], control_prompts: Sequence[str] | None, gate: str
) -> dict[str, list[str]]:
    """The fitting prompt sets, checked: source and target, and the control prompts that the
    gates (any ``gate`` but ``"none"``) need."""
    sets = {
        "source": check_prompt_list(source_prompts, "source_prompts"),
        "target": check_prompt_list(target_prompts, "target_prompts"),
    }
    if gate != "none" and not control_prompts:
        raise SteeringError(f"gate={gate!r} needs control prompts (prompts without the concept)")
    if control_prompts is not None:
        control_prompts = check_prompt_list(control_prompts, "control_prompts")
    if gate != "none":
        sets["control"] = control_prompts
    return sets


class DSASPipelineMixin(SteererRegistry):
    """Adds DSAS steering to a diffusers pipeline class (put it first in the bases).

    Examples:
        >>> from dsas_diffusion import DSASStableDiffusionPipeline
        >>> from dsas_diffusion.shapes import resolve_model_path
        >>> pipe = DSASStableDiffusionPipeline.from_pretrained(resolve_model_path("shapes-sd"))  # doctest: +SKIP
        >>> pipe.fit_steering(["a yellow banana on a white background"] * 16,
        ...                   ["a yellow circle on a white background"] * 16,
        ...                   ["a red square on a black background"] * 16)  # doctest: +SKIP
        >>> image = pipe("a yellow banana on a gray background", steering_strength=1.0).images[0]  # doctest: +SKIP
    """

    #: how the pipeline runs classifier-free guidance: "batched" ([uncond; cond] in one
    #: denoiser call) or "separate" (one call per branch, conditional first)
    dsas_cfg_layout = "batched"

    # -- the steerers ------------------------------------------------------------------------
    @property
    def denoiser(self) -> nn.Module:
        """The pipeline's ``unet`` or ``transformer`` (the module itself where it was wrapped by
        ``torch.compile``)."""
        return unwrap_compiled(self._denoiser_as_called())

    def _denoiser_as_called(self) -> nn.Module:
        for attribute in ("unet", "transformer"):
            module = getattr(self, attribute, None)
            if isinstance(module, nn.Module):
                return module
        raise SteeringError(f"{type(self).__name__} has neither a unet nor a transformer to steer")

    steering_modality = "image"

    def _steering_target(self) -> nn.Module:
        return self.denoiser

    # -- fitting ---------------------------------------------------------------------------
    def fit_steering(
        self,
        source_prompts: Sequence[str],
        target_prompts: Sequence[str],
        control_prompts: Sequence[str] | None = None,
        config: FitConfig | None = None,
        *,
        collect_steps: Sequence[int] | str = "all",
        num_inference_steps: int = 10,
        batch_size: int = 8,
        name: str = DEFAULT_STEERER,
        progress: bool = True,
        pipeline_kwargs: Mapping[str, Any] | None = None,
        **settings: Any,
    ) -> Steerer:
        """Fit a steerer from three prompt lists, make it active under ``name`` and return it.

        Args:
            source_prompts: prompts showing the concept to remove.
            target_prompts: the same prompts with the concept replaced (paired or not).
            control_prompts: prompts steering must leave alone (needed for ``gate="dsas"``).
            config: what to fit (default :meth:`FitConfig.for_diffusion`: CAA and DSAS gates on
                the cross-attention outputs, gates exactly 0 below an opening of 0.5, λ up to
                16); ``settings`` override its fields, e.g. ``map="linear-act"``,
                ``preset="blocks"``, ``hook_points=[...]``, ``gate_floor=0.0``.
            collect_steps: denoising steps whose activations are collected (``"all"`` or indices).
            num_inference_steps: the schedule used for collection.
            batch_size: prompts per collection run.
            pipeline_kwargs: extra pipeline call arguments during collection (e.g. ``guidance_scale``).

        Examples:
            >>> steerer = pipe.fit_steering(source, target, control, map="linear-act")  # doctest: +SKIP
        """
        # every name and number is checked before the first collection run
        config = FitConfig.build(config if config is not None else FitConfig.for_diffusion(), **settings)
        if config.gate != "dsas":  # calibration and the floor belong to DSAS gates
            config = config.replace(gate_calibration="none", gate_floor=0.0)
        sets = _fit_sets(source_prompts, target_prompts, control_prompts, config.gate)
        check_collection_arguments(collect_steps, num_inference_steps, batch_size)
        seed = config.seed
        denoiser = self.denoiser
        if config.hook_points is not None:
            points = [HookPoint.coerce(p) for p in config.hook_points]
        else:
            points = preset_hook_points(denoiser, config.preset or DEFAULT_DIFFUSION_PRESET)
        record = dict(
            steps=collect_steps,
            num_inference_steps=num_inference_steps,
            batch_size=batch_size,
            seed=seed,
            progress=progress,
            steering_strength=0.0,  # collect on the unsteered model, even with other steerers loaded
            **dict(pipeline_kwargs or {}),
        )
        with run_eagerly() if is_compiled(self._denoiser_as_called()) else contextlib.nullcontext():
            calls = {
                label: record_denoiser_calls(self, denoiser, list(prompts), name=f"{label} prompts", **record)
                for label, prompts in sets.items()
            }
            check_image_stream(denoiser, points, calls["source"][0])
            provenance = self._fit_provenance(config, collect_steps, num_inference_steps, sets)
            steerer = fit_steerer(
                denoiser,
                points,
                calls["source"],
                calls["target"],
                calls.get("control"),
                config,
                forward=lambda call: run_denoiser_call(denoiser, call),
                mask_fn=lambda call: None,
                provenance=provenance,
                progress=progress,
            )
            if config.sample_decision != "per-layer":
                extra = dict(pipeline_kwargs or {})
                self._calibrate_decision(steerer, sets["control"], sets["source"], config, batch_size, progress, extra)
        return self._register(name, steerer)

    def _fit_provenance(
        self,
        config: FitConfig,
        collect_steps: Sequence[int] | str,
        num_inference_steps: int,
        sets: Mapping[str, Sequence[str]],
    ) -> dict[str, Any]:
        """What a steerer fitted on this pipeline records of where it came from."""
        denoiser = self.denoiser
        return fit_provenance(
            "image",
            denoiser,
            self,
            pipeline_class=type(self).__name__,
            denoiser_class=type(denoiser).__name__,
            preset=None if config.hook_points is not None else config.preset,
            collect_steps=collect_steps if isinstance(collect_steps, str) else list(collect_steps),
            num_inference_steps=num_inference_steps,
            prompts={label: list(prompts) for label, prompts in sets.items()},
        )

    def _calibrate_decision(
        self,
        steerer: Steerer,
        control_prompts: Sequence[str],
        source_prompts: Sequence[str],
        config: FitConfig,
        batch_size: int,
        progress: bool,
        pipeline_kwargs: dict[str, Any],
    ) -> None:
        """Calibrate ``steerer``'s per-image decision on the control prompts' denoising runs,
        observed on the conditional rows, as a call steers them."""
        guided, batched = self._guidance_on(pipeline_kwargs), self.dsas_cfg_layout == "batched"
        calibrate_sample_decision(
            self,
            steerer,
            control_prompts,
            source_prompts,
            config,
            rows=CONDITIONAL_HALF if guided and batched else None,
            separate_cond=guided and not batched,
            num_inference_steps=config.decision_inference_steps or self._call_default("num_inference_steps"),
            batch_size=batch_size,
            progress=progress,
            pipeline_kwargs=pipeline_kwargs,
        )

    # -- generation ------------------------------------------------------------------------
    def _call_default(self, name: str) -> Any:
        """The stock call's default value of argument ``name``."""
        return inspect.signature(super().__call__).parameters[name].default  # type: ignore[misc]

    @staticmethod
    def _prompt_count(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
        """How many prompts a call has (``None``: not told by ``prompt`` or ``prompt_embeds``)."""
        prompt = args[0] if args else kwargs.get("prompt")
        if isinstance(prompt, str):
            return 1
        if isinstance(prompt, (list, tuple)):
            return len(prompt)
        embeds = kwargs.get("prompt_embeds")
        return int(embeds.shape[0]) if torch.is_tensor(embeds) else None

    def _guidance_on(self, kwargs: Mapping[str, Any]) -> bool:
        scale = kwargs.get("guidance_scale")
        if scale is None:
            scale = self._call_default("guidance_scale")
        if getattr(self.denoiser.config, "time_cond_proj_dim", None) is not None:
            return False  # guidance-distilled UNets (LCM) embed the scale instead of batching
        if self.dsas_cfg_layout == "separate":
            true_scale = kwargs.get("true_cfg_scale", 1.0)
            return true_scale is not None and true_scale > 1 and kwargs.get("negative_prompt") is not None
        return scale is not None and scale > 1

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Give each pipeline class a ``__call__`` with its stock signature and docstring plus
        the steering arguments (:mod:`.signature`); a subclass that defines its own keeps it."""
        super().__init_subclass__(**kwargs)
        stock = stock_call(cls, DSASPipelineMixin)
        if stock is not None and "__call__" not in vars(cls):
            cls.__call__ = steered_call(stock, cls)  # type: ignore[method-assign]

    def to_json_string(self) -> str:
        """The pipeline's ``model_index.json``, naming the stock class: a saved DSAS pipeline
        is a stock pipeline folder that any diffusers loader opens (steerers are not
        pipeline components and are not saved with it; save them with
        ``steerer.save_pretrained``)."""
        config = json.loads(super().to_json_string())  # type: ignore[misc]
        stock = stock_class(type(self), DSASPipelineMixin)
        if stock is not None and config.get("_class_name") == type(self).__name__:
            config["_class_name"] = stock.__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _steered_call(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        steering_strength: float | Sequence[float] | Mapping[str, Any] | None = None,
        steering_gate: str | bool | Mapping[str, str] = "dsas",
        steering_cfg: str = "cond",
        steering_steps: tuple[float, float] | None = None,
        return_gate_maps: bool = False,
    ) -> Any:
        """The stock pipeline call (``args``, ``kwargs``) with steering; the arguments are
        documented in :data:`.signature.STEERING_DOC`."""
        with OneCallAtATime(self):
            return self._dsas_call(
                args, kwargs, steering_strength, steering_gate, steering_cfg, steering_steps, return_gate_maps
            )

    def for_thread(self) -> Any:
        """A pipeline for another thread: the same models (no weight copy) and steerers, its own
        scheduler and tokenizers, which keep per-call state. One pipeline object runs one call at
        a time; a second concurrent call raises :class:`SteeringError`.

        Examples:
            >>> worker = pipe.for_thread()  # doctest: +SKIP
        """
        pipe = type(self).from_pipe(self, **thread_copies(self))
        for name, steerer in self.steerers.items():
            pipe.load_steering(steerer, name=name)
        return pipe

    def _dsas_call(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        steering_strength: float | Sequence[float] | Mapping[str, Any] | None,
        steering_gate: str | bool | Mapping[str, str],
        steering_cfg: str,
        steering_steps: tuple[float, float] | None,
        return_gate_maps: bool,
    ) -> Any:
        plan = self._plan(
            steering_strength,
            steering_gate,
            prompts=self._prompt_count(args, kwargs),
            repeat=kwargs.get("num_images_per_prompt") or 1,
            record_gates=return_gate_maps,
        )
        steps = kwargs.get("num_inference_steps") or self._call_default("num_inference_steps")
        call = ImageCallPlan.resolve(
            plan,
            guidance=self._guidance_on(kwargs),
            layout=self.dsas_cfg_layout,
            cfg=steering_cfg,
            window=steering_steps,
            steps=steps,
        )
        if not plan.calls:
            drop_resident(self)
            if steering_strength not in (None, 0, 0.0) or return_gate_maps:
                raise SteeringError("no steering is loaded: call fit_steering(...) or load_steering(dir) first")
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        active = plan.active
        if return_gate_maps and all(c.gate == "none" for c in active.values()):
            raise SteeringError("gate maps come from the DSAS gates: use steering_gate='dsas' with return_gate_maps")
        denoiser = self.denoiser
        # on a compiled denoiser the hooks stay attached, also through unsteered calls: the
        # unsteered graph is traced with them (inactive) once and reused
        resident = None
        if is_compiled(self._denoiser_as_called()):
            resident = resident_for(self, denoiser, self._steerer_table(), CompiledSteering)
        if not active:
            return super().__call__(*args, **kwargs)  # type: ignore[misc]
        check_diffusers_hooks(denoiser)
        if resident is not None and not call.eager:
            return steer_compiled(self, super().__call__, resident, call, args, kwargs)  # type: ignore[misc]
        return self._steer_eagerly(call, resident is not None, args, kwargs)

    def _steer_eagerly(self, call: ImageCallPlan, compiled: bool, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The stock call with the plan's sessions attached (on a compiled denoiser, run
        eagerly), its step window, the hook-point check of a steerer's first use, the NaN
        check and the gate maps."""
        denoiser, plan = self.denoiser, call.plan
        checked, checks = checked_steerers(self), []
        with contextlib.ExitStack() as stack:
            if compiled:  # the hooks below run as Python: compiled code runs eagerly
                stack.enter_context(run_eagerly())
            for steering in plan.active.values():
                if steering.steerer not in checked:  # first use on this pipeline: is each hook on the image stream?
                    points = [layer.hook_point for layer in steering.steerer.layers]
                    checks.append((steering.steerer, stack.enter_context(ImageStreamCheck(denoiser, points))))
            sessions = plan.open(denoiser, stack, rows=call.rows)
            if call.stepped or call.separate_cond:
                windows = [call.windows[name] for name in sessions]
                stack.enter_context(
                    StepWindow(
                        denoiser,
                        list(sessions.values()),
                        windows=windows,
                        total=call.steps,
                        first_call_only=call.separate_cond,
                    )
                )
            finite = stack.enter_context(FiniteOutputCheck(denoiser))
            output = super().__call__(*args, **kwargs)  # type: ignore[misc]
        finite.raise_if_not_finite(plan)
        for steerer, check in checks:
            check.raise_if_wrong()
            checked.add(steerer)
        if plan.record_gates:
            size = map_size(self, kwargs, output)
            maps = {
                name: session_gate_maps(session, halves=call.halves, size=size)
                for name, session in sessions.items()
                if session.gated  # (a steerer steered uniformly has no gates to map)
            }
            if isinstance(output, tuple):
                return (*output, maps)
            output["gate_maps"] = maps
        return output


class DSASStableDiffusionPipeline(DSASPipelineMixin, StableDiffusionPipeline):
    """``StableDiffusionPipeline`` (SD 1.x / 2.x, ``shapes-sd``) with DSAS steering."""


class DSASStableDiffusionXLPipeline(DSASPipelineMixin, StableDiffusionXLPipeline):
    """``StableDiffusionXLPipeline`` with DSAS steering."""


class DSASStableDiffusion3Pipeline(DSASPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3 / SD3.5, ``shapes-mmdit``) with DSAS steering."""


class DSASFluxPipeline(DSASPipelineMixin, FluxPipeline):
    """``FluxPipeline`` with DSAS steering (double- and single-stream blocks)."""

    dsas_cfg_layout = "separate"


class DSASPixArtAlphaPipeline(DSASPipelineMixin, PixArtAlphaPipeline):
    """``PixArtAlphaPipeline`` with DSAS steering."""
