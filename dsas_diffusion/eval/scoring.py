"""Scoring an evaluation's images: CLIP score, concept presence, similarity and pixel change
against the unsteered image, and the exact Shapes detector where it applies (on the empty
prompt's images, what is drawn unasked; on the two-object images, the pixel change inside
and outside the concept object's mask)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from .cache import ImageCache, Job, job_fields
from .config import EvalConfig
from .metrics import ClipScorer, default_clip_for, dilate, pixel_change, pixel_change_by_region

__all__ = ["MASK_DILATION", "make_scorer", "score_jobs"]

#: pixels by which the concept object's mask is grown before the change outside it is measured
MASK_DILATION = 3


def make_scorer(config: EvalConfig, device: str) -> ClipScorer:
    """The config's CLIP scorer, with every evaluation prompt's text features computed in
    one fixed batch (so features do not depend on how the images are sharded)."""
    name, pretrained = config.clip_model, config.clip_pretrained
    if name is None:
        name, pretrained = default_clip_for(config.model)
    scorer = ClipScorer(name, pretrained, device=device, batch_size=config.score_batch_size)
    empty = [""] if config.empty_seeds else []
    scorer.text_features(
        list(dict.fromkeys(config.concept_prompts + config.control_prompts + config.pairs_prompts + empty))
    )
    return scorer


def _relative(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path.resolve())


def _unprompted_rows(judge: Any, config: EvalConfig, images: list[Image.Image]) -> list[dict[str, Any]]:
    """The empty prompt's images: is the concept drawn (read without a caption)?"""
    from ..shapes import read_objects, unprompted_concept

    return [
        {"concept_drawn": float(bool(unprompted_concept(objects, config.concept)))}
        for objects in read_objects(judge, images)
    ]


def _region_change(config: EvalConfig, image: Image.Image, reference: Image.Image, prompt: str) -> dict[str, float]:
    """The pixel change inside and outside the unsteered image's concept object (dilated), on
    the 0-1 scale of ``pixel_change``."""
    from ..shapes import concept_mask

    mask = dilate(concept_mask(reference, prompt, config.concept), MASK_DILATION)
    inside, outside = pixel_change_by_region(image, reference, mask)
    return {"inside_change": round(inside / 255.0, 6), "outside_change": round(outside / 255.0, 6)}


def _detector_rows(
    scorer: ClipScorer,
    config: EvalConfig,
    images: list[Image.Image],
    references: list[Image.Image],
    jobs: Sequence[Job],
    device: str,
):
    from ..shapes import ShapeJudge, concept_drawn, others_drawn, read_scenes

    judge = ShapeJudge(scorer.model, scorer.preprocess, scorer.tokenizer, device=device)
    unprompted = [i for i, job in enumerate(jobs) if job.group == "empty"]
    prompted = [i for i, job in enumerate(jobs) if job.group != "empty"]
    rows: list[dict[str, Any]] = [{} for _ in jobs]
    for i, row in zip(unprompted, _unprompted_rows(judge, config, [images[i] for i in unprompted]), strict=True):
        rows[i] = row
    readings = read_scenes(judge, [images[i] for i in prompted], [jobs[i].prompt for i in prompted])
    for i, reading in zip(prompted, readings, strict=True):
        job = jobs[i]
        drawn = concept_drawn(reading, job.prompt, config.concept)
        row = {
            "concept_drawn": None if drawn is None else float(drawn),
            "objects_as_prompted": float(reading.objects_as_prompted),
            "background_as_prompted": float(reading.background_as_prompted),
        }
        if job.group == "pairs":
            others = others_drawn(reading, job.prompt, config.concept)
            row["others_drawn"] = None if others is None else float(others)
            row.update(_region_change(config, images[i], references[i], job.prompt))
        rows[i] = row
    return rows


def score_jobs(
    scorer: ClipScorer, config: EvalConfig, jobs: Sequence[Job], cache: ImageCache, out: Path, device: str = "cpu"
) -> list[dict[str, Any]]:
    """One row per job, every metric of its image (scored as one batch)."""
    if not jobs:
        return []
    images = [Image.open(cache.path(job)).convert("RGB") for job in jobs]
    references = [Image.open(cache.path(job.reference)).convert("RGB") for job in jobs]
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
    detector = (
        _detector_rows(scorer, config, images, references, jobs, device)
        if config.use_shapes_detector()
        else [{}] * len(jobs)
    )
    rows = []
    for index, job in enumerate(jobs):
        rows.append(
            {
                **job_fields(config, job),
                "clip_score": round(float(clip_scores[index]), 5),
                "concept_presence": round(float(presence[index]), 5),
                "clip_similarity": round(float(similarity[index]), 5),
                "pixel_change": round(pixel_change(images[index], references[index]) / 255.0, 6),
                **detector[index],
                "image": _relative(cache.path(job), out),
            }
        )
    return rows
