"""Running an evaluation: fit (or load) the steerers, render every (method, strength, prompt,
seed) image once into the cache, score the images, and hand the rows to :mod:`.report`.

Work is split over processes with ``accelerate`` (``accelerate launch -m dsas_diffusion.eval``):
the main process fits the steerers, then every process renders its share of the missing
image batches, scores its share of fixed chunks of images, and the main process writes the
tables and plots. The pieces live in :mod:`.cache` (jobs and image files), :mod:`.steerers`
(fitting and reuse), :mod:`.render`, :mod:`.scoring` and :mod:`.report`.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ..steering.persistence import CONFIG_NAME
from .adaptive import AdaptiveSweep
from .baselines import baseline_defaults
from .cache import UNSTEERED, ImageCache, Job, list_jobs, model_id, steering_id
from .config import EvalConfig, Method
from .render import batches, render
from .scoring import make_scorer, score_jobs
from .steerers import allowed_methods, fit_or_reuse, prompt_gate_openings
from .text import (
    LanguageModelLoader,
    TextScorer,
    check_text_config,
    concept_words_of,
    is_text_config,
    render_text,
    score_text_jobs,
    text_settings,
)

__all__ = ["EvalResult", "Job", "run_evaluation"]


@dataclass
class EvalResult:
    """What a run produced (on the main process; other processes get ``rows=[]``)."""

    rows: list[dict[str, Any]]
    summary: list[dict[str, Any]] = field(default_factory=list)
    methods: list[dict[str, Any]] = field(default_factory=list)
    generated: int = 0  # images rendered by this run, all processes together
    reused: int = 0  # images found in the cache
    out: Path = Path()


class _Pipeline:
    """The model's DSAS pipeline, loaded on first use only (a fully cached run loads none)."""

    def __init__(self, model: str, device: str) -> None:
        self.model, self.device, self.pipe = model, device, None

    def __call__(self) -> Any:
        if self.pipe is None:
            from ..diffusion.loading import load_pipeline

            self.pipe = load_pipeline(self.model).to(self.device)
            self.pipe.set_progress_bar_config(disable=True)
        return self.pipe


def _merge_shards(shard_dir: Path, prefix: str, processes: int, jobs: list[Job]) -> list[dict[str, Any]]:
    merged = []
    for index in range(processes):
        merged += json.loads((shard_dir / f"{prefix}-{index}.json").read_text())
    order = {job: position for position, job in enumerate(jobs)}
    merged.sort(key=lambda r: order[Job(r["method"], r["strength"], r["group"], r["prompt"], r["seed"])])
    return merged


def _steerer_bounds(methods: list[Method], dirs: dict[str, Path]) -> dict[str, float | None]:
    """Per method, the largest strength its steerer accepts (``max_strength`` in its file)."""
    bounds: dict[str, float | None] = {}
    for method in methods:
        if method.is_baseline:
            bounds[method.name] = None
            continue
        config = json.loads((dirs[method.steerer_name] / CONFIG_NAME).read_text()).get("config", {})
        bound = config.get("max_strength")
        bounds[method.name] = None if bound is None else float(bound)
    return bounds


def screen_pairs(rows: list[dict[str, Any]], prompts: list[str], per_prompt: int) -> list[tuple[str, int]]:
    """The spatial test's (prompt, seed) units: per pair prompt, the first ``per_prompt``
    seeds whose unsteered image shows both the concept object and the others.

    Examples:
        >>> rows = [{"prompt": "p", "seed": s, "concept_drawn": 1.0, "others_drawn": float(s % 2)}
        ...         for s in range(6)]
        >>> screen_pairs(rows, ["p", "q"], 2)
        [('p', 1), ('p', 3)]
    """
    units = []
    for prompt in prompts:
        seeds = sorted(
            r["seed"]
            for r in rows
            if r["prompt"] == prompt and r.get("concept_drawn") == 1.0 and r.get("others_drawn") == 1.0
        )
        units += [(prompt, seed) for seed in seeds[:per_prompt]]
    return units


