"""How a steerer is fitted: one typed, frozen :class:`FitConfig` that every entry point builds
or takes (``fit_steerer``, both ``fit_steering``s, ``dsas fit``, the app, the shipped examples,
``dsas eval``), validated once, saved in ``steering_config.json`` and read back.

The defaults are written here and nowhere else: the dataclass fields are the core's (the
method as published: Linear-AcT, pooled gates, 5 PCA components), :meth:`FitConfig.for_diffusion`
holds the diffusion pipelines' defaults and :meth:`FitConfig.for_text` the language models'.
This module imports neither torch nor any other heavy package, so the command line can print
its help from it.

Examples:
    >>> config = FitConfig.for_diffusion(map="linear-act")
    >>> config.map, config.preset, config.gate_floor
    ('linear-act', 'cross-attention', 0.5)
    >>> FitConfig.from_dict(config.to_dict()) == config
    True
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, get_args

from .errors import SteeringError
from .names import (
    DEFAULT_DIFFUSION_PRESET,
    DEFAULT_TEXT_PRESET,
    FIT_GATES,
    GATE_ACTIVATIONS,
    GATE_CALIBRATIONS,
    GATE_FIT_ON,
    GATE_READS,
    MAP_NAMES,
    SAMPLE_DECISIONS,
)

__all__ = ["FitConfig", "LinEASConfig", "is_step_window"]

MapName = Literal["caa", "iti", "linear-act", "lineas"]
GateKind = Literal["dsas", "none", "e2e"]
GateFitOn = Literal["pooled", "positions", "contrast"]
GateReads = Literal["output", "input", "context"]
GateCalibration = Literal["none", "control-positions", "two-sided"]
GateActivation = Literal["sigmoid", "relu", "step"]
SampleDecision = Literal["per-layer", "accumulated", "stacked"]
OnNoGate = Literal["raise", "warn"]
ItiProbe = Literal["logistic", "mean_diff"]


@dataclass
class LinEASConfig:
    """Training settings of LinEAS / end-to-end DSAS.

    Attributes:
        steps: optimiser steps.
        lr: Adam learning rate (cosine-decayed to 0 over ``steps``).
        batch_size: pooled source samples per step, at least (whole input batches are drawn).
        l1: weight of the elementwise L1 part of the sparse group lasso on ``(w - 1, b)``.
        group_l1: weight of the per-layer group part (selects layers).
        control_weight: γ, weight of the control-set retention term (end-to-end DSAS only).
        seed: seed of the batch order.
    """

    steps: int = 1000
    lr: float = 1e-3
    batch_size: int = 4
    l1: float = 0.0
    group_l1: float = 0.0
    control_weight: float = 1.0
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fail(message: str) -> None:
    raise SteeringError(message)


def _check(condition: bool, message: str) -> None:
    if not condition:
        _fail(message)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_step_window(value: Any) -> bool:
    """Whether ``value`` is a ``(start, end)`` window of the denoising schedule: two finite
    numbers with ``0 <= start < end <= 1``.

    Examples:
        >>> is_step_window((0.5, 1)), is_step_window([0.5, 0.2]), is_step_window(None)
        (True, False, False)
    """
    try:
        start, end = value
    except (TypeError, ValueError):
        return False
    return _is_number(start) and _is_number(end) and 0 <= start < end <= 1


@dataclass(frozen=True)
class FitConfig:
    """Every setting of a fit (what to fit and where); the inputs and the model are given
    separately. Build it with a preset and overrides, e.g. ``FitConfig.for_diffusion(map="iti")``,
    or change one with :meth:`replace`. Invalid values raise a ``SteeringError`` naming them.

    Attributes:
        map: ``"caa"``, ``"iti"``, ``"linear-act"`` or ``"lineas"``.
        gate: ``"dsas"`` (PCA + logistic gates fitted on source vs control), ``"none"`` (uniform
            steering only) or ``"e2e"`` (gates trained jointly with LinEAS maps).
        preset: named hook points of the model family (diffusion: ``"cross-attention"``,
            ``"blocks"``, ``"norms"``; text: ``"residual"``, ``"attention"``, ``"mlp"``,
            ``"norms"``), used when ``hook_points`` is ``None`` (``None``: the family's default,
            ``"cross-attention"`` or ``"residual"``).
        hook_points: module names (or ``HookPoint`` objects) to hook instead of a preset.
        layers: text models: the decoder layers the preset covers (default all).
        n_components, gate_l2, cv_folds, gate_activation: the gate's PCA rank, L2 weight,
            cross-validation folds and ``"sigmoid"``, ``"relu"`` (clipped at 1) or ``"step"`` (0 or 1:
            with a calibration, fully open exactly above the calibrated control quantile).
        gate_threshold: layers whose gate accuracy is below it are not steered when gated
            (``None`` keeps all); ``accuracy_scaling`` scales each gate by its accuracy.
        gate_fit_on: ``"pooled"`` (one row per sample, as published), ``"positions"``
            (``positions_per_sample`` sampled positions per sample) or ``"contrast"`` (the
            source positions that differ most from the paired target; ``contrast_level`` is
            the relative threshold).
        gate_reads: what each gate reads at its module: ``"output"``, the activation it steers
            (as published), or ``"input"``, the module's input at the same positions (for a
            cross-attention, its query input: the image being drawn, before the prompt enters), or
            ``"context"`` (language models, at decoder layers or attention modules): the mean of
            the cached attention values each token attends to, a causal summary of its prefix.
        context_layer: text models, with ``gate_reads="context"``: every gate reads the context
            of this decoder layer (negative numbers count from the end; it must run before every
            steered layer), ``None`` each its own.
        sample_gate: also fit, per layer, a gate on the mean over each sample's positions of
            what the gate reads (does this sample show the concept at all?); its value multiplies
            the gate at every position. Calibrated so that ``1 - sample_quantile`` of control
            samples open it past 0.05 and the lowest ``sample_concept_quantile`` of source samples
            reach ``concept_level`` (where the fit allows both).
        sample_decision: with sample gates, ``"per-layer"`` (each layer's sample gate scales its
            own gates at every step) or ``"accumulated"`` (diffusion pipelines: one decision per
            image, steer or not, from the mean of every layer's standardised sample-gate logit
            over the denoising steps before ``steering_steps``, whose start must then be above
            0; its threshold is the ``decision_quantile`` of the control prompts' images,
            rendered with ``decision_seeds`` seeds each on a schedule of
            ``decision_inference_steps``, ``None`` for the pipeline's default: the evidence
            depends on the schedule, so calibrate on the one you generate with) or
            ``"stacked"`` (the same, with the layers weighted by a logistic regression on
            source against control images of every seed round but the last, whose control
            images set the threshold; needs ``decision_seeds >= 2``). The threshold never lies on
            a control image's score, where rounding would decide it: it lies midway to the next
            score above the quantile, or, above the highest, ``decision_margin`` standard
            deviations of the control scores higher.
        steering_steps: the saved default ``(start, end)`` window of denoising steps a pipeline
            steers in, as fractions of the schedule (``None``: every step); a call's
            ``steering_steps`` overrides it. As with a call's window, steered calls on a
            compiled denoiser then run eagerly.
        gate_calibration: ``"none"``, ``"control-positions"`` (lower each gate's bias so that
            at most ``1 - calibration_quantile`` of control positions open it past 0.05) or
            ``"two-sided"`` (also put the median concept position at ``concept_level``).
        gate_floor: gates opened less than this are exactly 0; 0 keeps the plain sigmoid.
        support_quantiles: Linear-AcT's source support, ``None`` for everywhere.
        iti_alpha, iti_probe: ITI's step (a number or ``"auto"``) and direction.
        lineas: LinEAS training settings (default: ``LinEASConfig(seed=seed)``).
        incremental, incremental_gates: fit maps (gates) layer by layer with the layers
            upstream steered.
        strength: the saved default λ; ``max_strength`` the largest accepted (``None``: no bound).
        max_imbalance: refuse input sets whose sizes differ by more than this factor.
        on_no_gate: ``"raise"`` when no gate reaches ``gate_threshold``, or ``"warn"``.
        seed: seed of position sampling, cross-validation and training.
    """

    map: MapName = "linear-act"
    gate: GateKind = "dsas"
    preset: str | None = None
    hook_points: tuple[Any, ...] | None = None
    layers: tuple[int, ...] | None = None
    n_components: int = 5
    gate_l2: float = 1.0
    cv_folds: int = 5
    gate_threshold: float | None = 0.75
    accuracy_scaling: bool = False
    gate_fit_on: GateFitOn = "pooled"
    gate_reads: GateReads = "output"
    context_layer: int | None = None
    sample_gate: bool = False
    sample_quantile: float = 0.99
    sample_concept_quantile: float = 0.25
    sample_decision: SampleDecision = "per-layer"
    decision_quantile: float = 1.0
    decision_margin: float = 0.01
    decision_seeds: int = 2
    decision_inference_steps: int | None = None
    steering_steps: tuple[float, float] | None = None
    gate_calibration: GateCalibration = "none"
    calibration_quantile: float = 0.99
    concept_level: float = 0.9
    gate_floor: float = 0.0
    contrast_level: float = 0.5
    positions_per_sample: int = 16
    gate_activation: GateActivation = "sigmoid"
    support_quantiles: tuple[float, float] | None = (0.0, 1.0)
    iti_alpha: float | Literal["auto"] = "auto"
    iti_probe: ItiProbe = "logistic"
    lineas: LinEASConfig | None = None
    incremental: bool = False
    incremental_gates: bool = False
    strength: float = 1.0
    max_strength: float | None = None
    max_imbalance: float = 4.0
    on_no_gate: OnNoGate = "raise"
    seed: int = 0

    # -- presets ------------------------------------------------------------------------------
    @classmethod
    def for_diffusion(cls, **overrides: Any) -> FitConfig:
        """The diffusion pipelines' defaults (``docs/removal.md`` measured them on ``shapes-sd``):
        CAA on the cross-attention outputs, 20 gate components, gates calibrated on control
        positions and exactly 0 below an opening of 0.5, no Linear-AcT support, λ up to 16."""
        settings: dict[str, Any] = dict(
            map="caa",
            preset=DEFAULT_DIFFUSION_PRESET,
            n_components=20,
            gate_calibration="control-positions",
            gate_floor=0.5,
            max_strength=16.0,
            support_quantiles=None,
        )
        return cls.build(None, **{**settings, **overrides})

    @classmethod
    def for_text(cls, **overrides: Any) -> FitConfig:
        """The language models' defaults (``docs/text.md`` measured them on ``shapes-lm``): CAA
        on the residual stream of every decoder layer, gates reading the context (the mean of
        the cached attention values each token attends to) fitted on the source positions
        located by contrast with the paired target, calibrated on control positions and exactly
        0 below an opening of 0.5, 20 gate components, every layer kept. ``FitConfig()`` is the
        method as published (Linear-AcT, pooled gates on each token's own activation)."""
        settings: dict[str, Any] = dict(
            map="caa",
            preset=DEFAULT_TEXT_PRESET,
            n_components=20,
            gate_threshold=None,
            gate_reads="context",
            gate_fit_on="contrast",
            gate_calibration="control-positions",
            gate_floor=0.5,
            support_quantiles=None,
        )
        return cls.build(None, **{**settings, **overrides})

    @classmethod
    def build(cls, config: FitConfig | None = None, **overrides: Any) -> FitConfig:
        """``config`` (default: the core's defaults) with ``overrides`` applied; an unknown
        name raises a ``SteeringError`` listing the known ones."""
        base = config if config is not None else cls()
        if not isinstance(base, FitConfig):
            _fail(f"config must be a FitConfig, got {type(base).__name__}")
        unknown = sorted(set(overrides) - set(cls.field_names()))
        if unknown:
            _fail(f"unknown fit settings {unknown}; the settings are {', '.join(cls.field_names())}")
        return dataclasses.replace(base, **overrides) if overrides else base

    @staticmethod
    def field_names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(FitConfig))

    def replace(self, **changes: Any) -> FitConfig:
        """A copy with ``changes`` (validated)."""
        return FitConfig.build(self, **changes)

    # -- validation ---------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._normalise()
        self._check_names()
        self._check_numbers()
        self._check_gate_settings()
        self._check_decision()

    def _normalise(self) -> None:
        """Sequences (lists, ranges) as tuples, LinEAS settings as a :class:`LinEASConfig`."""
        for name in ("hook_points", "layers", "support_quantiles", "steering_steps"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, (tuple, str, Mapping)):  # lists, ranges
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.lineas, Mapping):
            object.__setattr__(self, "lineas", LinEASConfig(**self.lineas))

    def _check_names(self) -> None:
        """Every setting that names a choice names one of its choices."""
        for name, allowed in (
            ("map", MAP_NAMES),
            ("gate", FIT_GATES),
            ("gate_fit_on", GATE_FIT_ON),
            ("gate_reads", GATE_READS),
            ("gate_calibration", GATE_CALIBRATIONS),
            ("gate_activation", GATE_ACTIVATIONS),
            ("sample_decision", SAMPLE_DECISIONS),
            ("on_no_gate", get_args(OnNoGate)),
            ("iti_probe", get_args(ItiProbe)),
        ):
            value = getattr(self, name)
            _check(value in allowed, f"{name} must be one of {allowed}, got {value!r}")

    def _check_numbers(self) -> None:
        """Every number lies in its range."""
        _check(
            self.max_strength is None or (_is_number(self.max_strength) and self.max_strength > 0),
            f"max_strength must be a positive number or None, got {self.max_strength!r}",
        )
        _check(
            _is_number(self.gate_floor) and 0.0 <= self.gate_floor < 1.0,
            f"gate_floor must lie in [0, 1), got {self.gate_floor!r}",
        )
        for name, low in (("n_components", 1), ("cv_folds", 2), ("positions_per_sample", 1), ("decision_seeds", 1)):
            value = getattr(self, name)
            _check(_is_int(value) and value >= low, f"{name} must be an integer >= {low}, got {value!r}")
        _check(
            self.gate_threshold is None or (_is_number(self.gate_threshold) and 0 <= self.gate_threshold <= 1),
            f"gate_threshold must be None or a number in [0, 1], got {self.gate_threshold!r}",
        )
        for name in (
            "calibration_quantile",
            "concept_level",
            "contrast_level",
            "sample_quantile",
            "sample_concept_quantile",
        ):
            value = getattr(self, name)
            _check(_is_number(value) and 0 < value < 1, f"{name} must lie in (0, 1), got {value!r}")
        _check(
            _is_number(self.max_imbalance) and self.max_imbalance >= 1,
            f"max_imbalance must be >= 1, got {self.max_imbalance!r}",
        )
        _check(
            _is_number(self.gate_l2) and self.gate_l2 > 0, f"gate_l2 must be a positive number, got {self.gate_l2!r}"
        )
        _check(
            self.iti_alpha == "auto" or (_is_number(self.iti_alpha) and self.iti_alpha > 0),
            f"iti_alpha must be 'auto' or a positive number, got {self.iti_alpha!r}",
        )
        quantiles = self.support_quantiles
        _check(
            quantiles is None
            or (
                len(quantiles) == 2 and all(_is_number(q) for q in quantiles) and 0 <= quantiles[0] < quantiles[1] <= 1
            ),
            f"support_quantiles must be None or (low, high) with 0 <= low < high <= 1, got {quantiles!r}",
        )
        _check(_is_number(self.strength), f"strength must be a finite number, got {self.strength!r}")
        steps = self.steering_steps
        _check(
            steps is None or is_step_window(steps),
            f"steering_steps must be None or (start, end) with 0 <= start < end <= 1, got {steps!r}",
        )

    def _check_gate_settings(self) -> None:
        """Gate settings that hold only together: end-to-end gates with LinEAS, step and sample
        gates with DSAS, what the gates read, context layers, contrast."""
        _check(
            self.gate != "e2e" or self.map == "lineas",
            "gate='e2e' trains gates jointly with LinEAS maps: use map='lineas'",
        )
        _check(
            self.gate_activation != "step" or self.gate == "dsas",
            "gate_activation='step' has no gradient to train: use it with gate='dsas'",
        )
        _check(
            not self.sample_gate or self.gate == "dsas",
            "sample_gate=True fits a second DSAS gate per layer: use it with gate='dsas'",
        )
        _check(
            self.gate_reads == "output" or (self.gate == "dsas" and not self.incremental_gates),
            f"gate_reads={self.gate_reads!r} is fitted with gate='dsas' and without incremental_gates",
        )
        _check(
            self.context_layer is None or (_is_int(self.context_layer) and self.gate_reads == "context"),
            f"context_layer={self.context_layer!r} names the decoder layer whose context the gates read: an integer, "
            "with gate_reads='context'",
        )
        _check(
            not (self.uses_contrast and self.incremental_gates),
            "incremental_gates refits gates on upstream-steered activations; it does not combine with "
            "gate_fit_on='contrast' or gate_calibration='two-sided'",
        )

    def _check_decision(self) -> None:
        """The per-sample decision's settings, and what it needs of the sample gates and the window."""
        _check(
            self.decision_inference_steps is None
            or (_is_int(self.decision_inference_steps) and self.decision_inference_steps >= 2),
            f"decision_inference_steps must be None or an integer >= 2, got {self.decision_inference_steps!r}",
        )
        _check(
            _is_number(self.decision_quantile) and 0 < self.decision_quantile <= 1,
            f"decision_quantile must lie in (0, 1], got {self.decision_quantile!r}",
        )
        _check(
            _is_number(self.decision_margin) and self.decision_margin > 0,
            f"decision_margin must be a positive number, got {self.decision_margin!r}",
        )
        _check(
            self.sample_decision == "per-layer"
            or (self.sample_gate and self.steering_steps is not None and self.steering_steps[0] > 0),
            f"sample_decision={self.sample_decision!r} decides from the sample gates over the denoising steps "
            "before steering: use it with sample_gate=True and steering_steps starting after 0, e.g. (0.5, 1.0)",
        )
        _check(
            self.sample_decision != "stacked" or self.decision_seeds >= 2,
            "sample_decision='stacked' fits its weights on all seed rounds but the last and sets its threshold on "
            f"the last: decision_seeds must be at least 2, got {self.decision_seeds!r}",
        )

    @property
    def uses_contrast(self) -> bool:
        """Whether the fit locates the concept's positions by contrast with the paired target."""
        return self.gate == "dsas" and (self.gate_fit_on == "contrast" or self.gate_calibration == "two-sided")

    # -- persistence --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (hook points as ``{"module", "output_index", "layout"}``)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "lineas" and value is not None:
                value = value.to_dict()
            elif f.name == "hook_points" and value is not None:
                value = [_point_dict(point) for point in value]
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FitConfig:
        """The config saved by :meth:`to_dict` (unknown keys from a newer release are refused)."""
        return cls.build(None, **dict(data))

    @classmethod
    def from_saved_config(cls, saved: Mapping[str, Any]) -> FitConfig:
        """The fit settings of a steering file's ``config``: its ``fit_config``, or for files
        written before it existed, the settings those files recorded (others at the core's
        defaults)."""
        if "fit_config" in saved:
            return cls.from_dict(saved["fit_config"])
        names = set(cls.field_names()) - {"preset", "hook_points", "layers", "strength"}
        known = {name: saved[name] for name in names if saved.get(name) is not None}
        for name in ("support_quantiles", "gate_threshold", "max_strength"):  # None is a setting here
            if name in saved and saved[name] is None:
                known[name] = None
        return cls.build(None, **known)


def _point_dict(point: Any) -> Any:
    if isinstance(point, str):
        return point
    return {"module": point.module, "output_index": point.output_index, "layout": point.layout}
