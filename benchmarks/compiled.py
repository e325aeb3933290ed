"""Steering under each way users compile, through the real pipelines and ``DSASLanguageModel``.

    python benchmarks/compiled.py [--models shapes-sd shapes-mmdit shapes-lm] [--backend inductor]
                                  [--steps 10] [--rounds 6] [--json FILE]

Per model and compile idiom (``pipe.<denoiser>.compile()``, ``pipe.<denoiser> =
torch.compile(...)``, ``compile_repeated_blocks()`` where the denoiser declares repeated blocks;
``lm.model.compile()`` and ``torch.compile(lm.model)`` for ``shapes-lm``), on a fresh model:

- **exactness**: the largest |compiled - eager| over the steered images at λ 1 and 2 (pixels
  in [0, 1]), and λ 0 against the eager stock images; for ``shapes-lm`` whether sampled
  continuations (seeded) are token for token the eager ones at λ 2 and 4, and the largest
  logit difference of a teacher-forced pass;
- **graphs**: dynamo's unique graphs after the first unsteered call and after the first
  steered call, the graphs added by seven further calls (five strengths, λ 0 and gating off
  excluded: steered and unsteered mixed), and the graph breaks;
- **compile time**: seconds of the first unsteered and the first steered call beside the
  median eager call;
- **per-call time**: one denoiser call (a CFG batch of the two prompts) or one teacher-forced
  pass, eager unsteered / eager DSAS / compiled unsteered / compiled DSAS, taking turns for
  ``--rounds`` rounds; medians, and per steered variant the median of its per-round ratio to
  the unsteered variant of the same mode with the quartiles of those ratios.

Compile times are those of a cold start only with inductor's caches off
(``TORCHINDUCTOR_FX_GRAPH_CACHE=0 TORCHINDUCTOR_AUTOGRAD_CACHE=0``): otherwise an idiom reuses
the kernels an earlier one compiled.

``shapes-sd`` uses the shipped banana steering; ``shapes-mmdit`` one fitted here with
``fit_steering``'s defaults on the banana prompt sets (16 prompts per set).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from overhead import alternate
from torch._dynamo.utils import counters

from dsas_diffusion.diffusion.compiled import CompiledSteering
from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.diffusion.pipelines import CONDITIONAL_HALF
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes import concept_prompts, example_steerings, text_example_steerings
from dsas_diffusion.shapes.concepts import PROMPTS_DIR
from dsas_diffusion.steering.compiled import run_eagerly
from dsas_diffusion.steering.resident import resident_for

PROMPTS = ["a yellow banana on a gray background", "a red square on a white background"]
STRENGTHS = (1.0, 0.5, 0.0, 2.0, 1.5)


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def breaks() -> int:
    return sum(counters["graph_break"].values())


def timed(function: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def ratios(times: dict[str, list[float]], pairs: dict[str, str]) -> dict[str, float]:
    out = {f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}
    for steered, base in pairs.items():
        per_round = [a / b for a, b in zip(times[steered], times[base], strict=True)]
        quartiles = statistics.quantiles(per_round, n=4)
        out[f"{steered}_ratio"] = statistics.median(per_round)
        out[f"{steered}_quartiles"] = (quartiles[0], quartiles[2])
    return out


def compile_denoiser(pipe, idiom: str, backend: str) -> None:
    attribute = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    if idiom == "in-place":
        getattr(pipe, attribute).compile(backend=backend)
    elif idiom == "wrapped":
        setattr(pipe, attribute, torch.compile(getattr(pipe, attribute), backend=backend))
    else:
        getattr(pipe, attribute).compile_repeated_blocks(backend=backend)


def image_idioms(model: str) -> list[str]:
    pipe = load_pipeline(model)
    return ["in-place", "wrapped"] + (["regional"] if getattr(pipe.denoiser, "_repeated_blocks", None) else [])


def load_steered(model: str, steps: int):
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if model == "shapes-sd":
        pipe.load_steering(example_steerings()["banana"], name="banana")
    else:
        source, target, control = concept_prompts("banana")
        pipe.fit_steering(source[:16], target[:16], control[:16], name="banana", progress=False)
    return pipe


def image_row(model: str, idiom: str, backend: str, steps: int, rounds: int) -> dict[str, Any]:
    pipe = load_steered(model, steps)

    def images(strength: float, **extra: Any):
        generators = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
        out = pipe(PROMPTS, generator=generators, num_inference_steps=steps, output_type="np",
                   steering_strength=strength, **extra)  # fmt: skip
        return torch.from_numpy(out.images)

    eager = {strength: timed(lambda s=strength: images(s)) for strength in (0.0, 1.0, 2.0)}
    eager_seconds = statistics.median(seconds for _, seconds in eager.values())
    calls: list[tuple[tuple, dict]] = []
    handle = pipe.denoiser.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args, kwargs)) if not calls else None, with_kwargs=True
    )
    images(0.0)
    handle.remove()
    compile_denoiser(pipe, idiom, backend)
    torch._dynamo.reset()
    counters.clear()
    row: dict[str, Any] = {"model": model, "idiom": idiom, "backend": backend, "eager_call_s": eager_seconds}
    unsteered, row["first_unsteered_s"] = timed(lambda: images(0.0))
    row["graphs_unsteered"] = graphs()
    steered, row["first_steered_s"] = timed(lambda: images(2.0))
    row["graphs_steered"] = graphs()
    diffs = [float((unsteered - eager[0.0][0]).abs().max()), float((steered - eager[2.0][0]).abs().max())]
    before = graphs()
    for strength in (*STRENGTHS, 0.0, 2.0):
        out = images(strength)
        if strength in eager:
            diffs.append(float((out - eager[strength][0]).abs().max()))
    row.update(graphs_added_later=graphs() - before, graph_breaks=breaks(), max_abs_diff=max(diffs))
    row["steered_changes_images"] = float((eager[2.0][0] - eager[0.0][0]).abs().max())

    args, kwargs = calls[0]
    called = pipe._denoiser_as_called()
    resident = resident_for(pipe, pipe.denoiser, pipe.steerers, CompiledSteering)  # the one the calls used
    steerer = pipe.steerers["banana"]

    def call(mode: str, steered: bool) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            with torch.no_grad():
                if mode == "eager":
                    session = steerer.apply(pipe.denoiser, strength=2.0) if steered else contextlib.nullcontext()
                    with run_eagerly(), session:
                        if steered:
                            session.batch_rows = CONDITIONAL_HALF
                        called(*args, **kwargs)
                elif steered:
                    with resident.steer({"banana": 2.0}, gate="dsas", batch_rows=CONDITIONAL_HALF):
                        called(*args, **kwargs)
                else:
                    called(*args, **kwargs)
            return time.perf_counter() - start

        return run

    variants = {
        f"{mode}_{kind}": call(mode, kind == "dsas") for mode in ("eager", "compiled") for kind in ("unsteered", "dsas")
    }
    for run in variants.values():
        run()
    row.update(
        ratios(alternate(variants, rounds), {"eager_dsas": "eager_unsteered", "compiled_dsas": "compiled_unsteered"})
    )
    return row


def text_row(idiom: str, backend: str, rounds: int) -> dict[str, Any]:
    from dsas_diffusion.text import DSASLanguageModel

    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    lm.load_steering(text_example_steerings()[("negative", "iti")], name="negative")
    prompts = read_prompts(PROMPTS_DIR / "text" / "negative" / "eval_concept.txt")[:8]
    batch = lm._batches(prompts, len(prompts), None)[0]

    def sampled(strength: float):
        torch.manual_seed(0)
        return lm.generate(prompts, steering_strength=strength, max_new_tokens=16, do_sample=True).sequences

    def logits(strength: float):
        with torch.no_grad(), lm.steering(strength):
            return lm.model(**batch).logits

    eager = {strength: timed(lambda s=strength: sampled(s)) for strength in (0.0, 2.0, 4.0)}
    eager_logits = {strength: logits(strength) for strength in (0.0, 4.0)}
    if idiom == "in-place":
        lm.model.compile(backend=backend)
    else:
        lm.model = torch.compile(lm.model, backend=backend)
    torch._dynamo.reset()
    counters.clear()
    row: dict[str, Any] = {"model": "shapes-lm", "idiom": idiom, "backend": backend}
    row["eager_call_s"] = statistics.median(seconds for _, seconds in eager.values())
    _, row["first_unsteered_s"] = timed(lambda: (sampled(0.0), logits(0.0)))
    row["graphs_unsteered"] = graphs()
    _, row["first_steered_s"] = timed(lambda: (sampled(4.0), logits(4.0)))
    row["graphs_steered"] = graphs()
    before = graphs()
    same = all(torch.equal(sampled(s), eager[s][0]) for s in (2.0, 4.0, 0.0))
    diff = max(float((logits(s) - eager_logits[s]).abs().max()) for s in (0.0, 4.0))
    for strength in STRENGTHS:
        logits(strength)
    row.update(graphs_added_later=graphs() - before, graph_breaks=breaks(), tokens_identical=same, max_abs_diff=diff)
    row["steered_changes_tokens"] = not torch.equal(eager[4.0][0], eager[0.0][0])

    def call(mode: str, strength: float) -> Callable[[], float]:
        def run() -> float:
            start = time.perf_counter()
            if mode == "eager":
                with run_eagerly():
                    logits(strength)
            else:
                logits(strength)
            return time.perf_counter() - start

        return run

    variants = {
        f"{mode}_{kind}": call(mode, 4.0 if kind == "dsas" else 0.0)
        for mode in ("eager", "compiled")
        for kind in ("unsteered", "dsas")
    }
    row.update(
        ratios(alternate(variants, rounds), {"eager_dsas": "eager_unsteered", "compiled_dsas": "compiled_unsteered"})
    )
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"{'model':<13}{'idiom':<10}{'exact':>10}{'graphs u/s/+':>14}{'breaks':>7}{'first u/s (eager) s':>22}"
          f"{'eager ms u/dsas':>18}{'ratio':>7}{'compiled ms u/dsas':>20}{'ratio':>7}")  # fmt: skip
    for r in rows:
        exact = f"{r['max_abs_diff']:.1e}" + ("" if r.get("tokens_identical", True) else " tok!")
        print(
            f"{r['model']:<13}{r['idiom']:<10}{exact:>10}"
            f"{r['graphs_unsteered']:>6}/{r['graphs_steered']}/+{r['graphs_added_later']:<4}{r['graph_breaks']:>7}"
            f"{r['first_unsteered_s']:>9.1f}/{r['first_steered_s']:.1f} ({r['eager_call_s']:.1f})"
            f"{r['eager_unsteered_ms']:>10.1f}/{r['eager_dsas_ms']:.1f}{r['eager_dsas_ratio']:>7.3f}"
            f"{r['compiled_unsteered_ms']:>12.1f}/{r['compiled_dsas_ms']:.1f}{r['compiled_dsas_ratio']:>7.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["shapes-sd", "shapes-mmdit", "shapes-lm"])
    parser.add_argument("--idioms", nargs="+", default=None, help="default: every idiom the model supports")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)
    rows = []
    for model in args.models:
        idioms = args.idioms or (["in-place", "wrapped"] if model == "shapes-lm" else image_idioms(model))
        for idiom in idioms:
            if model == "shapes-lm":
                rows.append(text_row(idiom, args.backend, args.rounds))
            else:
                rows.append(image_row(model, idiom, args.backend, args.steps, args.rounds))
            print(json.dumps(rows[-1]), flush=True)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
