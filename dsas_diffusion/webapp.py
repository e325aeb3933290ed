"""Everything the Gradio demo (``app.py``, ``dsas demo``) computes, without any Gradio code.

The demo compares, for one prompt and seed, the unsteered image, uniform steering and DSAS,
scores each against the prompt with CLIP and shows the DSAS gates per layer over the image.

Concurrency model (several users at once, no cross-talk):

* :class:`ModelCache` keeps **one base pipeline per model** (weights loaded once).
* Each request runs on its own light pipeline, :func:`request_pipeline`: ``from_pipe`` of the
  base (the same weight tensors, no copy) with private copies of the scheduler and the
  tokenizers (both hold per-call state) and the request's steerer loaded on it. Steering hooks are attached
  for one call and act only on the calling thread (the core's scoped sessions), so requests
  with different strengths or steerers never see each other's settings.
* A fit takes the model's lock exclusively (:class:`ReadWriteLock`): generation requests on
  that model wait until it ends; generation requests run together. (The library's collection
  hooks only count the fitting thread's forward calls, so this is not needed for correctness;
  it keeps a fit, minutes of work, from sharing the cores with requests.)

Validation raises :class:`InputError`, whose message is meant for the user as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from .steering import Steerer, SteeringError
from .steering.steerer import CONFIG_NAME

__all__ = [
    "EXAMPLES_DIR",
    "LIMITS",
    "MAPS",
    "GenerateResult",
    "GenerateSettings",
    "ImageFiles",
    "InputError",
    "Limits",
    "ModelCache",
    "PromptTokenizer",
    "ReadWriteLock",
    "add_server_arguments",
    "build_example_steering",
    "configure_torch_threads",
    "example_steerings",
    "fit_from_text",
    "gate_overlays",
    "generate",
    "parse_prompt_list",
    "request_pipeline",
    "resolve_steering",
    "strength_sweep",
    "upscale",
    "validate_settings",
]

EXAMPLES_DIR = Path(__file__).resolve().parent / "shapes" / "steering"
PROMPTS_DIR = Path(__file__).resolve().parent / "shapes" / "prompts"
MAPS = ("linear-act", "caa", "iti", "lineas")
STEERER_NAME = "demo"

# diffusers' from_pipe calls pipeline.to(dtype=None), which logs a warning per model each time
logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)


def add_server_arguments(parser: argparse.ArgumentParser, default_model: str = "shapes-sd") -> None:
    """The options of ``python app.py`` and ``dsas demo``."""
    parser.add_argument("--model", default=default_model, help="model shown when the page opens")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests served at once")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per request (default: cores / concurrency)"
    )


class InputError(ValueError):
    """A request the demo refuses; the message says what to change and is shown to the user."""


@dataclass(frozen=True)
class Limits:
    """Bounds the demo enforces on every request."""

    max_prompt_chars: int = 300
    min_steps: int = 1
    max_steps: int = 50
    min_strength: float = 0.0
    max_strength: float = 10.0
    min_guidance: float = 0.0
    max_guidance: float = 20.0
    max_seed: int = 2**32 - 1
    min_size: int = 64
    max_size: int = 1024
    max_fit_prompts: int = 200
    min_fit_steps: int = 2
    max_fit_steps: int = 30
    max_sweep_points: int = 9


LIMITS = Limits()


# -- locking and the model cache ---------------------------------------------------------------
class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._condition:
            self._readers -= 1
            if self._readers == 0:
                self._condition.notify_all()

    def acquire_write(self) -> None:
        with self._condition:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._condition:
            self._writer = False
            self._condition.notify_all()

    class _Guard:
        def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
            self._acquire, self._release = acquire, release

        def __enter__(self) -> None:
            self._acquire()

        def __exit__(self, *exc: object) -> None:
            self._release()

    def reading(self) -> ReadWriteLock._Guard:
        """``with lock.reading():`` shared access."""
        return self._Guard(self.acquire_read, self.release_read)

    def writing(self) -> ReadWriteLock._Guard:
        """``with lock.writing():`` exclusive access."""
        return self._Guard(self.acquire_write, self.release_write)


class PromptTokenizer:
    """Counts a prompt's tokens with a private copy of a pipeline's tokenizer.

    A fast tokenizer keeps its padding / truncation settings as state, so a validation call
    ``tokenizer(text)`` on a tokenizer a request is using would switch padding off under that
    request's ``padding="max_length"`` encoding (see :func:`request_pipeline`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.model_max_length = int(tokenizer.model_max_length)

    def count(self, text: str) -> int:
        """How many tokens ``text`` is, begin and end tokens included."""
        with self._lock:
            return len(self._tokenizer(text, verbose=False).input_ids)


