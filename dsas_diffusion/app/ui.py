"""The Gradio user interface of the demo: unsteered vs uniform steering vs DSAS, with CLIP
scores, per-layer gate heatmaps, a strength sweep and fitting from pasted prompt lists.

Everything it computes lives in the other modules of :mod:`dsas_diffusion.app` (serving,
validation, actions, images); this module only lays out the page and wires the events.
"""

from __future__ import annotations

import argparse
import functools
import html
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr

from ..names import MAP_NAMES
from ..shapes import concept_prompts, example_steerings
from . import actions
from .batching import RequestBatcher
from .images import ImageFiles, gate_overlays, upscale
from .options import DEFAULT_MODEL, add_server_arguments
from .serving import ModelCache, configure_torch_threads
from .text_tab import build_text_tab
from .validation import LIMITS, GenerateSettings, InputError

__all__ = ["build_demo", "main", "parse_args", "serve"]

DEFAULT_PROMPT = "a yellow banana on a gray background"
IMAGE_SIDE = 256  # displayed size of the 64 px Shapes images (nearest-neighbour upscaling)


def _ui_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Show :class:`InputError` as a Gradio error message instead of a traceback."""

    @functools.wraps(function)  # keeps the signature: Gradio finds the gr.Progress parameter through it
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except InputError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None

    return wrapped


def build_demo(
    cache: ModelCache | None = None,
    *,
    default_model: str = DEFAULT_MODEL,
    concurrency: int = 4,
    steering_roots: Sequence[str | Path] | None = None,
    max_batch_size: int = 16,
) -> gr.Blocks:
    """The demo's Blocks (queued: ``concurrency`` requests run at once; generate requests that
    arrive together, up to ``max_batch_size``, are served by one pipeline call).

    Args:
        cache: the model cache to use (one base pipeline per model); a new one by default.
        default_model: the model named in the model box when the page opens.
        concurrency: how many events of one kind run at the same time (at least 1).
        steering_roots: folders under which steering directories may be opened (default:
            ``actions.default_steering_roots()``).
        max_batch_size: at most this many generate requests with the same model, size, steps
            and guidance share one pipeline call (:class:`~.batching.RequestBatcher`); 1 gives
            every request its own call.

    The batcher is ``demo.dsas_batcher``.
    """
    if not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, got {concurrency!r}")
    batcher = RequestBatcher(
        lambda key, items: actions.generate_many(items[0][0], [(steerer, checked) for _, steerer, checked in items]),
        max_batch_size=max_batch_size,
    )
    roots = [Path(root) for root in steering_roots] if steering_roots else actions.default_steering_roots()
    cache = cache or ModelCache()
    handlers = {**_generation_handlers(cache, roots, batcher), **_steering_handlers(cache, roots)}
    with gr.Blocks(title="DSAS: dynamically scaled activation steering") as demo:
        gr.Markdown(
            "# DSAS for diffusers\n"
            "**Images**: the same prompt and seed rendered **unsteered**, with **uniform** steering and with "
            "**DSAS** (steering scaled per position by a learned gate), each scored with CLIP against the prompt; "
            "below, where the DSAS gates opened, per layer. **Text**: the same for a language model's "
            "continuations, token by token."
        )
        with gr.Tab("Images", id="images"):
            ui = {**_steering_controls(default_model), **_generation_controls()}
        with gr.Tab("Text", id="text"):
            build_text_tab(roots)
        _wire_image_events(demo, ui, handlers, concurrency, max_batch_size)
    demo.queue(default_concurrency_limit=concurrency)
    demo.dsas_batcher = batcher
    return demo


def _generation_handlers(
    cache: ModelCache, roots: list[Path], batcher: RequestBatcher
) -> dict[str, Callable[..., Any]]:
    """The Images tab's generate, gate-step and sweep events (results go out as paths: see
    :class:`ImageFiles` for why)."""
    files = ImageFiles()

    def settings(prompt: str, seed: float, steps: float, guidance: float, strength: float, size: float):
        return GenerateSettings(prompt, seed, steps, guidance, strength, size)  # type: ignore[arg-type]

    @_ui_errors
    def generate(model, steering, directory, fitted, prompt, seed, steps, guidance, strength, size):
        """Generate the unsteered, uniform and DSAS images with CLIP scores and gate heatmaps."""
        entry = cache.get(model)
        steerer = actions.resolve_steering(steering, directory, fitted, model=entry, roots=roots)
        checked = actions.checked_settings(entry, settings(prompt, seed, steps, guidance, strength, size))
        result = batcher.submit(actions.batch_key(entry, checked), (entry, steerer, checked))
        if not result.gate_maps:
            gr.Warning("No layer of this steering has an open gate: every layer was deselected at fit time.")
        gates = gate_overlays(result.dsas, result.gate_maps, 0, min_side=IMAGE_SIDE)
        state = {"image": result.dsas, "maps": result.gate_maps}
        return (
            *(files.save(upscale(image, IMAGE_SIDE)) for image in result.images),
            result.score_table(),
            [(files.save(image), caption) for image, caption in gates],
            # a steering with a step window records only the steps it steers
            gr.Slider(minimum=0, maximum=result.gate_steps, value=0, step=1, interactive=True),
            state,
        )

    @_ui_errors
    def show_step(step, state):
        """Redraw the gate heatmaps for one denoising step (0: mean over all steps)."""
        if not state:
            return []
        gates = gate_overlays(state["image"], state["maps"], int(step), min_side=IMAGE_SIDE)
        return [(files.save(image), caption) for image, caption in gates]

    @_ui_errors
    def sweep(model, steering, directory, fitted, prompt, seed, steps, guidance, strength, size, points):
        """Uniform and DSAS images at λ = 0 … the chosen strength."""
        entry = cache.get(model)
        steerer = actions.resolve_steering(steering, directory, fitted, model=entry, roots=roots)
        strip = actions.strength_sweep(entry, steerer, settings(prompt, seed, steps, guidance, strength, size), points)
        return files.save(strip)

    return {"generate": generate, "show_step": show_step, "sweep": sweep}


def _steering_handlers(cache: ModelCache, roots: list[Path]) -> dict[str, Callable[..., Any]]:
    """The Images tab's fit and steering-summary events."""

    @_ui_errors
    def fit(
        model,
        source_text,
        target_text,
        control_text,
        steering_map,
        fit_steps,
        progress=gr.Progress(track_tqdm=True),  # noqa: B008 (Gradio injects the tracker through this default)
    ):
        """Fit a steering from three pasted prompt lists and select it."""
        entry = cache.get(model)
        steerer = actions.fit_from_text(
            entry,
            source_text,
            target_text,
            control_text,
            map=steering_map,
            steps=fit_steps,
            report=lambda fraction, message: progress(fraction, desc=message),
        )
        return steerer, actions.describe_steerer(steerer), gr.Dropdown(value="fitted")

    @_ui_errors
    def describe(model, steering, directory, fitted):
        """Summarise the chosen steering (map, base model, gate accuracy per layer)."""
        if steering == "fitted" and fitted is None:
            return "_Nothing fitted yet: open “Fit a steering from prompt lists”._"
        if steering == "directory" and not str(directory or "").strip():
            return "_Type the path of a steering directory._"
        return actions.describe_steerer(actions.resolve_steering(steering, directory, fitted, roots=roots))

    return {"fit": fit, "describe": describe}


