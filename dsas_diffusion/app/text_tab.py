"""The demo's Text tab: a causal language model continued unsteered, with uniform steering and
with DSAS, each continuation's tokens coloured by their DSAS gate (per layer, selectable),
with the concept rate and perplexity of each.

* :class:`LanguageModelCache` keeps one model per name (``shapes-lm`` or a local
  transformers folder); each request wraps the shared weights in its own
  :class:`~dsas_diffusion.text.DSASLanguageModel` with a private tokenizer copy (a fast
  tokenizer holds padding state) and its own steerer. Hooks act on the calling thread only.
* Sampling draws from torch's global generator, so the three generations of one request run
  under the model's lock after ``torch.manual_seed(seed)`` (in a forked RNG state): the same
  request gives the same continuations whatever runs beside it. Gates and perplexities are
  computed outside the lock.
"""

from __future__ import annotations

import copy
import html
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..steering import Steerer, SteeringError
from .validation import InputError, integer, number

__all__ = ["LanguageModelCache", "TextResult", "TextSettings", "generate_text", "resolve_text_steering"]

STEERER = "demo"
VARIANTS = ("unsteered", "uniform", "DSAS")


@dataclass(frozen=True)
class TextSettings:
    """One Text-tab request (checked by :meth:`validated`)."""

    prompt: str
    strength: float = 2.0
    seed: int = 0
    samples: int = 8
    max_new_tokens: int = 40
    concept: str = ""

    def validated(self) -> TextSettings:
        prompt = str(self.prompt or "").strip()
        if not prompt:
            raise InputError("The prompt is empty: type the beginning of a text to continue.")
        if len(prompt) > 300:
            raise InputError(f"The prompt is {len(prompt)} characters long; at most 300 are allowed.")
        values = {}
        for name, label, low, high in (
            ("strength", "The strength λ", 0.0, 32.0),
            ("seed", "The seed", 0, 2**32 - 1),
            ("samples", "Samples", 1, 32),
            ("max_new_tokens", "New tokens", 1, 64),
        ):
            value = number(getattr(self, name), label) if name == "strength" else integer(getattr(self, name), label)
            if not low <= value <= high:
                raise InputError(f"{label} must be between {low} and {high}, got {value}.")
            values[name] = value
        return TextSettings(prompt, concept=str(self.concept or "").strip().lower(), **values)


@dataclass
class TextEntry:
    name: str
    lm: Any  # DSASLanguageModel holding the shared weights
    lock: threading.Lock = field(default_factory=threading.Lock)


class LanguageModelCache:
    """Language models by name, loaded once (at most ``max_models``; least recently used goes)."""

    def __init__(self, max_models: int = 2) -> None:
        self.max_models = max_models
        self._entries: dict[str, TextEntry] = {}
        self._lock = threading.Lock()

    def get(self, model: str) -> TextEntry:
        from ..text import DSASLanguageModel
        from ..text.command import is_language_model

        name = (model or "").strip()
        if not name:
            raise InputError("Choose a language model: shapes-lm, or a local transformers folder.")
        with self._lock:
            if name in self._entries:
                self._entries[name] = self._entries.pop(name)  # most recently used last
                return self._entries[name]
            if not is_language_model(name):
                raise InputError(f"Could not load the language model {name!r}: not a causal LM checkpoint folder here.")
            try:
                lm = DSASLanguageModel.from_pretrained(name)
            except Exception as error:
                raise InputError(f"Could not load the language model {name!r}: {error}") from error
            self._entries[name] = TextEntry(name, lm)
            while len(self._entries) > self.max_models:
                self._entries.pop(next(iter(self._entries)))
            return self._entries[name]


def resolve_text_steering(concept: str, map_name: str, directory: str | None, roots: Sequence[Path]) -> Steerer:
    """A shipped ``shapes-lm`` example (``concept`` and ``map_name``) or, with a directory
    path, the steering there (if it lies under one of ``roots``)."""
    from ..shapes import text_example_steerings
    from .actions import resolve_steering

    if str(directory or "").strip():
        return resolve_steering("directory", directory, roots=roots)
    examples = text_example_steerings()
    if (concept, map_name) not in examples:
        shipped = ", ".join(f"{c} ({m})" for c, m in examples)
        raise InputError(f"No shipped text steering for {concept!r} with the {map_name} map; shipped: {shipped}.")
    return Steerer.from_pretrained(examples[(concept, map_name)])


