"""Running an evaluation: fit (or load) the steerers, render every (method, strength, prompt,
seed) image once into a cache, score the images, and hand the rows to :mod:`.report`.

Work is split over processes with ``accelerate`` (``accelerate launch -m dsas_diffusion.eval``):
the main process fits the steerers, then every process renders its share of the missing
image batches, scores its share of the images, and the main process writes the tables and
plots. Images are cached under ``out/images`` by a hash of everything that decides them, so
a rerun or an extended sweep renders only what is missing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..shapes.hub import resolve_model_path
from ..steering import Steerer
from ..steering.steerer import CONFIG_NAME, WEIGHTS_NAME
from .config import ConfigError, EvalConfig, Method, parse_method

__all__ = ["EvalResult", "Job", "model_id", "run_evaluation"]

UNSTEERED = "unsteered"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Job:
    """One image: a method (or ``"unsteered"``) at a strength, for one prompt and seed."""

    method: str
    strength: float
    group: str  # "concept" or "control"
    prompt: str
    seed: int


@dataclass
class EvalResult:
    """What a run produced (on the main process; other processes get ``rows=[]``)."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)
    methods: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0  # images rendered by this run, all processes together
    reused: int = 0  # images found in the cache
    out: Path = Path()


def _digest(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _without_timestamps(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_timestamps(v) for k, v in value.items() if k != "created"}
    if isinstance(value, list):
        return [_without_timestamps(v) for v in value]
    return value


def model_id(model: str | Path) -> str:
    """The model as the caches see it. A local folder (a Shapes name resolves to one) is
    identified by a hash of its files, so retrained weights saved under the same name
    invalidate cached fits and images; a hub id is identified by its name.

    Example:
        >>> model_id("shapes-sd") == model_id(resolve_model_path("shapes-sd"))
        True
    """
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return str(model)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.relative_to(path).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(file.read_bytes()).digest())
    return "sha256:" + digest.hexdigest()[:32]


def steering_id(directory: Path) -> str:
    """A hash of a saved steerer (its weights and its config without the creation time): a
    refitted steerer that differs invalidates its cached images, an identical one does not."""
    config = _without_timestamps(json.loads((directory / CONFIG_NAME).read_text()))
    weights = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    return _digest({"config": config, "weights": weights})