def _steering_controls(default_model: str) -> dict[str, Any]:
    """The model and steering choice and the fitting accordion, by name (inside the Images tab)."""
    examples = list(example_steerings())
    steering_choices = [(f"{name} (shipped example, shapes-sd)", name) for name in examples]
    steering_choices += [("a steering directory", "directory"), ("fitted below in this session", "fitted")]
    source, target, control = concept_prompts()
    fitted = gr.State(None)
    gate_state = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(
            ["shapes-sd", "shapes-mmdit"],
            value=default_model,
            allow_custom_value=True,
            label="Model (a Shapes name, a diffusers id or a local folder)",
            elem_id="model",
        )
        steering = gr.Dropdown(
            steering_choices,
            value=examples[0] if examples else "directory",
            label="Steering",
            elem_id="steering",
        )
        directory = gr.Textbox(label="Steering directory (when 'a steering directory' is chosen)", elem_id="directory")
    steering_info = gr.Markdown(elem_id="steering-info")
    with gr.Accordion("Fit a steering from prompt lists", open=False):
        gr.Markdown("One prompt per line. Prefilled with the shipped banana sets of the Shapes world.")
        with gr.Row():
            source_box = gr.Textbox("\n".join(source), lines=8, label="Source: prompts showing the concept")
            target_box = gr.Textbox("\n".join(target), lines=8, label="Target: the same scenes without it")
            control_box = gr.Textbox("\n".join(control), lines=8, label="Control: prompts to leave alone")
        with gr.Row():
            steering_map = gr.Dropdown(list(MAP_NAMES), value="caa", label="Steering map")
            fit_steps = gr.Slider(
                LIMITS.min_fit_steps, LIMITS.max_fit_steps, value=10, step=1, label="Denoising steps collected"
            )
            fit_button = gr.Button("Fit steering")
        fit_status = gr.Markdown()
    return {
        "fitted": fitted,
        "gate_state": gate_state,
        "model": model,
        "steering": steering,
        "directory": directory,
        "steering_info": steering_info,
        "source_box": source_box,
        "target_box": target_box,
        "control_box": control_box,
        "steering_map": steering_map,
        "fit_steps": fit_steps,
        "fit_button": fit_button,
        "fit_status": fit_status,
    }


