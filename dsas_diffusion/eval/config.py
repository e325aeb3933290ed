"""What one evaluation runs: model, concept, prompts, seeds, strengths and the method grid.

A config is a YAML or JSON file with the fields of :class:`EvalConfig`; every field can also
be given (or overridden) on the command line. Relative prompt-file paths are read relative
to the config file. Example (``benchmarks/eval_banana.yaml``)::

    model: shapes-sd
    concept: banana
    source: ../dsas_diffusion/shapes/prompts/banana/source.txt
    target: ../dsas_diffusion/shapes/prompts/banana/target.txt
    control: ../dsas_diffusion/shapes/prompts/banana/control.txt
    concept_prompts: ../dsas_diffusion/shapes/prompts/banana/eval_concept.txt
    control_prompts: ../dsas_diffusion/shapes/prompts/banana/eval_control.txt
    pairs_prompts: ../dsas_diffusion/shapes/prompts/banana/eval_pairs.txt
    seeds: [0, 1]
    strengths: auto        # each method its own range: doubling from sweep.start (see SweepSettings)
    methods: [caa/none, caa/dsas, linear-act/none, linear-act/dsas, lineas/none, lineas/dsas]
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import FitConfig
from ..names import CFG_MODES, FIT_COLLECTION_ARGUMENTS
from ..prompts import read_prompts
from ..steering.errors import PromptFileError
from .methods import ALL_METHODS, ConfigError, Method, parse_method

__all__ = ["ALL_METHODS", "ConfigError", "EvalConfig", "Method", "SweepSettings", "load_config", "parse_method"]


@dataclass(frozen=True)
class SweepSettings:
    """How ``strengths: auto`` sweeps each method: strengths ``start``, ``start * factor``,
    ``start * factor**2`` ... until one of

    * the concept presence (the Shapes detector where it applies, else CLIP presence) changed
      by less than ``plateau`` between the last two strengths, once it has moved at least
      ``moved`` away from the unsteered images (so a sweep does not stop before it starts:
      with 64 concept images one image is 1.6 points, and at small strengths presence
      creeps by a point or two a step, which would pass for a plateau);
    * the control similarity fell below ``min_similarity``;
    * the next strength would pass ``max`` or the steerer's own ``max_strength`` (it would be
      refused).

    ``starts`` gives a method its own start (``{"lineas/dsas": 0.25}``); ``grids`` gives a
    method a fixed list of settings instead (the baselines: ``{"negative-prompt": [5, 7.5]}``).
    """

    start: float = 0.5
    factor: float = 2.0
    max: float = 64.0
    plateau: float = 0.02
    moved: float = 0.1
    min_similarity: float = 0.5
    starts: Mapping[str, float] = field(default_factory=dict)
    grids: Mapping[str, Sequence[float]] = field(default_factory=dict)

    def start_for(self, method: str) -> float:
        return float(self.starts.get(method, self.start))

    def grid_for(self, method: str) -> list[float] | None:
        """A baseline's settings (``bad-words`` has one, 1), ``None`` for a swept method."""
        grid = self.grids.get(method, [1.0] if method == "bad-words" else None)
        return None if grid is None else sorted(float(v) for v in grid)