class _Runner:
    def __init__(self, config: EvalConfig, progress: bool) -> None:
        from accelerate import PartialState

        self.config = config
        # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun
        # share the work over gloo on the CPU
        on_cpu = config.device == "cpu" or not torch.cuda.is_available()
        self.state = PartialState(cpu=on_cpu)
        self.progress = progress
        self.out = Path(config.out)
        self.images_dir = Path(config.cache_dir) if config.cache_dir else self.out / "images"
        if self.state.is_main_process:
            self.images_dir.mkdir(parents=True, exist_ok=True)
        self.state.wait_for_everyone()
        device = config.device or (str(self.state.device) if self.state.device.type != "mps" else "cpu")
        self.device = device
        self.pipe = None
        self.model_id = model_id(config.model)

    # -- steerers --------------------------------------------------------------------------
    def load_pipeline(self):
        if self.pipe is None:
            from ..diffusion.loading import load_pipeline

            self.pipe = load_pipeline(self.config.model).to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        return self.pipe

    def methods(self) -> list[Method]:
        methods = self.config.method_list
        if self.config.steering is None:
            return methods
        steerer = Steerer.from_pretrained(self.config.steering)
        fitted, gate = steerer.config.get("map"), steerer.config.get("gate")
        gatings = {"e2e": ("uniform", "e2e"), "none": ("uniform",)}.get(gate, ("uniform", "dsas"))
        allowed = [parse_method(f"{fitted}/{g}") for g in gatings]
        if self.config.methods == "all":
            return allowed
        foreign = [m.name for m in methods if m not in allowed]
        if foreign:
            raise ConfigError(
                f"methods {foreign} cannot use the steering in {self.config.steering!r}, which holds a {fitted} map "
                f"with {gate} gates; choose among {[m.name for m in allowed]} or fit from prompt files"
            )
        return methods

    def steering_dirs(self, methods: Sequence[Method]) -> dict[str, Path]:
        """Fit (main process) or reuse each steerer the methods need; ``{steerer name: dir}``."""
        config = self.config
        if config.steering is not None:
            return {method.steerer_name: Path(config.steering) for method in methods}
        dirs: dict[str, Path] = {}
        needed = {m.steerer_name: m for m in methods}
        for name, method in needed.items():
            directory = self.out / "steering" / name
            fit_kwargs = dict(config.fit)
            key = _digest(
                {
                    "model": self.model_id,
                    "sets": [config.source, config.target, config.control],
                    "map": method.map,
                    "gate": method.fit_gate,
                    "fit": fit_kwargs,
                    "version": CACHE_VERSION,
                }
            )
            key_file = directory / "fit_key.txt"
            if self.state.is_main_process:
                fresh = not (key_file.is_file() and key_file.read_text().strip() == key)
                if fresh:
                    pipe = self.load_pipeline()
                    print(f"fitting {method.map} with {method.fit_gate} gates on {config.model}")
                    steerer = pipe.fit_steering(
                        config.source,
                        config.target,
                        config.control,
                        map=method.map,
                        gate=method.fit_gate,
                        name=name,
                        progress=self.progress,
                        **fit_kwargs,
                    )
                    steerer.save_pretrained(directory)
                    key_file.write_text(key + "\n")
            dirs[name] = directory
        self.state.wait_for_everyone()
        return dirs

    # -- images ----------------------------------------------------------------------------
    def jobs(self, methods: Sequence[Method]) -> list[Job]:
        config = self.config
        groups = (("concept", config.concept_prompts), ("control", config.control_prompts))
        jobs = []
        for method, strength in [(UNSTEERED, 0.0)] + [
            (m.name, s) for m in methods for s in config.strength_list if s != 0.0
        ]:
            for seed in config.seeds:
                for group, prompts in groups:
                    jobs += [Job(method, strength, group, prompt, seed) for prompt in prompts]
        return jobs

    def image_path(self, job: Job, ids: dict[str, str]) -> Path:
        steering = None if job.method == UNSTEERED else ids[parse_method(job.method).steerer_name]
        key = _digest(
            {
                "settings": {**self.config.generation_settings(), "model": self.model_id},
                "method": job.method,
                "steering": steering,
                "strength": job.strength,
                "prompt": job.prompt,
                "seed": job.seed,
                "version": CACHE_VERSION,
            }
        )
        return self.images_dir / f"{key}.png"

    def render(self, batches: list[list[Job]], ids: dict[str, str], dirs: dict[str, Path]) -> int:
        if not batches:
            return 0
        pipe = self.load_pipeline()
        loaded = set(pipe.steerers)
        for name, directory in dirs.items():
            if name not in loaded:
                pipe.load_steering(directory, name=name)
        config = self.config
        call: dict[str, Any] = {"num_inference_steps": config.num_inference_steps}
        for key in ("guidance_scale", "height", "width"):
            if getattr(config, key) is not None:
                call[key] = getattr(config, key)
        count = 0
        bar = tqdm(
            batches,
            desc=f"render (process {self.state.process_index})",
            disable=not self.progress,
            position=self.state.process_index,
        )
        for batch in bar:
            method = batch[0].method
            if method == UNSTEERED:
                steering = {"steering_strength": 0.0}
            else:
                chosen = parse_method(method)
                strengths = {
                    name: (batch[0].strength if name == chosen.steerer_name else 0.0) for name in pipe.steerers
                }
                steering = {
                    "steering_strength": strengths,
                    "steering_gate": chosen.gated,
                    "steering_cfg": config.steering_cfg,
                }
            generators = [torch.Generator().manual_seed(job.seed) for job in batch]
            with torch.no_grad():
                images = pipe([job.prompt for job in batch], generator=generators, **call, **steering).images
            for job, image in zip(batch, images, strict=True):
                path = self.image_path(job, ids)
                temporary = path.with_suffix(f".{self.state.process_index}.tmp.png")
                image.save(temporary)
                temporary.replace(path)  # atomic: a crashed run never leaves half an image
                count += 1
        return count

    def batches(self, jobs: Sequence[Job]) -> list[list[Job]]:
        """Jobs of one method and strength, in chunks of ``batch_size`` (a fixed order)."""
        grouped: dict[tuple[str, float], list[Job]] = {}
        for job in jobs:
            grouped.setdefault((job.method, job.strength), []).append(job)
        size = self.config.batch_size
        return [items[i : i + size] for items in grouped.values() for i in range(0, len(items), size)]

    # -- scoring ---------------------------------------------------------------------------
    def scorer(self):
        from .metrics import ClipScorer, default_clip_for

        config = self.config
        name, pretrained = (config.clip_model, config.clip_pretrained)
        if name is None:
            name, pretrained = default_clip_for(config.model)
        scorer = ClipScorer(name, pretrained, device=self.device, batch_size=config.score_batch_size)
        # every text in one fixed batch on every process: features do not depend on sharding
        scorer.text_features(list(dict.fromkeys(config.concept_prompts + config.control_prompts)))
        return scorer

    def score(self, scorer, jobs: Sequence[Job], ids: dict[str, str]) -> list[dict[str, Any]]:
        config = self.config
        if not jobs:
            return []
        images = [Image.open(self.image_path(job, ids)).convert("RGB") for job in jobs]
        references = [
            Image.open(self.image_path(Job(UNSTEERED, 0.0, job.group, job.prompt, job.seed), ids)).convert("RGB")
            for job in jobs
        ]
        features = scorer.image_features(images)
        reference_features = scorer.image_features(references)
        clip_scores = scorer.clip_score(images, [job.prompt for job in jobs], image_features=features)
        presence = scorer.concept_presence(
            images,
            config.concept,
            template=config.concept_template,
            neutral=config.neutral_caption,
            image_features=features,
        )
        similarity = scorer.image_similarity(features, reference_features).clamp(max=1.0)
        detector: list[dict[str, Any]] = [{} for _ in jobs]
        if config.use_shapes_detector():
            from ..shapes.detect import ShapeJudge, concept_drawn, read_scenes

            judge = ShapeJudge(scorer.model, scorer.preprocess, scorer.tokenizer, device=self.device)
            readings = read_scenes(judge, images, [job.prompt for job in jobs])
            for index, (job, reading) in enumerate(zip(jobs, readings, strict=True)):
                drawn = concept_drawn(reading, job.prompt, config.concept)
                detector[index] = {
                    "concept_drawn": None if drawn is None else float(drawn),
                    "objects_as_prompted": float(reading.objects_as_prompted),
                    "background_as_prompted": float(reading.background_as_prompted),
                }
        rows = []
        for index, job in enumerate(jobs):
            method = None if job.method == UNSTEERED else parse_method(job.method)
            change = np.abs(
                np.asarray(images[index], dtype=np.float32) - np.asarray(references[index], dtype=np.float32)
            ).mean()
            rows.append(
                {
                    "model": config.model,
                    "concept": config.concept,
                    "method": job.method,
                    "map": method.map if method else "",
                    "gating": method.gating if method else "",
                    "strength": job.strength,
                    "group": job.group,
                    "prompt": job.prompt,
                    "seed": job.seed,
                    "clip_score": round(float(clip_scores[index]), 5),
                    "concept_presence": round(float(presence[index]), 5),
                    "clip_similarity": round(float(similarity[index]), 5),
                    "pixel_change": round(float(change) / 255.0, 6),
                    **detector[index],
                    "image": _relative(self.image_path(job, ids), self.out),
                }
            )
        return rows


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path.resolve())