@dataclass
class TextResult:
    """Per variant: the first sample's tokens and gates, the concept rate and perplexity."""

    texts: dict[str, str]
    tokens: dict[str, list[str]]
    gates: dict[str, dict[str, list[float]]]  # variant -> layer -> one gate per token
    concept_rate: dict[str, tuple[int, int] | None]
    perplexity: dict[str, float]
    layers: list[str]

    def html(self, variant: str, layer: str) -> str:
        from ..text.render import render_gates

        gates = self.gates[variant].get(layer) or [math.nan] * len(self.tokens[variant])
        coloured = render_gates(self.tokens[variant], gates, format="html")
        return f'<div class="dsas-text" style="line-height: 1.9">{coloured}</div>'

    def table(self, concept: str) -> str:
        head = f"| | {concept or 'concept'} in the samples | perplexity (unsteered model) |\n|---|---|---|\n"
        rows = []
        for variant in VARIANTS:
            rate = self.concept_rate[variant]
            cell = "-" if rate is None else f"{rate[0]} of {rate[1]} ({100 * rate[0] / rate[1]:.0f}%)"
            rows.append(f"| {variant} | {cell} | {self.perplexity[variant]:.2f} |")
        return head + "\n".join(rows)


def _mentions(text: str, concept: str, model: str) -> bool | None:
    """Whether a continuation mentions ``concept``: the grammar on a Shapes language model,
    else a word list (comma-separated words); ``None`` without a concept."""
    from ..eval.text import mentions_any
    from ..shapes import is_shapes_world, is_text_concept, mentions

    if not concept:
        return None
    if is_shapes_world(model) and is_text_concept(concept):
        return mentions(text, concept)
    return mentions_any(text, {w.strip() for w in concept.split(",") if w.strip()})


def generate_text(entry: TextEntry, steerer: Steerer, settings: TextSettings) -> TextResult:
    """The unsteered, uniform and DSAS continuations of one request (``settings.samples``
    sampled at temperature 1 for each, the first one shown)."""
    from ..eval.text import continuation_logprob
    from ..text import DSASLanguageModel

    settings = settings.validated()
    lm = DSASLanguageModel(entry.lm.model, copy.deepcopy(entry.lm.tokenizer))
    try:
        lm.load_steering(steerer, name=STEERER)
    except SteeringError as error:
        raise InputError(f"This steering cannot steer {entry.name}: {error}") from error
    prompts = [settings.prompt] * settings.samples
    runs = {"unsteered": (0.0, "dsas"), "uniform": (settings.strength, "none"), "DSAS": (settings.strength, "dsas")}
    outputs = {}
    with entry.lock, torch.random.fork_rng(devices=[]):
        for variant, (strength, gate) in runs.items():
            torch.manual_seed(settings.seed)
            outputs[variant] = lm.generate(
                prompts,
                steering_strength=strength,
                steering_gate=gate,
                do_sample=True,
                top_k=0,
                top_p=1.0,
                temperature=1.0,
                max_new_tokens=settings.max_new_tokens,
            )
    special = set(lm.tokenizer.all_special_tokens)
    texts, tokens, gates, rates, perplexity = {}, {}, {}, {}, {}
    for variant, out in outputs.items():
        ids = [row[mask.to(row.device)].tolist() for row, mask in zip(out.sequences, out.mask, strict=True)]
        start = int(out.mask[0, : out.prompt_length].sum())
        values = continuation_logprob(lm, ids, [start] * len(ids))  # strength 0: the unsteered model
        finite = [math.exp(-v) for v in values if not math.isnan(v)]
        perplexity[variant] = sum(finite) / len(finite) if finite else math.nan
        found = [_mentions(text, settings.concept, entry.name) for text in out.texts]
        rates[variant] = None if found[0] is None else (sum(bool(f) for f in found), len(found))
        texts[variant] = out.texts[0]
        read = lm.gates([lm.tokenizer.decode(ids[0], skip_special_tokens=True)], steering_strength=settings.strength)[0]
        keep = [i for i, token in enumerate(read["tokens"]) if token not in special]
        tokens[variant] = [read["tokens"][i] for i in keep]
        gates[variant] = {
            layer: [float(opening[i]) for i in keep] for layer, opening in read["gate_maps"][STEERER].items()
        }
    layers = list(gates["DSAS"])
    return TextResult(texts, tokens, gates, rates, perplexity, layers)