@dataclass
class EvalConfig:
    """One evaluation. Prompt fields take a list of prompts or a text file (one a line).

    Fields:
        model: a diffusers model id or path, or a Shapes name (``shapes-sd``).
        concept: the concept's name, used in the zero-shot caption and the Shapes detector.
        source / target / control: prompt sets to fit steerers on (see ``fit_steering``).
        steering: an already fitted steering directory instead of the three sets; the methods
            are then that steerer's map, uniform and with its gates.
        concept_prompts / control_prompts: evaluation prompts, separate from the fitting ones.
        pairs_prompts: optional two-object prompts, one object carrying the concept, for the
            spatial test (is the concept object removed and the other one kept?).
        pairs_screen_seeds: with the Shapes detector, screen each pair prompt's unsteered
            image over seeds ``0 .. pairs_screen_seeds - 1`` and run the spatial test on the
            first ``len(seeds)`` seeds whose unsteered image shows both objects (the test
            only counts such images; screening puts every rendered pair to use). ``None``
            (default): the pairs use ``seeds`` like the other groups.
        empty_seeds: render the empty prompt ``""`` with seeds ``0 .. empty_seeds - 1`` at every
            setting: the concept nobody asked for (``None``: no such group).
        seeds, strengths: every prompt is rendered with every seed at every strength
            (strength 0, the unsteered image, is always included). ``strengths: auto`` (the
            default) sweeps each method over its own range (``sweep``).
        sweep: a mapping of :class:`SweepSettings` fields.
        thresholds: control similarities at which the report reads each method's operating
            point (see :mod:`.operating`).
        bootstrap: bootstrap replicates for the intervals (0: none).
        methods: ``"all"`` or a list such as ``["caa/none", "caa/dsas", "lineas/e2e"]``.
        clip_model / clip_pretrained: the open_clip scorer (default: ``shapes-clip`` for
            Shapes models, ``ViT-B-32`` / ``openai`` otherwise).
        concept_template / neutral_caption: zero-shot concept presence captions.
        num_inference_steps, guidance_scale, height, width: the pipeline call.
        steering_cfg: ``"cond"`` (default) or ``"both"`` (see the pipelines' ``steering_cfg``).
        fit: extra ``fit_steering`` arguments (``collect_steps``, ``n_components``,
            ``gate_threshold``, ``gate_calibration``...).
        batch_size: images per pipeline call.
        score_batch_size: images per CLIP forward pass (fixed chunks: sharding does not
            change a score).
        grid_prompts: prompts per group shown in the image grids.
        detector: ``"auto"`` (the exact Shapes detector for Shapes models), ``"shapes"``
            or ``"none"``.
        max_new_tokens, similarity, concept_words, classifier, classifier_label: language
            models only (see :mod:`.text`): continuation length; the control measure
            (``"prefix_match"``, default, or ``"exact_match"``); the word-list scorer's words
            (default: the concept); an ``AutoModelForSequenceClassification`` folder as an
            extra scorer (e.g. toxicity) and the label it scores (default: its last).
        out: output directory.
        cache_dir: where images are cached (default ``out/images``); runs that share it
            render each image once.
        device: where the pipeline and the scorer run (default: CUDA if available).
    """

    model: str = "shapes-sd"
    concept: str = ""
    source: list[str] | None = None
    target: list[str] | None = None
    control: list[str] | None = None
    steering: str | None = None
    concept_prompts: list[str] = field(default_factory=list)
    control_prompts: list[str] = field(default_factory=list)
    pairs_prompts: list[str] = field(default_factory=list)
    pairs_screen_seeds: int | None = None
    empty_seeds: int | None = None
    seeds: list[int] = field(default_factory=lambda: [0])
    strengths: list[float] | str = "auto"
    sweep: dict[str, Any] = field(default_factory=dict)
    thresholds: list[float] = field(default_factory=lambda: [0.98, 0.95])
    bootstrap: int = 1000
    methods: list[str] | str = "all"
    clip_model: str | None = None
    clip_pretrained: str | None = None
    concept_template: str = "a picture of a {concept}"
    neutral_caption: str = "a picture of something"
    num_inference_steps: int = 25
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    steering_cfg: str = "cond"
    fit: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 16
    score_batch_size: int = 32
    grid_prompts: int = 3
    detector: str = "auto"
    max_new_tokens: int = 40
    similarity: str = "prefix_match"
    concept_words: list[str] | None = None
    classifier: str | None = None
    classifier_label: str | None = None
    out: str = "outputs/eval"
    cache_dir: str | None = None
    device: str | None = None

    # -- derived ---------------------------------------------------------------------------
    @property
    def method_list(self) -> list[Method]:
        names = ALL_METHODS if self.methods == "all" else self.methods
        if isinstance(names, str):
            names = [names]
        return [parse_method(name) for name in names]

    @property
    def adaptive(self) -> bool:
        """Whether each method is swept over its own range (``strengths: auto``)."""
        return isinstance(self.strengths, str)

    @property
    def strength_list(self) -> list[float]:
        """Sorted fixed strengths, 0 first (only 0 for an adaptive sweep)."""
        if self.adaptive:
            return [0.0]
        return sorted({0.0, *(float(s) for s in self.strengths)})

    @property
    def sweep_settings(self) -> SweepSettings:
        return SweepSettings(**self.sweep)

    def use_shapes_detector(self) -> bool:
        from ..shapes import is_shapes_world

        return self.detector == "shapes" or (self.detector == "auto" and is_shapes_world(self.model))

    def generation_settings(self) -> dict[str, Any]:
        """Everything besides method, strength, prompt and seed that decides an image."""
        return {
            "model": self.model,
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
            "height": self.height,
            "width": self.width,
            "steering_cfg": self.steering_cfg,
        }

    def validate(self) -> EvalConfig:
        """Raise :class:`ConfigError` naming the first problem."""
        self._validate_types()
        if not self.concept or not str(self.concept).strip():
            raise ConfigError("concept is empty: name the concept to remove (e.g. concept: banana)")
        for name in ("concept_prompts", "control_prompts"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is empty: give a prompt file or a list of evaluation prompts")
        if self.steering is None:
            for name in ("source", "target", "control"):
                if not getattr(self, name):
                    raise ConfigError(
                        f"{name} prompts are missing: give source, target and control prompt files to fit "
                        "steerers, or steering: <a fitted steering directory>"
                    )
        elif not (Path(self.steering) / "steering_config.json").is_file():
            raise ConfigError(f"steering: {self.steering!r} is not a steering directory (no steering_config.json)")
        if not self.seeds or not all(isinstance(s, int) and not isinstance(s, bool) for s in self.seeds):
            raise ConfigError(f"seeds must be a non-empty list of integers, got {self.seeds!r}")
        self._validate_strengths()
        if self.pairs_screen_seeds is not None:
            if not self.pairs_prompts or not self.use_shapes_detector():
                raise ConfigError(
                    "pairs_screen_seeds needs pairs_prompts and the Shapes detector (it reads which unsteered "
                    "pair images show both objects); remove it or add them"
                )
            if self.pairs_screen_seeds < len(self.seeds):
                raise ConfigError(
                    f"pairs_screen_seeds ({self.pairs_screen_seeds}) must be at least the number of seeds "
                    f"({len(self.seeds)})"
                )
        methods = self.method_list
        if not methods:
            raise ConfigError("methods is empty: give 'all' or a list like ['linear-act/none', 'linear-act/dsas']")
        for method in methods:
            if method.is_baseline and not (self.adaptive and self.sweep_settings.grid_for(method.name)):
                raise ConfigError(
                    f"method {method.name!r} is swept over its own settings: use strengths: auto and give "
                    f"sweep.grids.{method.name} (e.g. [5, 7.5, 10])"
                )
        if self.empty_seeds is not None and not (self.empty_seeds >= 1 and self.use_shapes_detector()):
            raise ConfigError(
                "empty_seeds needs a number >= 1 and the Shapes detector (it reads what is drawn unasked)"
            )
        if self.steering_cfg not in CFG_MODES:
            raise ConfigError(f"steering_cfg must be one of {CFG_MODES}, got {self.steering_cfg!r}")
        if self.detector not in ("auto", "shapes", "none"):
            raise ConfigError(f"detector must be 'auto', 'shapes' or 'none', got {self.detector!r}")
        if "{concept}" not in self.concept_template:
            raise ConfigError(f"concept_template must contain '{{concept}}', got {self.concept_template!r}")
        if min(self.batch_size, self.score_batch_size, self.num_inference_steps) < 1:
            raise ConfigError("batch_size, score_batch_size and num_inference_steps must be at least 1")
        if not isinstance(self.fit, Mapping):
            raise ConfigError(f"fit must be a mapping of fit_steering arguments, got {self.fit!r}")
        try:
            FitConfig.build(None, **{k: v for k, v in self.fit.items() if k not in FIT_COLLECTION_ARGUMENTS})
        except ValueError as error:  # a SteeringError
            raise ConfigError(f"fit: {error} (or one of {FIT_COLLECTION_ARGUMENTS})") from None
        if not isinstance(self.thresholds, Sequence) or not all(
            isinstance(v, (int, float)) and 0 < v <= 1 for v in self.thresholds
        ):
            raise ConfigError(f"thresholds must be a list of control similarities in (0, 1], got {self.thresholds!r}")
        if not isinstance(self.bootstrap, int) or isinstance(self.bootstrap, bool) or self.bootstrap < 0:
            raise ConfigError(f"bootstrap must be a number of replicates >= 0, got {self.bootstrap!r}")
        return self

    def _validate_types(self) -> None:
        """Each scalar field of the right type (a YAML ``height: big`` is an error, not ignored)."""
        kinds: dict[str, tuple[type, ...]] = {
            "model": (str,),
            "concept": (str,),
            "steering": (str, type(None)),
            "clip_model": (str, type(None)),
            "clip_pretrained": (str, type(None)),
            "concept_template": (str,),
            "neutral_caption": (str,),
            "num_inference_steps": (int,),
            "guidance_scale": (int, float, type(None)),
            "height": (int, type(None)),
            "width": (int, type(None)),
            "steering_cfg": (str,),
            "batch_size": (int,),
            "score_batch_size": (int,),
            "grid_prompts": (int,),
            "detector": (str,),
            "out": (str,),
            "cache_dir": (str, type(None)),
            "device": (str, type(None)),
            "bootstrap": (int,),
            "pairs_screen_seeds": (int, type(None)),
            "empty_seeds": (int, type(None)),
            "max_new_tokens": (int,),
            "similarity": (str,),
            "classifier": (str, type(None)),
            "classifier_label": (str, type(None)),
        }
        for name, allowed in kinds.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, allowed):
                names = " or ".join("null" if k is type(None) else k.__name__ for k in allowed)
                raise ConfigError(f"{name} must be {names}, got {value!r}")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None and (value < 8 or value % 8):
                raise ConfigError(f"{name} must be a multiple of 8 (at least 8), got {value}")

    def _validate_strengths(self) -> None:
        if isinstance(self.strengths, str):
            if self.strengths != "auto":
                raise ConfigError(f"strengths must be 'auto' or a list of numbers, got {self.strengths!r}")
            if not isinstance(self.sweep, Mapping):
                raise ConfigError(f"sweep must be a mapping of {list(SweepSettings.__dataclass_fields__)}")
            try:
                settings = self.sweep_settings
            except TypeError as error:
                raise ConfigError(f"sweep: {error}; known keys: {list(SweepSettings.__dataclass_fields__)}") from None
            numbers = [
                settings.start,
                settings.factor,
                settings.max,
                settings.plateau,
                settings.moved,
                settings.min_similarity,
            ]
            if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in numbers) or not (
                0 < settings.start <= settings.max and settings.factor > 1 and settings.plateau >= 0
            ):
                raise ConfigError(
                    f"sweep: need 0 < start <= max, factor > 1 and plateau >= 0 (finite numbers), got {self.sweep!r}"
                )
            for name, value in dict(settings.starts).items():
                parse_method(name)
                if not isinstance(value, (int, float)) or not 0 < value <= settings.max:
                    raise ConfigError(f"sweep.starts[{name!r}] must be a number in (0, max], got {value!r}")
            for name, grid in dict(settings.grids).items():
                parse_method(name)
                if (
                    isinstance(grid, (str, bytes))
                    or not isinstance(grid, Sequence)
                    or not grid
                    or not all(
                        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
                        for v in grid
                    )
                ):
                    raise ConfigError(f"sweep.grids[{name!r}] must be a non-empty list of numbers > 0, got {grid!r}")
            return
        try:
            values = [float(s) for s in self.strengths]
        except (TypeError, ValueError):
            raise ConfigError(f"strengths must be 'auto' or numbers, got {self.strengths!r}") from None
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(f"strengths must be a non-empty list of finite numbers >= 0, got {self.strengths!r}")
        if len(self.strength_list) < 2:
            raise ConfigError("strengths: give at least one strength above 0 (0, the unsteered image, is implied)")


