"""Rendering an evaluation's images: batches of jobs of one method and strength, written
atomically into the image cache."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .baselines import baseline_images, safe_latent_diffusion
from .cache import UNSTEERED, ImageCache, Job
from .config import EvalConfig, parse_method

__all__ = ["batches", "render"]


def batches(jobs: Sequence[Job], size: int) -> list[list[Job]]:
    """Jobs of one method and strength, in chunks of ``size`` (a fixed order)."""
    grouped: dict[tuple[str, float], list[Job]] = {}
    for job in jobs:
        grouped.setdefault((job.method, job.strength), []).append(job)
    return [items[i : i + size] for items in grouped.values() for i in range(0, len(items), size)]


def _steering_arguments(config: EvalConfig, method: str, strength: float, loaded: Sequence[str]) -> dict[str, Any]:
    """The steering arguments of a pipeline call for ``method`` at ``strength`` (every other
    loaded steerer at strength 0)."""
    if method == UNSTEERED:
        return {"steering_strength": 0.0}
    chosen = parse_method(method)
    return {
        "steering_strength": {name: (strength if name == chosen.steerer_name else 0.0) for name in loaded},
        "steering_gate": chosen.gate,
        "steering_cfg": config.steering_cfg,
    }


def render(
    pipe: Any,
    config: EvalConfig,
    work: Sequence[Sequence[Job]],
    cache: ImageCache,
    steering_dirs: Mapping[str, Path],
    *,
    process_index: int = 0,
    progress: bool = True,
) -> int:
    """Render every batch of ``work`` with ``pipe`` into ``cache``; returns the image count.

    Each image is written under a temporary name and renamed into place, so a crashed run
    never leaves half an image in the cache."""
    if not work:
        return 0
    for name, directory in steering_dirs.items():
        if name not in pipe.steerers:
            pipe.load_steering(directory, name=name)
    call: dict[str, Any] = {"num_inference_steps": config.num_inference_steps}
    for key in ("guidance_scale", "height", "width"):
        if getattr(config, key) is not None:
            call[key] = getattr(config, key)
    count = 0
    safe = None  # Safe Latent Diffusion on pipe's components, built on first use
    bar = tqdm(work, desc=f"render (process {process_index})", disable=not progress, position=process_index)
    for batch in bar:
        method, strength = batch[0].method, batch[0].strength
        prompts = [job.prompt for job in batch]
        generators = [torch.Generator().manual_seed(job.seed) for job in batch]
        chosen = None if method == UNSTEERED else parse_method(method)
        with torch.no_grad():
            if chosen is not None and chosen.is_baseline:
                if chosen.name == "sld" and safe is None:
                    safe = safe_latent_diffusion(pipe, config.concept)
                images = baseline_images(pipe, chosen, strength, config.concept, prompts, generators, call, safe)
            else:
                steering = _steering_arguments(config, method, strength, list(pipe.steerers))
                images = pipe(prompts, generator=generators, **call, **steering).images
        for job, image in zip(batch, images, strict=True):
            path = cache.path(job)
            temporary = path.with_suffix(f".{process_index}.tmp.png")
            image.save(temporary)
            temporary.replace(path)
            count += 1
    return count
