"""What the demo does for a request: generate the three images, sweep the strength, fit a
steering from pasted prompt lists, and find the steering a request names."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..names import MAP_NAMES
from ..shapes import EXAMPLES_DIR, example_steerings
from ..steering import IncompatibleSteeringError, Steerer, SteeringError
from ..steering.persistence import CONFIG_NAME
from .images import sweep_strip
from .serving import ModelEntry, request_pipeline
from .validation import (
    LIMITS,
    GenerateSettings,
    InputError,
    check_prompt,
    integer,
    parse_prompt_list,
    validate_settings,
)

__all__ = [
    "GenerateResult",
    "batch_key",
    "checked_settings",
    "describe_steerer",
    "fit_from_text",
    "generate",
    "generate_many",
    "resolve_steering",
    "strength_sweep",
]


def default_steering_roots() -> list[Path]:
    """Where the page may open steering directories by default: the shipped examples and
    ``./outputs`` (where ``make demo`` and ``dsas fit --out outputs/...`` write)."""
    return [EXAMPLES_DIR, Path("outputs")]


def _allowed(path: Path, roots: Sequence[Path]) -> bool:
    resolved = path.resolve()
    return any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in roots)


def resolve_steering(
    choice: str,
    directory: str | None = None,
    fitted: Steerer | None = None,
    *,
    model: ModelEntry | None = None,
    roots: Sequence[Path] | None = None,
) -> Steerer:
    """The steerer a request asks for: a shipped example's name, ``"directory"`` (then
    ``directory`` is read, if it lies under one of ``roots``, default
    :func:`default_steering_roots`) or ``"fitted"`` (the one fitted in this session). With
    ``model``, steering made for another model is refused with a message naming the
    difference. A directory outside the roots gets the same message as a missing one, so
    the page tells nothing about the server's files."""
    examples = example_steerings()
    if choice == "fitted":
        if fitted is None:
            raise InputError("No steering has been fitted in this session yet: fit one from prompt lists first.")
        steerer = fitted
    elif choice == "directory":
        path = Path((directory or "").strip()).expanduser()
        if not str(directory or "").strip():
            raise InputError("Give the path of a steering directory (one written by `dsas fit` or save_pretrained).")
        allowed = list(roots) if roots is not None else default_steering_roots()
        if not _allowed(path, allowed) or not (path / CONFIG_NAME).is_file():
            raise InputError(
                f"No steering directory {str(path)!r} under the folders this server allows "
                f"({', '.join(str(root) for root in allowed)}); start it with --steering-root DIR to allow another."
            )
        try:
            steerer = Steerer.from_pretrained(path)
        except SteeringError as error:
            raise InputError(f"Could not read the steering in {str(path)!r}: {error}") from error
    elif choice in examples:
        steerer = Steerer.from_pretrained(examples[choice])
    else:
        options = [*examples, "directory", "fitted"]
        raise InputError(f"Unknown steering {choice!r}; choose one of {options}.")
    if model is not None:
        try:
            steerer.check_compatible(model.pipeline.denoiser)
        except IncompatibleSteeringError as error:
            base = steerer.provenance.get("base_model") or "another model"
            raise InputError(f"This steering was made for {base}, not for {model.name}: {error}") from error
    return steerer


# -- generation --------------------------------------------------------------------------------
@dataclass
class GenerateResult:
    """The three images of one request, their CLIP scores and the DSAS gates.

    ``gate_maps`` holds one ``(steps, H, W)`` float32 array per steered layer (the gates of
    the conditional half of the guidance batch, upsampled to the image size).
    """

    settings: GenerateSettings
    unsteered: Image.Image
    uniform: Image.Image
    dsas: Image.Image
    scores: dict[str, float] | None
    score_model: str
    gate_maps: dict[str, np.ndarray]
    seconds: float

    @property
    def images(self) -> list[Image.Image]:
        return [self.unsteered, self.uniform, self.dsas]

    @property
    def gate_steps(self) -> int:
        """How many denoising steps the gate maps hold: the steered ones (a steering with a step
        window steers only some)."""
        return next(iter(self.gate_maps.values())).shape[0] if self.gate_maps else self.settings.steps

    def score_table(self) -> str:
        """The CLIP scores as a Markdown table (or the reason there are none)."""
        if self.scores is None:
            return f"_{self.score_model}_"
        rows = " | ".join(f"{self.scores[k]:.2f}" for k in ("unsteered", "uniform", "dsas"))
        return (
            f"CLIP score against the prompt ({self.score_model}; 100 × cosine)\n\n"
            f"| unsteered | uniform | DSAS |\n|---|---|---|\n| {rows} |\n\n"
            f"λ = {self.settings.strength:g}, {self.settings.steps} steps, seed {self.settings.seed}; "
            f"{self.seconds:.1f} s"
        )