def _read_prompt_field(value: Any, base: Path, name: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        path = Path(value)
        if not path.is_absolute():
            path = base / path
        try:
            return read_prompts(path)
        except PromptFileError as error:
            raise ConfigError(f"{name}: {error}") from None
    if isinstance(value, Sequence) and all(isinstance(p, str) for p in value):
        return [p.strip() for p in value if p.strip()]
    raise ConfigError(f"{name} must be a prompt file or a list of prompts, got {value!r}")


PROMPT_FIELDS = ("source", "target", "control", "concept_prompts", "control_prompts", "pairs_prompts")


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> EvalConfig:
    """Read a YAML / JSON config (optional) and apply ``overrides`` (``None`` values skipped).

    Examples:
        >>> config = load_config(None, {"concept": "banana", "concept_prompts": ["a yellow banana on a white background"],
        ...                             "control_prompts": ["a red square on a black background"],
        ...                             "steering": None, "source": ["a"], "target": ["b"], "control": ["c"]})
        >>> [m.name for m in config.method_list][:2]
        ['caa/none', 'caa/dsas']
    """
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        text = path.read_text()
        try:
            if path.suffix.lower() == ".json":
                raw = json.loads(text)
            else:
                import yaml

                raw = yaml.safe_load(text) or {}
        except Exception as error:
            raise ConfigError(f"config file {str(path)!r} is not valid {path.suffix[1:] or 'YAML'}: {error}") from None
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields")
        base = path.resolve().parent
    raw = dict(raw)
    cli_base = Path.cwd()
    known = {f.name for f in dataclasses.fields(EvalConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown config fields {unknown}; known fields: {sorted(known)}")
    values: dict[str, Any] = {}
    for name, value in raw.items():
        values[name] = _read_prompt_field(value, base, name) if name in PROMPT_FIELDS else value
        if name == "steering" and value is not None and not Path(value).is_absolute():
            values[name] = str(base / value)
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        if name not in known:
            raise ConfigError(f"unknown config field {name!r}")
        values[name] = _read_prompt_field(value, cli_base, name) if name in PROMPT_FIELDS else value
    try:
        config = EvalConfig(**values)
    except TypeError as error:
        raise ConfigError(str(error)) from None
    return config.validate()