def run_evaluation(config: EvalConfig, *, progress: bool = True) -> EvalResult:
    """Run ``config`` (on every process of an ``accelerate launch``, or on one).

    With ``strengths: auto`` the run goes in rounds: each round renders and scores the next
    strength of every method still sweeping (:class:`~.adaptive.AdaptiveSweep`); otherwise
    one round renders the fixed strengths.

    Examples:
        >>> from dsas_diffusion.eval import load_config, run_evaluation
        >>> config = load_config("benchmarks/eval_banana.yaml", {"out": "outputs/eval-banana"})  # doctest: +SKIP
        >>> result = run_evaluation(config)  # doctest: +SKIP
        >>> result.methods[0]["method"], result.methods[0]["hypervolume_clip"]  # doctest: +SKIP
    """
    config.validate()
    run = _EvaluationRun(config, progress)
    rows, pair_units, screened = run.screen_pairs()
    for round_index in itertools.count():
        strengths = None if run.sweep is None else run.sweep.strengths
        jobs = list_jobs(config, run.methods, strengths, pair_units, greedy_control=run.text)
        new = [job for job in jobs if job not in run.scored]
        rows += run.round(new, f"rows-{round_index}")
        run.scored.update(new)
        if run.sweep is None or not run.sweep.update(rows):
            break
    order = {job: position for position, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[Job(r["method"], r["strength"], r["group"], r["prompt"], r["seed"])])
    # the images the report rests on: the sweep's, plus the screened pair images not chosen
    total = len(jobs) + len(screened) - (len(pair_units) if pair_units is not None else 0)
    result = EvalResult(rows=[], generated=run.generated, reused=total - run.generated, out=run.out)
    if run.state.is_main_process:
        result.rows = rows
        details = {"images": total, "rounds": round_index + 1, "pairs_screened": screened, "pair_units": pair_units}
        result.summary, result.methods = run.report(rows, details)
    run.state.wait_for_everyone()
    return result


