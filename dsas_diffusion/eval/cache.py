"""What the evaluation caches and how it names it: the jobs (one image each), the model and
steering identities, and the image file of each job.

Images are cached by a hash of everything that decides them, so a rerun renders nothing and
an extended sweep renders only what is new; fitted steerers are reused while their prompts
and fit settings are unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..shapes import resolve_model_path
from ..steering.persistence import CONFIG_NAME, WEIGHTS_NAME
from .config import EvalConfig, Method, parse_method

__all__ = [
    "CACHE_VERSION",
    "UNSTEERED",
    "ImageCache",
    "Job",
    "digest",
    "job_fields",
    "list_jobs",
    "model_id",
    "steering_id",
]

UNSTEERED = "unsteered"
CACHE_VERSION = 1


@dataclass(frozen=True)
class Job:
    """One image: a method (or ``"unsteered"``) at a strength, for one prompt and seed."""

    method: str
    strength: float
    group: str  # "concept", "control", "pairs" or "empty" (the empty prompt)
    prompt: str
    seed: int

    @property
    def reference(self) -> Job:
        """The unsteered image of the same prompt and seed."""
        return Job(UNSTEERED, 0.0, self.group, self.prompt, self.seed)


def list_jobs(
    config: EvalConfig,
    methods: Sequence[Method],
    strengths: Mapping[str, Sequence[float]] | None = None,
    pair_units: Sequence[tuple[str, int]] | None = None,
    *,
    greedy_control: bool = False,
) -> list[Job]:
    """Every image of the run, unsteered first, in a fixed order: each method at its
    ``strengths`` (default: the config's fixed strengths), every seed, every group (concept,
    control and, when the config has them, the spatial test's pairs). ``pair_units``: the
    (prompt, seed) units of the pairs when they were screened (default: every pair prompt
    with every seed). ``greedy_control``: control prompts with the first seed only (a
    language model's greedy continuations do not depend on the seed). With
    ``config.empty_seeds``, the empty prompt with seeds ``0 .. empty_seeds - 1`` as well."""
    groups = [("concept", config.concept_prompts), ("control", config.control_prompts)]
    if config.pairs_prompts and pair_units is None:
        groups.append(("pairs", config.pairs_prompts))
    runs = [(UNSTEERED, 0.0)] + [
        (m.name, float(s))
        for m in methods
        for s in (config.strength_list if strengths is None else strengths.get(m.name, ()))
        if s != 0.0
    ]
    jobs = []
    for method, strength in runs:
        jobs += [
            Job(method, strength, group, prompt, seed)
            for seed in config.seeds
            for group, prompts in groups
            for prompt in prompts
            if not (greedy_control and group == "control" and seed != config.seeds[0])
        ]
        jobs += [Job(method, strength, "pairs", prompt, seed) for prompt, seed in pair_units or ()]
        jobs += [Job(method, strength, "empty", "", seed) for seed in range(config.empty_seeds or 0)]
    return jobs


def job_fields(config: EvalConfig, job: Job) -> dict[str, Any]:
    """The columns of a result row that say which job it is."""
    method = None if job.method == UNSTEERED else parse_method(job.method)
    return {
        "model": config.model,
        "concept": config.concept,
        "method": job.method,
        "map": method.map if method else "",
        "gating": method.gating if method else "",
        "strength": job.strength,
        "group": job.group,
        "prompt": job.prompt,
        "seed": job.seed,
    }


def digest(payload: Any) -> str:
    """A short stable hash of a JSON-able payload."""
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

    Examples:
        >>> model_id("shapes-sd") == model_id(resolve_model_path("shapes-sd"))
        True
    """
    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return str(model)
    hasher = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        hasher.update(file.relative_to(path).as_posix().encode() + b"\0")
        hasher.update(hashlib.sha256(file.read_bytes()).digest())
    return "sha256:" + hasher.hexdigest()[:32]


def steering_id(directory: Path) -> str:
    """A hash of a saved steerer (its weights and its config without the creation time): a
    refitted steerer that differs invalidates its cached images, an identical one does not."""
    config = _without_timestamps(json.loads((directory / CONFIG_NAME).read_text()))
    weights = hashlib.sha256((directory / WEIGHTS_NAME).read_bytes()).hexdigest()
    return digest({"config": config, "weights": weights})


class ImageCache:
    """Where each job's image lives: ``directory/<hash>.png`` (a continuation's:
    ``<hash>.json``, with ``suffix=".json"``), the hash taken over the generation settings,
    the model's identity, the method, the steerer's identity, the strength, the prompt and
    the seed; a baseline's also over what it is given (``baselines``: per baseline, e.g.
    ``{"negative-prompt": {"negative_prompt": "banana"}}``).

    A prompt-gated job has no image of its own (:meth:`resolve`): ``prompt_gates`` says per
    prompt whether the prompt-level gate opens."""

    def __init__(
        self,
        directory: Path,
        settings: Mapping[str, Any],
        steering_ids: Mapping[str, str],
        suffix: str = ".png",
        *,
        baselines: Mapping[str, Any] | None = None,
        prompt_gates: Mapping[str, bool] | None = None,
    ) -> None:
        self.directory, self.suffix = Path(directory), suffix
        self.settings = dict(settings)
        self.steering_ids = dict(steering_ids)
        self.baselines = dict(baselines or {})
        self.prompt_gates = dict(prompt_gates or {})

    def resolve(self, job: Job) -> Job:
        """The job whose image stands for ``job``: for a prompt-gated method, the uniform
        method's job where the prompt-level gate opens and the unsteered image where it stays
        shut (the call is then the stock one); any other job itself."""
        if job.method == UNSTEERED or not parse_method(job.method).prompt_gated:
            return job
        if job.prompt not in self.prompt_gates:
            raise KeyError(f"the prompt-level gate was not read for {job.prompt!r}")
        if not self.prompt_gates[job.prompt]:
            return job.reference
        return Job(parse_method(job.method).uniform.name, job.strength, job.group, job.prompt, job.seed)

    def path(self, job: Job) -> Path:
        job = self.resolve(job)
        method = None if job.method == UNSTEERED else parse_method(job.method)
        steering = None if method is None or method.is_baseline else self.steering_ids[method.steerer_name]
        extra = {"baseline": self.baselines[method.name]} if method is not None and method.is_baseline else {}
        key = digest(
            {
                "settings": self.settings,
                # the spelling images were cached under before the one gate vocabulary ('uniform' for
                # 'none'), so that existing caches stay valid
                "method": job.method.replace("/none", "/uniform"),
                "steering": steering,
                "strength": job.strength,
                "prompt": job.prompt,
                "seed": job.seed,
                "version": CACHE_VERSION,
                **extra,
            }
        )
        return self.directory / f"{key}{self.suffix}"

    def has(self, jobs: Sequence[Job]) -> bool:
        """Whether every job's image is cached."""
        return all(self.path(job).is_file() for job in jobs)