def build_text_tab(roots: Sequence[Path], cache: LanguageModelCache | None = None) -> None:
    """Lay out the Text tab inside the current ``gr.Blocks`` / ``gr.Tab`` and wire its events
    (API names ``generate_text`` and ``text_layer``)."""
    import gradio as gr

    from ..names import MAP_NAMES
    from ..shapes import TEXT_CONCEPTS, text_example_steerings

    cache = cache or LanguageModelCache()
    shipped_maps = sorted({m for _, m in text_example_steerings()}, key=list(MAP_NAMES).index)

    def run(model, concept, map_name, directory, prompt, strength, seed, samples, max_new_tokens, counted):
        try:
            entry = cache.get(model)
            steerer = resolve_text_steering(concept, map_name, directory, roots)
            result = generate_text(
                entry, steerer, TextSettings(prompt, strength, seed, samples, max_new_tokens, counted)
            )
        except InputError as error:
            raise gr.Error(html.escape(str(error), quote=False), print_exception=False) from None
        layer = result.layers[len(result.layers) // 2] if result.layers else ""
        views = [result.html(variant, layer) for variant in VARIANTS]
        return (*views, result.table(counted), gr.Dropdown(choices=result.layers, value=layer), result)

    def show_layer(layer, result):
        if result is None or not layer:
            return ["", "", ""]
        return [result.html(variant, layer) for variant in VARIANTS]

    gr.Markdown(
        "A language model continues the prompt **unsteered**, with **uniform** steering and with **DSAS**; "
        "each token is coloured by the gate DSAS gives it at the chosen layer (white: closed, red: open)."
    )
    state = gr.State(None)
    with gr.Row():
        model = gr.Dropdown(
            ["shapes-lm"],
            value="shapes-lm",
            allow_custom_value=True,
            elem_id="text-model",
            label="Language model (shapes-lm or a local transformers folder)",
        )
        concept = gr.Dropdown(list(TEXT_CONCEPTS), value="negative", label="Concept (shipped steering)")
        map_name = gr.Dropdown(shipped_maps, value="caa", label="Map")
        directory = gr.Textbox(label="Or a steering directory", elem_id="text-directory")
    prompt = gr.Textbox(
        "an ugly, dirty red square lies on the left.", label="Prompt", max_lines=3, elem_id="text-prompt"
    )
    with gr.Row():
        strength = gr.Slider(0.0, 32.0, value=16.0, step=0.5, label="Strength λ")
        seed = gr.Number(0, label="Seed", precision=0, minimum=0)
        samples = gr.Slider(1, 32, value=8, step=1, label="Samples (for the concept rate)")
        max_new_tokens = gr.Slider(1, 64, value=40, step=1, label="New tokens")
        counted = gr.Textbox("negative", label="Counted concept (or comma-separated words)")
    button = gr.Button("Continue", variant="primary", elem_id="text-generate")
    with gr.Row():
        views = [gr.HTML(label=variant, elem_id=f"text-{variant.lower()}") for variant in VARIANTS]
    table = gr.Markdown(elem_id="text-scores")
    layer = gr.Dropdown([], label="Gate layer", elem_id="text-layer", interactive=True)
    inputs = [model, concept, map_name, directory, prompt, strength, seed, samples, max_new_tokens, counted]
    button.click(run, inputs, [*views, table, layer, state], api_name="generate_text")
    layer.change(show_layer, [layer, state], views, api_name="text_layer")
    concept.change(lambda c: c, concept, counted, api_visibility="private")