@dataclass
class ModelEntry:
    """One loaded model: its base pipeline, its lock and its CLIP scorer (made on first use)."""

    name: str
    pipeline: Any
    tokenizer: PromptTokenizer | None = None
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    scorer: Any = None
    scorer_error: str | None = None
    scorer_lock: threading.Lock = field(default_factory=threading.Lock)
    _tokenizer_pool: list[dict[str, Any]] = field(default_factory=list)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock)

    def borrow_tokenizers(self) -> dict[str, Any]:
        """Private copies of the pipeline's tokenizers for one request (from the pool)."""
        with self._pool_lock:
            if self._tokenizer_pool:
                return self._tokenizer_pool.pop()
        components = self.pipeline.components
        return {k: copy.deepcopy(v) for k, v in components.items() if k.startswith("tokenizer") and v is not None}

    def return_tokenizers(self, tokenizers: dict[str, Any]) -> None:
        """Give copies from :meth:`borrow_tokenizers` back to the pool."""
        with self._pool_lock:
            self._tokenizer_pool.append(tokenizers)

    def clip_scores(self, images: Sequence[Image.Image], prompt: str) -> tuple[list[float] | None, str]:
        """CLIP score of each image against ``prompt`` and the scoring model's name; ``None``
        scores (and the reason in place of the name) when no CLIP model can be loaded."""
        from .eval.metrics import ClipScorer, default_clip_for

        clip_name, pretrained = default_clip_for(self.name)
        label = clip_name if pretrained is None else f"{clip_name} ({pretrained})"
        with self.scorer_lock:  # one scorer per model; its text cache is a plain dict
            if self.scorer is None and self.scorer_error is None:
                try:
                    self.scorer = ClipScorer(clip_name, pretrained)
                except Exception as error:  # offline without the weights: show why, keep the images
                    self.scorer_error = f"no CLIP score: {label} could not be loaded ({error})"
            if self.scorer is None:
                return None, self.scorer_error or "no CLIP score"
            scores = self.scorer.clip_score(list(images), [prompt] * len(images))
        return [float(s) for s in scores], label


class ModelCache:
    """Base pipelines by model name, at most ``max_models`` at once (least recently used goes).

    Every request on a model shares the one base pipeline's weights through
    :func:`request_pipeline`.
    """

    def __init__(self, max_models: int = 2, device: str | None = None) -> None:
        self.max_models = max_models
        self.device = device
        self._entries: OrderedDict[str, ModelEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str) -> ModelEntry:
        """The loaded model ``model`` (a Shapes name, a hub id or a folder), loading it once."""
        from .diffusion.loading import load_pipeline

        name = (model or "").strip()
        if not name:
            raise InputError("Choose a model: shapes-sd, or a diffusers model id or folder you have locally.")
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return self._entries[name]
            try:
                pipeline = load_pipeline(name, device=self.device)
            except Exception as error:  # offline hub ids, broken folders, unsupported classes: say which
                raise InputError(f"Could not load the model {name!r}: {error}") from error
            pipeline.set_progress_bar_config(disable=True)
            tokenizer = getattr(pipeline, "tokenizer", None)
            entry = ModelEntry(name, pipeline, None if tokenizer is None else PromptTokenizer(tokenizer))
            self._entries[name] = entry
            while len(self._entries) > self.max_models:
                self._entries.popitem(last=False)
            return entry

    def loaded(self) -> list[str]:
        """Names of the models now in memory."""
        with self._lock:
            return list(self._entries)