def run_evaluation(config: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Run ``config`` (on every process of an ``accelerate launch``, or on one).

    Example:
        >>> from dsas_diffusion.eval import load_config, run_evaluation
        >>> config = load_config("benchmarks/eval_banana.yaml", {"out": "outputs/eval-banana"})  # doctest: +SKIP
        >>> result = run_evaluation(config)  # doctest: +SKIP
        >>> result.methods[0]["method"], result.methods[0]["hypervolume_clip"]  # doctest: +SKIP
    """
    from .report import write_report

    config.validate()
    runner = _Runner(config, progress)
    state = runner.state
    methods = runner.methods()
    dirs = runner.steering_dirs(methods)
    ids = {name: steering_id(directory) for name, directory in dirs.items()}
    jobs = runner.jobs(methods)
    batches = runner.batches(jobs)
    # every process lists what is missing before anyone renders, so all see the same list
    missing = [batch for batch in batches if not all(runner.image_path(job, ids).is_file() for job in batch)]
    missing_images = sum(len(batch) for batch in missing)
    state.wait_for_everyone()
    runner.render(missing[state.process_index :: state.num_processes], ids, dirs)
    state.wait_for_everyone()
    shard_dir = runner.out / "shards"
    if state.is_main_process:
        shard_dir.mkdir(exist_ok=True)
        for stale in shard_dir.glob("rows-*.json"):
            stale.unlink()
    state.wait_for_everyone()
    # fixed chunks of images, dealt out to the processes: a chunk is scored as one batch
    # whichever process gets it, so the rows equal a one-process run's exactly
    size = config.score_batch_size
    chunks = [jobs[i : i + size] for i in range(0, len(jobs), size)]
    scorer = runner.scorer()
    rows = []
    for chunk in tqdm(
        chunks[state.process_index :: state.num_processes], desc="score", disable=not progress, leave=False
    ):
        rows += runner.score(scorer, chunk, ids)
    (shard_dir / f"rows-{state.process_index}.json").write_text(json.dumps(rows))
    state.wait_for_everyone()
    result = EvalResult(rows=[], generated=missing_images, reused=len(jobs) - missing_images, out=runner.out)
    if state.is_main_process:
        merged = []
        for index in range(state.num_processes):
            merged += json.loads((shard_dir / f"rows-{index}.json").read_text())
        order = {job: position for position, job in enumerate(jobs)}
        merged.sort(key=lambda r: order[Job(r["method"], r["strength"], r["group"], r["prompt"], r["seed"])])
        result.rows = merged
        result.summary, result.methods = write_report(
            config,
            [m.name for m in methods],
            merged,
            runner.out,
            run={
                "config": asdict(config),
                "images": len(jobs),
                "generated": missing_images,
                "reused": len(jobs) - missing_images,
                "processes": state.num_processes,
                "steering": {name: str(directory) for name, directory in dirs.items()},
            },
        )
    state.wait_for_everyone()
    return result
