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
    from accelerate import PartialState

    from .report import write_report
    from .text_report import write_text_report

    config.validate()
    text = is_text_config(config)
    if text:
        check_text_config(config)
    # without a GPU, processes started by `accelerate launch --multi_gpu` / torchrun share the
    # work over gloo on the CPU
    state = PartialState(cpu=config.device == "cpu" or not torch.cuda.is_available())
    device = config.device or (str(state.device) if state.device.type != "mps" else "cpu")
    out = Path(config.out)
    images_dir = Path(config.cache_dir) if config.cache_dir else out / "images"
    shard_dir = out / "shards"
    if state.is_main_process:
        images_dir.mkdir(parents=True, exist_ok=True)
        shard_dir.mkdir(parents=True, exist_ok=True)
        for stale in shard_dir.glob("rows-*.json"):
            stale.unlink()
    state.wait_for_everyone()
    identity = model_id(config.model)
    pipeline = LanguageModelLoader(config.model, device) if text else _Pipeline(config.model, device)

    methods = allowed_methods(config)
    dirs = fit_or_reuse(config, methods, out, identity, pipeline, fit_here=state.is_main_process, progress=progress)
    if state.is_main_process:
        prompt_gate_openings(config, out, identity, pipeline)
    state.wait_for_everyone()
    openings = prompt_gate_openings(config, out, identity, pipeline, fit_here=False)  # the main process's readings
    given = {
        "negative-prompt": {"negative_prompt": config.concept},
        "sld": {"safety_concept": config.concept},
        "bad-words": {"bad_words": concept_words_of(config) if text else None},
    }
    cache = ImageCache(
        images_dir,
        {**(text_settings(config) if text else config.generation_settings()), "model": identity},
        {name: steering_id(directory) for name, directory in dirs.items()},
        suffix=".json" if text else ".png",
        baselines={m.name: given[m.name] for m in methods if m.is_baseline},
        prompt_gates=openings,
    )
    scorer = TextScorer(pipeline, config, dirs) if text else make_scorer(config, device)
    sweep = None
    if config.adaptive:
        presence_key = "concept_drawn" if config.use_shapes_detector() else "concept_presence"
        similarity_key = config.similarity if text else "clip_similarity"
        sweep = AdaptiveSweep(
            config.sweep_settings,
            [m.name for m in methods],
            _steerer_bounds(methods, dirs),
            presence_key,
            similarity_key,
        )

    def run_round(new: list[Job], prefix: str) -> list[dict[str, Any]]:
        """Render what ``new`` misses from the cache, score it, return its rows (in order)."""
        nonlocal generated
        # every process lists what is missing before anyone renders, so all see the same list; a
        # prompt-gated job is rendered as the job whose image stands for it
        drawn = list(dict.fromkeys(cache.resolve(job) for job in new))
        missing = [batch for batch in batches(drawn, config.batch_size) if not cache.has(batch)]
        generated += sum(len(batch) for batch in missing)
        state.wait_for_everyone()
        share = missing[state.process_index :: state.num_processes]
        if share:
            draw = render_text if text else render
            draw(pipeline(), config, share, cache, dirs, process_index=state.process_index, progress=progress)
        state.wait_for_everyone()
        # fixed chunks of images, dealt out to the processes: a chunk is scored as one batch
        # whichever process gets it, so the rows equal a one-process run's exactly
        size = config.score_batch_size
        chunks = [new[i : i + size] for i in range(0, len(new), size)]
        mine = []
        for chunk in tqdm(
            chunks[state.process_index :: state.num_processes], desc="score", disable=not progress, leave=False
        ):
            mine += (
                score_text_jobs(scorer, config, chunk, cache)
                if text
                else score_jobs(scorer, config, chunk, cache, out, device)
            )
        (shard_dir / f"{prefix}-{state.process_index}.json").write_text(json.dumps(mine))
        state.wait_for_everyone()
        return _merge_shards(shard_dir, prefix, state.num_processes, new)

    rows: list[dict[str, Any]] = []
    scored: set[Job] = set()
    generated = 0
    pair_units = None
    screened: list[list[Any]] = []
    if config.pairs_screen_seeds is not None:
        screening = [
            Job(UNSTEERED, 0.0, "pairs", prompt, seed)
            for seed in range(config.pairs_screen_seeds)
            for prompt in config.pairs_prompts
        ]
        screen_rows = run_round(screening, "rows-screen")
        screened = [[r["prompt"], r["seed"], r.get("concept_drawn"), r.get("others_drawn")] for r in screen_rows]
        pair_units = screen_pairs(screen_rows, config.pairs_prompts, len(config.seeds))
        chosen = set(pair_units)
        rows += [r for r in screen_rows if (r["prompt"], r["seed"]) in chosen]
        scored.update(Job(UNSTEERED, 0.0, "pairs", prompt, seed) for prompt, seed in pair_units)
    for round_index in itertools.count():
        jobs = list_jobs(config, methods, None if sweep is None else sweep.strengths, pair_units, greedy_control=text)
        new = [job for job in jobs if job not in scored]
        rows += run_round(new, f"rows-{round_index}")
        scored.update(new)
        if sweep is None or not sweep.update(rows):
            break
    order = {job: position for position, job in enumerate(jobs)}
    rows.sort(key=lambda r: order[Job(r["method"], r["strength"], r["group"], r["prompt"], r["seed"])])

    # the images the report rests on: the sweep's, plus the screened pair images not chosen
    total = len(jobs) + len(screened) - (len(pair_units) if pair_units is not None else 0)
    result = EvalResult(rows=[], generated=generated, reused=total - generated, out=out)
    if state.is_main_process:
        result.rows = rows
        report = (
            write_text_report
            if text
            else partial(write_report, defaults=baseline_defaults(config.model, config.guidance_scale, methods))
        )
        result.summary, result.methods = report(
            config,
            [m.name for m in methods],
            result.rows,
            out,
            run={
                "config": asdict(config),
                "images": total,
                "generated": generated,
                "reused": total - generated,
                "processes": state.num_processes,
                "rounds": round_index + 1,
                # per screened pair image: prompt, seed, concept drawn, others drawn
                "pairs_screened": screened,
                "pair_units": pair_units,
                "sweep_stopped": None if sweep is None else sweep.stopped,
                "steering": {name: str(directory) for name, directory in dirs.items()},
            },
            stopped=None if sweep is None else sweep.stopped,
        )
    state.wait_for_everyone()
    return result