@contextlib.contextmanager
def request_pipeline(entry: ModelEntry, steerer: Steerer | None = None) -> Iterator[Any]:
    """``with request_pipeline(entry, steerer) as pipe:`` a pipeline for one request.

    It shares the base pipeline's models (no weight copy) and has its own copy of the
    scheduler and of the tokenizers, which both keep per-call state: the scheduler its
    timesteps; a fast tokenizer its padding / truncation settings, which diffusers'
    ``encode_prompt`` switches between ``max_length`` and ``longest`` in every call, so two
    threads sharing one tokenizer encoded each other's prompts unpadded now and then (a
    different image for the same seed, seen in the 8-concurrent-calls test). Tokenizer
    copies are pooled per model. ``steerer`` is loaded on this pipeline only.
    """
    base = entry.pipeline
    tokenizers = entry.borrow_tokenizers()
    try:
        pipe = type(base).from_pipe(base, scheduler=copy.deepcopy(base.scheduler), **tokenizers)
        pipe.set_progress_bar_config(disable=True)
        if steerer is not None:
            pipe.load_steering(steerer, name=STEERER_NAME)
        yield pipe
    finally:
        entry.return_tokenizers(tokenizers)


def configure_torch_threads(concurrency: int, threads: int | None = None) -> int:
    """Set torch's CPU threads per request so that ``concurrency`` requests fit the cores.

    Each request thread runs its own intra-op thread team; with 2 threads per request and
    several requests (or another busy process) on 2 cores the teams spin against each other:
    measured here, a 10-step shapes-sd request took 15-96 s with 2 threads and 0.8 s with 1
    while another process kept one core busy. ``threads`` overrides the choice. Returns the
    number set (process-wide: ``torch.set_num_threads``).
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, int(concurrency)))
    torch.set_num_threads(int(threads))
    return int(threads)


# -- steering sources -----------------------------------------------------------------------------
def example_steerings() -> dict[str, Path]:
    """The shipped example steerings (all fitted on ``shapes-sd``) by concept name."""
    if not EXAMPLES_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(EXAMPLES_DIR.iterdir()) if (p / CONFIG_NAME).is_file()}


def build_example_steering(concept: str = "banana", out: str | os.PathLike[str] | None = None) -> Path:
    """Fit the example steering of a Shapes concept on ``shapes-sd`` and save it (to the
    package's ``shapes/steering/<concept>`` unless ``out`` is given).

    Uses the shipped prompt sets ``shapes/prompts/<concept>/{source,target,control}.txt`` and
    the settings of ``make demo`` (Linear-AcT maps, DSAS gates, seed 0); the result is the
    same on every run on the same machine and library versions.
    """
    from .demo import concept_prompts
    from .diffusion.loading import load_pipeline

    prompts = PROMPTS_DIR / concept
    if not prompts.is_dir():
        raise InputError(
            f"no prompt sets for {concept!r} in {PROMPTS_DIR}; concepts: {sorted(os.listdir(PROMPTS_DIR))}"
        )
    torch.manual_seed(0)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    source, target, control = concept_prompts(prompts)
    steerer = pipe.fit_steering(
        source,
        target,
        control,
        map="linear-act",
        gate="dsas",
        preset="blocks",
        num_inference_steps=10,
        n_components=20,
        gate_calibration="control-positions",
        support_quantiles=None,
        seed=0,
        progress=False,
    )
    steerer.provenance["base_model"] = "shapes-sd"  # not the local folder it was loaded from
    target_dir = Path(out) if out is not None else EXAMPLES_DIR / concept
    steerer.save_pretrained(target_dir)
    return target_dir


def resolve_steering(
    choice: str, directory: str | None = None, fitted: Steerer | None = None, *, model: ModelEntry | None = None
) -> Steerer:
    """The steerer a request asks for: a shipped example's name, ``"directory"`` (then
    ``directory`` is read) or ``"fitted"`` (the one fitted in this session). With ``model``,
    steering made for another model is refused with a message naming the difference."""
    from .steering import IncompatibleSteeringError

    examples = example_steerings()
    if choice == "fitted":
        if fitted is None:
            raise InputError("No steering has been fitted in this session yet: fit one from prompt lists first.")
        steerer = fitted
    elif choice == "directory":
        path = Path((directory or "").strip()).expanduser()
        if not str(directory or "").strip():
            raise InputError("Give the path of a steering directory (one written by `dsas fit` or save_pretrained).")
        if not path.is_dir():
            raise InputError(f"The steering directory {str(path)!r} does not exist.")
        if not (path / CONFIG_NAME).is_file():
            raise InputError(f"{str(path)!r} is not a steering directory: it has no {CONFIG_NAME}.")
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


# -- validation ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerateSettings:
    """One request's generation settings (validate with :func:`validate_settings`)."""

    prompt: str
    seed: int = 0
    steps: int = 25
    guidance: float = 7.5
    strength: float = 3.0
    size: int = 0  # 0: the model's default size