def call_kwargs(settings: GenerateSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
    }
    if settings.size:
        kwargs["height"] = kwargs["width"] = settings.size
    return kwargs


def run(pipe: Any, settings: GenerateSettings, **steering: Any) -> Any:
    generator = torch.Generator().manual_seed(settings.seed)
    return pipe(settings.prompt, generator=generator, **call_kwargs(settings), **steering)


def size_bound(pipe: Any) -> int:
    """The largest image side the page renders for ``pipe``: twice its native size (a model
    trained at 64 px is not asked for 1024 px, which took minutes and memory for noise)."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(sample, (list, tuple)):
        sample = max(sample)
    if not isinstance(sample, int):
        return LIMITS.max_size
    native = sample * int(getattr(pipe, "vae_scale_factor", 8) or 8)
    return 2 * native


def size_multiple(pipe: Any) -> int:
    """Image sides must be multiples of this: 8 (diffusers' check) or the VAE's factor if larger."""
    return max(8, int(getattr(pipe, "vae_scale_factor", 8) or 8))


def checked_settings(entry: ModelEntry, settings: GenerateSettings) -> GenerateSettings:
    """``settings`` validated for ``entry``'s model (its tokenizer, size multiple and bound)."""
    return validate_settings(
        settings,
        tokenizer=entry.tokenizer,
        size_multiple=size_multiple(entry.pipeline),
        max_size=size_bound(entry.pipeline),
    )


def batch_key(entry: ModelEntry, settings: GenerateSettings) -> tuple[Any, ...]:
    """What requests must share to run in one pipeline call (:func:`generate_many`): the
    model, the image size, the number of steps and the guidance scale."""
    return (entry.name, settings.size, settings.steps, settings.guidance)


def generate(entry: ModelEntry, steerer: Steerer, settings: GenerateSettings, *, score: bool = True) -> GenerateResult:
    """Render ``settings.prompt`` unsteered, with uniform steering and with DSAS (same seed),
    score the three images with CLIP and keep the DSAS gate maps: one pipeline call."""
    result = generate_many(entry, [(steerer, checked_settings(entry, settings))], score=score)[0]
    if isinstance(result, Exception):
        raise result
    return result


def generate_many(
    entry: ModelEntry, requests: Sequence[tuple[Steerer, GenerateSettings]], *, score: bool = True
) -> list[GenerateResult | InputError]:
    """Several requests (steerer, checked settings with one :func:`batch_key`) in one pipeline
    call: each request's unsteered, uniform and DSAS images are three rows of the batch with its
    own seed, every steerer is loaded twice (``"<i>:uniform"`` steered uniformly and
    ``"<i>:dsas"`` through its gates) and steers only its requests' rows, at their strengths
    (one λ per row: :mod:`dsas_diffusion.steering.strengths`). Returns one result per request,
    or the :class:`InputError` of the whole call."""
    if not requests or len({batch_key(entry, settings) for _, settings in requests}) != 1:
        raise ValueError("generate_many takes one or more requests with the same size, steps and guidance")
    start = time.perf_counter()
    index: dict[int, int] = {}  # id(steerer) -> its number in this call
    for steerer, _ in requests:
        index.setdefault(id(steerer), len(index))
    names = [f"{i}:{kind}" for i in range(len(index)) for kind in ("uniform", "dsas")]
    strengths: dict[str, list[float]] = {name: [] for name in names}
    prompts, generators = [], []
    for steerer, settings in requests:
        for kind in ("unsteered", "uniform", "dsas"):
            prompts.append(settings.prompt)
            generators.append(torch.Generator().manual_seed(settings.seed))
            mine = f"{index[id(steerer)]}:{kind}"
            for name in names:
                strengths[name].append(settings.strength if name == mine else 0.0)
    with entry.lock.reading(), request_pipeline(entry) as pipe:
        for steerer, _ in requests:
            number = index[id(steerer)]
            if f"{number}:dsas" not in pipe.steerers:
                pipe.load_steering(steerer, name=f"{number}:uniform")
                pipe.load_steering(steerer, name=f"{number}:dsas")
        try:
            output = pipe(
                prompts,
                generator=generators,
                **call_kwargs(requests[0][1]),
                steering_strength=strengths,
                steering_gate={name: "none" for name in names if name.endswith(":uniform")},
                return_gate_maps=True,
            )
        except ValueError as error:  # SteeringError, or a diffusers input check
            failed = InputError(f"The pipeline refused the request: {error}")
            return [failed for _ in requests]
    seconds = time.perf_counter() - start
    results: list[GenerateResult | InputError] = []
    for i, (steerer, settings) in enumerate(requests):
        unsteered, uniform, dsas = output.images[3 * i : 3 * i + 3]
        maps = output.gate_maps.get(f"{index[id(steerer)]}:dsas", {})
        maps = {layer: tensor[:, 3 * i + 2].float().numpy() for layer, tensor in maps.items()}
        images = {"unsteered": unsteered, "uniform": uniform, "dsas": dsas}
        scores, score_model = (
            (None, "CLIP scoring off") if not score else entry.clip_scores(list(images.values()), settings.prompt)
        )
        scored = None if scores is None else dict(zip(images, scores, strict=True))
        results.append(GenerateResult(settings, unsteered, uniform, dsas, scored, score_model, maps, seconds))
    return results


def strength_sweep(
    entry: ModelEntry, steerer: Steerer, settings: GenerateSettings, points: int = 5, *, cell: int = 128
) -> Image.Image:
    """A strip of images at λ = 0 … ``settings.strength`` (``points`` values): uniform steering
    on the top row, DSAS below, λ above each column."""
    points = integer(points, "The number of sweep points")
    if not 2 <= points <= LIMITS.max_sweep_points:
        raise InputError(f"The sweep needs between 2 and {LIMITS.max_sweep_points} points, got {points}.")
    settings = validate_settings(
        settings,
        tokenizer=entry.tokenizer,
        size_multiple=size_multiple(entry.pipeline),
        max_size=size_bound(entry.pipeline),
    )
    strengths = np.linspace(0.0, settings.strength, points)
    rows: dict[str, list[Image.Image]] = {"uniform": [], "DSAS": []}
    with entry.lock.reading(), request_pipeline(entry, steerer) as pipe:
        for strength in strengths:
            for label, gate in (("uniform", "none"), ("DSAS", "dsas")):
                rows[label].append(run(pipe, settings, steering_strength=float(strength), steering_gate=gate).images[0])
    return sweep_strip(rows, strengths, cell=cell)


# -- fitting -------------------------------------------------------------------------------------
def fit_from_text(
    entry: ModelEntry,
    source_text: str,
    target_text: str,
    control_text: str,
    *,
    map: str = "caa",
    steps: int = 10,
    seed: int = 0,
    report: Callable[[float, str], None] | None = None,
) -> Steerer:
    """Fit a DSAS steering on ``entry``'s model from three pasted prompt lists.

    Generation requests on the same model wait while it runs (see the module's notes).
    ``report(fraction, message)`` is told the phase; the library's tqdm bars run too (a Gradio ``Progress(track_tqdm=True)`` shows them).
    """
    if map not in MAP_NAMES:
        raise InputError(f"Unknown steering map {map!r}; choose one of {list(MAP_NAMES)}.")
    source = parse_prompt_list(source_text, "source")
    target = parse_prompt_list(target_text, "target")
    control = parse_prompt_list(control_text, "control")
    steps = integer(steps, "Collection steps")
    if not LIMITS.min_fit_steps <= steps <= LIMITS.max_fit_steps:
        raise InputError(f"Collection steps must be between {LIMITS.min_fit_steps} and {LIMITS.max_fit_steps}.")
    tokenizer = entry.tokenizer
    for name, prompts in (("source", source), ("target", target), ("control", control)):
        for i, prompt in enumerate(prompts, 1):
            check_prompt(prompt, name=f"Line {i} of the {name} prompts", tokenizer=tokenizer)
    if report is not None:
        report(0.0, "waiting for running generations on this model to finish")
    with entry.lock.writing(), request_pipeline(entry) as pipe:
        if report is not None:
            report(0.05, f"fitting {map} + DSAS gates on {len(source)}/{len(target)}/{len(control)} prompts")
        try:
            steerer = pipe.fit_steering(
                source, target, control, map=map, gate="dsas", num_inference_steps=steps, seed=seed, progress=True
            )
        except SteeringError as error:
            raise InputError(f"Fitting failed: {error}") from error
    steerer.provenance["base_model"] = entry.name
    if report is not None:
        report(1.0, "done")
    return steerer


def describe_steerer(steerer: Steerer) -> str:
    """A short Markdown summary: map, base model and the gate accuracy of each layer."""
    rows = "\n".join(
        f"| {r['module']} | {r['accuracy'] if r['accuracy'] is None else format(r['accuracy'], '.2f')} | "
        f"{'on' if r['enabled'] else 'off'} |"
        for r in steerer.gate_report()
    )
    return (
        f"map **{steerer.config.get('map')}**, gate **{steerer.config.get('gate')}**, made for "
        f"**{steerer.provenance.get('base_model', 'unknown')}**\n\n| layer | gate accuracy | steered |\n|---|---|---|\n{rows}"
    )