def _generation_controls() -> dict[str, Any]:
    """The prompt, the generation settings, the images, scores, gates and sweep, by name."""
    prompt = gr.Textbox(DEFAULT_PROMPT, label="Prompt", max_lines=2, elem_id="prompt")
    with gr.Row():
        seed = gr.Number(0, label="Seed", precision=0, minimum=0, maximum=LIMITS.max_seed)
        steps = gr.Slider(LIMITS.min_steps, LIMITS.max_steps, value=25, step=1, label="Steps")
        guidance = gr.Slider(LIMITS.min_guidance, LIMITS.max_guidance, value=7.5, step=0.5, label="Guidance")
        strength = gr.Slider(LIMITS.min_strength, LIMITS.max_strength, value=2.0, step=0.25, label="Strength λ")
        size = gr.Number(0, label="Image size (px, 0 = model default)", precision=0)
    with gr.Row():
        generate_button = gr.Button("Generate", variant="primary", elem_id="generate")
        sweep_points = gr.Slider(2, LIMITS.max_sweep_points, value=5, step=1, label="Sweep points")
        sweep_button = gr.Button("Strength sweep (λ = 0 … λ)", elem_id="sweep")
    with gr.Row():
        unsteered_image = gr.Image(
            label="unsteered", type="filepath", format="png", elem_id="unsteered", interactive=False
        )
        uniform_image = gr.Image(
            label="uniform steering", type="filepath", format="png", elem_id="uniform", interactive=False
        )
        dsas_image = gr.Image(label="DSAS", type="filepath", format="png", elem_id="dsas", interactive=False)
    scores = gr.Markdown(elem_id="scores")
    gate_step = gr.Slider(0, 25, value=0, step=1, label="Gate step (0 = mean over all steps)", elem_id="gate-step")
    gates = gr.Gallery(label="DSAS gates per layer", columns=5, format="png", elem_id="gates", height="auto")
    sweep_image = gr.Image(
        label="Strength sweep", type="filepath", format="png", elem_id="sweep-strip", interactive=False
    )
    return {
        "prompt": prompt,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "strength": strength,
        "size": size,
        "generate_button": generate_button,
        "sweep_points": sweep_points,
        "sweep_button": sweep_button,
        "unsteered_image": unsteered_image,
        "uniform_image": uniform_image,
        "dsas_image": dsas_image,
        "scores": scores,
        "gate_step": gate_step,
        "gates": gates,
        "sweep_image": sweep_image,
    }


def _wire_image_events(
    demo: gr.Blocks, ui: dict[str, Any], on: dict[str, Callable[..., Any]], concurrency: int, max_batch_size: int
) -> None:
    """Connect the Images tab's controls (``ui``) to its handlers (``on``) and name the API endpoints."""
    choice = [ui[name] for name in ("model", "steering", "directory", "fitted")]
    common = choice + [ui[name] for name in ("prompt", "seed", "steps", "guidance", "strength", "size")]
    shown = [ui[name] for name in ("unsteered_image", "uniform_image", "dsas_image", "scores", "gates")]
    shown += [ui["gate_step"], ui["gate_state"]]
    # generate requests wait together for their batch: as many run at once as one batch holds
    together = {"concurrency_limit": max(concurrency, max_batch_size), "concurrency_id": "generate"}
    ui["generate_button"].click(on["generate"], common, shown, api_name="generate", **together)
    ui["prompt"].submit(on["generate"], common, shown, api_visibility="private", **together)
    ui["gate_step"].change(on["show_step"], [ui["gate_step"], ui["gate_state"]], ui["gates"], api_name="gate_step")
    ui["sweep_button"].click(on["sweep"], [*common, ui["sweep_points"]], ui["sweep_image"], api_name="sweep")
    fit_inputs = [
        ui[name] for name in ("model", "source_box", "target_box", "control_box", "steering_map", "fit_steps")
    ]
    ui["fit_button"].click(on["fit"], fit_inputs, [ui["fitted"], ui["fit_status"], ui["steering"]], api_name="fit")
    for trigger in (ui["steering"].change, ui["directory"].submit, demo.load):
        trigger(on["describe"], choice, ui["steering_info"], api_visibility="private")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Gradio demo of DSAS steering")
    add_server_arguments(parser)
    return parser.parse_args(argv)


def serve(args: argparse.Namespace) -> None:
    """Build the demo and serve it until interrupted (options: :func:`parse_args`)."""
    max_batch_size = getattr(args, "max_batch_size", 16)
    # batched generate requests run as one call at a time per model: it gets every core
    configure_torch_threads(1 if max_batch_size > 1 else args.concurrency, args.threads)
    demo = build_demo(
        default_model=args.model,
        concurrency=args.concurrency,
        steering_roots=getattr(args, "steering_roots", None),
        max_batch_size=max_batch_size,
    )
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


def main(argv: Sequence[str] | None = None) -> None:
    serve(parse_args(argv))


if __name__ == "__main__":
    main()