def _number(value: Any, name: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a number, got {value!r}.") from None
    if not np.isfinite(number):
        raise InputError(f"{name} must be a finite number, got {value!r}.")
    return number


def _integer(value: Any, name: str) -> int:
    number = _number(value, name)
    if number != int(number):
        raise InputError(f"{name} must be a whole number, got {value!r}.")
    return int(number)


def _check_prompt(
    prompt: Any, name: str = "The prompt", tokenizer: PromptTokenizer | None = None, limits: Limits = LIMITS
) -> str:
    text = str(prompt or "").strip()
    if not text:
        raise InputError(f"{name} is empty: describe the image to generate.")
    if len(text) > limits.max_prompt_chars:
        raise InputError(f"{name} is {len(text)} characters long; at most {limits.max_prompt_chars} are allowed.")
    if tokenizer is not None:
        tokens = tokenizer.count(text)
        if tokens > tokenizer.model_max_length:
            raise InputError(
                f"{name} is {tokens} tokens long; the model reads at most {tokenizer.model_max_length}: shorten it."
            )
    return text


def validate_settings(
    settings: GenerateSettings,
    *,
    tokenizer: PromptTokenizer | None = None,
    size_multiple: int = 8,
    limits: Limits = LIMITS,
) -> GenerateSettings:
    """``settings`` checked against ``limits`` (and the model's tokenizer), numbers coerced;
    raises :class:`InputError` naming the first bad field and its bounds."""

    def bounded(value: float, low: float, high: float, name: str) -> None:
        if not low <= value <= high:
            raise InputError(f"{name} must be between {low} and {high}, got {value}.")

    prompt = _check_prompt(settings.prompt, tokenizer=tokenizer, limits=limits)
    steps = _integer(settings.steps, "Steps")
    bounded(steps, limits.min_steps, limits.max_steps, "Steps")
    seed = _integer(settings.seed, "The seed")
    bounded(seed, 0, limits.max_seed, "The seed")
    guidance = _number(settings.guidance, "Guidance")
    bounded(guidance, limits.min_guidance, limits.max_guidance, "Guidance")
    strength = _number(settings.strength, "The strength λ")
    bounded(strength, limits.min_strength, limits.max_strength, "The strength λ")
    size = _integer(settings.size, "The image size")
    if size != 0:
        bounded(size, limits.min_size, limits.max_size, "The image size")
        if size % size_multiple:
            raise InputError(f"The image size must be a multiple of {size_multiple} (or 0 for the model's default).")
    return GenerateSettings(prompt, seed, steps, guidance, strength, size)


def parse_prompt_list(text: str | None, name: str, *, limits: Limits = LIMITS) -> list[str]:
    """Prompts pasted one per line (blank lines and ``#`` comments skipped), each checked."""
    from .cli import prompt_lines

    prompts = prompt_lines(str(text or ""))
    if not prompts:
        raise InputError(f"The {name} prompt list is empty: paste one prompt per line.")
    if len(prompts) > limits.max_fit_prompts:
        raise InputError(f"The {name} prompt list has {len(prompts)} prompts; at most {limits.max_fit_prompts}.")
    for i, prompt in enumerate(prompts, 1):
        _check_prompt(prompt, name=f"Line {i} of the {name} prompts", limits=limits)
    return prompts


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


def _call_kwargs(settings: GenerateSettings) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "num_inference_steps": settings.steps,
        "guidance_scale": settings.guidance,
    }
    if settings.size:
        kwargs["height"] = kwargs["width"] = settings.size
    return kwargs