class _EvaluationRun:
    """One evaluation's processes, model, steerers, image cache and scorer, and the rounds it
    renders and scores (:func:`run_evaluation`)."""

    def __init__(self, config: EvalConfig, progress: bool) -> None:
        from accelerate import PartialState

        self.config, self.progress = config, progress
        self.text = is_text_config(config)
        if self.text:
            check_text_config(config)
        # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun share the
        # work over gloo on the CPU
        self.state = state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
        self.device = config.device or (str(state.device) if state.device.type != "mps" else "cpu")
        self.out = out = Path(config.out)
        images_dir = Path(config.cache_dir) if config.cache_dir else out / "images"
        self.shard_dir = out / "shards"
        if state.is_main_process:
            images_dir.mkdir(parents=True, exist_ok=True)
            self.shard_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.shard_dir.glob("rows-*.json"):
                stale.unlink()
        state.wait_for_everyone()
        identity = model_id(config.model)
        self.pipeline = (
            LanguageModelLoader(config.model, self.device) if self.text else _Pipeline(config.model, self.device)
        )
        self.methods = methods = allowed_methods(config)
        self.dirs = fit_or_reuse(
            config, methods, out, identity, self.pipeline, fit_here=state.is_main_process, progress=progress
        )
        self.cache = self._image_cache(images_dir, identity)
        self.scorer = TextScorer(self.pipeline, config, self.dirs) if self.text else make_scorer(config, self.device)
        self.sweep = None
        if config.adaptive:
            presence_key = "concept_drawn" if config.use_shapes_detector() else "concept_presence"
            similarity_key = config.similarity if self.text else "clip_similarity"
            bounds = _steerer_bounds(methods, self.dirs)
            self.sweep = AdaptiveSweep(
                config.sweep_settings, [m.name for m in methods], bounds, presence_key, similarity_key
            )
        self.scored: set[Job] = set()
        self.generated = 0

    def _image_cache(self, images_dir: Path, identity: str) -> ImageCache:
        """The cache of rendered images (texts), keyed by the settings, the steerers, the
        baselines' arguments and the prompt gate's openings (read from the main process's)."""
        config, out, pipeline, state = self.config, self.out, self.pipeline, self.state
        if state.is_main_process:
            prompt_gate_openings(config, out, identity, pipeline)
        state.wait_for_everyone()
        openings = prompt_gate_openings(config, out, identity, pipeline, fit_here=False)
        given = {
            "negative-prompt": {"negative_prompt": config.concept},
            "sld": {"safety_concept": config.concept},
            "bad-words": {"bad_words": concept_words_of(config) if self.text else None},
        }
        return ImageCache(
            images_dir,
            {**(text_settings(config) if self.text else config.generation_settings()), "model": identity},
            {name: steering_id(directory) for name, directory in self.dirs.items()},
            suffix=".json" if self.text else ".png",
            baselines={m.name: given[m.name] for m in self.methods if m.is_baseline},
            prompt_gates=openings,
        )

    def round(self, new: list[Job], prefix: str) -> list[dict[str, Any]]:
        """Render what ``new`` misses from the cache, score it, return its rows (in order)."""
        config, state, cache = self.config, self.state, self.cache
        # every process lists what is missing before anyone renders, so all see the same list; a
        # prompt-gated job is rendered as the job whose image stands for it
        drawn = list(dict.fromkeys(cache.resolve(job) for job in new))
        missing = [batch for batch in batches(drawn, config.batch_size) if not cache.has(batch)]
        self.generated += sum(len(batch) for batch in missing)
        state.wait_for_everyone()
        share = missing[state.process_index :: state.num_processes]
        if share:
            draw = render_text if self.text else render
            draw(
                self.pipeline(),
                config,
                share,
                cache,
                self.dirs,
                process_index=state.process_index,
                progress=self.progress,
            )
        state.wait_for_everyone()
        # fixed chunks of images, dealt out to the processes: a chunk is scored as one batch
        # whichever process gets it, so the rows equal a one-process run's exactly
        size = config.score_batch_size
        chunks = [new[i : i + size] for i in range(0, len(new), size)]
        mine = []
        for chunk in tqdm(
            chunks[state.process_index :: state.num_processes], desc="score", disable=not self.progress, leave=False
        ):
            mine += (
                score_text_jobs(self.scorer, config, chunk, cache)
                if self.text
                else score_jobs(self.scorer, config, chunk, cache, self.out, self.device)
            )
        (self.shard_dir / f"{prefix}-{state.process_index}.json").write_text(json.dumps(mine))
        state.wait_for_everyone()
        return _merge_shards(self.shard_dir, prefix, state.num_processes, new)

    def screen_pairs(self) -> tuple[list[dict[str, Any]], list[Any] | None, list[list[Any]]]:
        """With ``pairs_screen_seeds``: render the two-object prompts unsteered and keep the
        units that show both objects. Returns the kept rows, the units (``None`` without
        screening) and, per screened image, prompt, seed, concept drawn, others drawn."""
        config = self.config
        if config.pairs_screen_seeds is None:
            return [], None, []
        screening = [
            Job(UNSTEERED, 0.0, "pairs", prompt, seed)
            for seed in range(config.pairs_screen_seeds)
            for prompt in config.pairs_prompts
        ]
        screen_rows = self.round(screening, "rows-screen")
        screened = [[r["prompt"], r["seed"], r.get("concept_drawn"), r.get("others_drawn")] for r in screen_rows]
        pair_units = screen_pairs(screen_rows, config.pairs_prompts, len(config.seeds))
        chosen = set(pair_units)
        self.scored.update(Job(UNSTEERED, 0.0, "pairs", prompt, seed) for prompt, seed in pair_units)
        return [r for r in screen_rows if (r["prompt"], r["seed"]) in chosen], pair_units, screened

    def report(self, rows: list[dict[str, Any]], details: Mapping[str, Any]) -> tuple[Any, Any]:
        """Write the report (main process); its summary and the methods' figures."""
        from .report import write_report
        from .text_report import write_text_report

        config, sweep = self.config, self.sweep
        if self.text:
            report = write_text_report
        else:
            report = partial(
                write_report, defaults=baseline_defaults(config.model, config.guidance_scale, self.methods)
            )
        run = {
            "config": asdict(config),
            "images": details["images"],
            "generated": self.generated,
            "reused": details["images"] - self.generated,
            "processes": self.state.num_processes,
            "rounds": details["rounds"],
            # per screened pair image: prompt, seed, concept drawn, others drawn
            "pairs_screened": details["pairs_screened"],
            "pair_units": details["pair_units"],
            "sweep_stopped": None if sweep is None else sweep.stopped,
            "steering": {name: str(directory) for name, directory in self.dirs.items()},
        }
        stopped = None if sweep is None else sweep.stopped
        return report(config, [m.name for m in self.methods], rows, self.out, run=run, stopped=stopped)