def _run(pipe: Any, settings: GenerateSettings, **steering: Any) -> Any:
    generator = torch.Generator().manual_seed(settings.seed)
    return pipe(settings.prompt, generator=generator, **_call_kwargs(settings), **steering)


def _size_multiple(pipe: Any) -> int:
    """Image sides must be multiples of this: 8 (diffusers' check) or the VAE's factor if larger."""
    return max(8, int(getattr(pipe, "vae_scale_factor", 8) or 8))


def generate(entry: ModelEntry, steerer: Steerer, settings: GenerateSettings, *, score: bool = True) -> GenerateResult:
    """Render ``settings.prompt`` unsteered, with uniform steering and with DSAS (same seed),
    score the three images with CLIP and keep the DSAS gate maps."""
    settings = validate_settings(settings, tokenizer=entry.tokenizer, size_multiple=_size_multiple(entry.pipeline))
    start = time.perf_counter()
    with entry.lock.reading(), request_pipeline(entry, steerer) as pipe:
        try:
            unsteered = _run(pipe, settings, steering_strength=0.0).images[0]
            uniform = _run(pipe, settings, steering_strength=settings.strength, steering_gate=False).images[0]
            gated = _run(pipe, settings, steering_strength=settings.strength, steering_gate=True, return_gate_maps=True)
        except ValueError as error:  # SteeringError, or a diffusers input check
            raise InputError(f"The pipeline refused the request: {error}") from error
    maps = {layer: tensor[:, 0].float().numpy() for layer, tensor in gated.gate_maps.get(STEERER_NAME, {}).items()}
    images = {"unsteered": unsteered, "uniform": uniform, "dsas": gated.images[0]}
    scores, score_model = (
        (None, "CLIP scoring off") if not score else entry.clip_scores(list(images.values()), settings.prompt)
    )
    return GenerateResult(
        settings,
        unsteered,
        uniform,
        gated.images[0],
        None if scores is None else dict(zip(images, scores, strict=True)),
        score_model,
        maps,
        time.perf_counter() - start,
    )


class ImageFiles:
    """Writes result images to unique PNG files in one private folder (removed at exit).

    Gradio's own caching of returned PIL images rewrites a file named by the image's
    content in place, so two concurrent requests returning the same image (two users with
    the same prompt and seed) can serve each other a half-written file; it copies returned
    *paths* into its cache atomically instead, so the demo returns paths.
    """

    def __init__(self) -> None:
        import atexit
        import shutil
        import tempfile

        self.folder = Path(tempfile.mkdtemp(prefix="dsas-demo-"))
        atexit.register(shutil.rmtree, self.folder, ignore_errors=True)

    def save(self, image: Image.Image) -> str:
        """``image`` as a new PNG file; its path."""
        import uuid

        path = self.folder / f"{uuid.uuid4().hex}.png"
        image.save(path, format="PNG")
        return str(path)


def upscale(image: Image.Image, min_side: int = 256) -> Image.Image:
    """``image`` enlarged by a whole factor (nearest neighbour) so that its short side is at
    least ``min_side``; unchanged when already large enough."""
    factor = -(-min_side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST)


def gate_overlays(
    image: Image.Image, gate_maps: Mapping[str, np.ndarray], step: int = 0, *, min_side: int = 256
) -> list[tuple[Image.Image, str]]:
    """One gate heatmap over ``image`` per layer, plus the mean over layers first.

    ``step`` 0 averages the gates over every denoising step; ``step`` k shows step k (1-based).
    """
    from .diffusion.visual import overlay_heatmap

    if not gate_maps:
        return []
    total = next(iter(gate_maps.values())).shape[0]
    step = int(step)
    if not 0 <= step <= total:
        raise InputError(f"The gate step must be between 0 (mean over steps) and {total}, got {step}.")
    when = "mean over steps" if step == 0 else f"step {step}/{total}"
    frames = {layer: maps.mean(0) if step == 0 else maps[step - 1] for layer, maps in gate_maps.items()}
    shown = {"all layers": np.mean(list(frames.values()), axis=0), **frames}
    items = []
    for layer, values in shown.items():
        overlay = overlay_heatmap(image, torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)))
        items.append((upscale(overlay, min_side), f"{layer}: mean gate {float(values.mean()):.2f} ({when})"))
    return items


def strength_sweep(
    entry: ModelEntry, steerer: Steerer, settings: GenerateSettings, points: int = 5, *, cell: int = 128
) -> Image.Image:
    """A strip of images at λ = 0 … ``settings.strength`` (``points`` values): uniform steering
    on the top row, DSAS below, λ above each column."""
    points = _integer(points, "The number of sweep points")
    if not 2 <= points <= LIMITS.max_sweep_points:
        raise InputError(f"The sweep needs between 2 and {LIMITS.max_sweep_points} points, got {points}.")
    settings = validate_settings(settings, tokenizer=entry.tokenizer, size_multiple=_size_multiple(entry.pipeline))
    strengths = np.linspace(0.0, settings.strength, points)
    rows: dict[str, list[Image.Image]] = {"uniform": [], "DSAS": []}
    with entry.lock.reading(), request_pipeline(entry, steerer) as pipe:
        for strength in strengths:
            for label, gate in (("uniform", False), ("DSAS", True)):
                rows[label].append(
                    _run(pipe, settings, steering_strength=float(strength), steering_gate=gate).images[0]
                )
    header, margin = 16, 56
    strip = Image.new("RGB", (margin + points * cell, header + 2 * cell), "white")
    draw = ImageDraw.Draw(strip)
    for col, strength in enumerate(strengths):
        draw.text((margin + col * cell + 4, 2), f"lambda = {strength:.2f}", fill="black")
    for row, (label, images) in enumerate(rows.items()):
        top = header + row * cell
        draw.text((4, top + cell // 2 - 6), label, fill="black")
        for col, image in enumerate(images):
            strip.paste(image.convert("RGB").resize((cell, cell), Image.NEAREST), (margin + col * cell, top))
    return strip


# -- fitting -------------------------------------------------------------------------------------
def fit_from_text(
    entry: ModelEntry,
    source_text: str,
    target_text: str,
    control_text: str,
    *,
    map: str = "linear-act",
    steps: int = 10,
    seed: int = 0,
    report: Callable[[float, str], None] | None = None,
) -> Steerer:
    """Fit a DSAS steering on ``entry``'s model from three pasted prompt lists.

    Generation requests on the same model wait while it runs (see the module's notes).
    ``report(fraction, message)`` is told the phase; the library's tqdm bars run too (a Gradio ``Progress(track_tqdm=True)`` shows them).
    """
    if map not in MAPS:
        raise InputError(f"Unknown steering map {map!r}; choose one of {list(MAPS)}.")
    source = parse_prompt_list(source_text, "source")
    target = parse_prompt_list(target_text, "target")
    control = parse_prompt_list(control_text, "control")
    steps = _integer(steps, "Collection steps")
    if not LIMITS.min_fit_steps <= steps <= LIMITS.max_fit_steps:
        raise InputError(f"Collection steps must be between {LIMITS.min_fit_steps} and {LIMITS.max_fit_steps}.")
    tokenizer = entry.tokenizer
    for name, prompts in (("source", source), ("target", target), ("control", control)):
        for i, prompt in enumerate(prompts, 1):
            _check_prompt(prompt, name=f"Line {i} of the {name} prompts", tokenizer=tokenizer)
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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m dsas_diffusion.webapp examples [CONCEPT...]`` refits the shipped examples."""
    parser = argparse.ArgumentParser(description="Refit the example steerings shipped with the demo.")
    parser.add_argument("command", choices=["examples"])
    parser.add_argument("concepts", nargs="*", default=["banana", "red"])
    parser.add_argument("--out", default=None, help="parent directory (default: the package's shapes/steering/)")
    args = parser.parse_args(argv)
    for concept in args.concepts:
        out = None if args.out is None else Path(args.out) / concept
        print(f"fitted {concept}: {build_example_steering(concept, out)}")


if __name__ == "__main__":
    main()
