"""The steerers an evaluation needs: which methods a config (or a fitted steering directory)
allows, and fitting each steerer (and the prompt-level gate) once, reusing it while its
inputs are unchanged."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..config import FitConfig
from ..steering import Steerer
from .cache import CACHE_VERSION, digest
from .config import ConfigError, EvalConfig, Method, parse_method

__all__ = ["allowed_methods", "fit_or_reuse", "prompt_gate_openings"]


def allowed_methods(config: EvalConfig) -> list[Method]:
    """The config's methods; with ``steering:`` a fitted directory, the ones its map and
    gates can run (all of them for ``methods: all``), or a :class:`ConfigError`."""
    methods = config.method_list
    if config.steering is None:
        return methods
    if any(m.prompt_gated for m in methods):
        raise ConfigError(
            "a prompt-level gate is fitted on the source and control prompts: give them instead of steering:"
        )
    steerer = Steerer.from_pretrained(config.steering)
    fitted, gate = steerer.config.get("map"), steerer.config.get("gate")
    gatings = {"e2e": ("none", "e2e"), "none": ("none",)}.get(gate, ("none", "dsas"))
    allowed = [parse_method(f"{fitted}/{g}") for g in gatings]
    if config.methods == "all":
        return allowed
    allowed += [m for m in methods if m.is_baseline]
    foreign = [m.name for m in methods if m not in allowed]
    if foreign:
        raise ConfigError(
            f"methods {foreign} cannot use the steering in {config.steering!r}, which holds a {fitted} map "
            f"with {gate} gates; choose among {[m.name for m in allowed]} or fit from prompt files"
        )
    return methods


def fit_or_reuse(
    config: EvalConfig,
    methods: Sequence[Method],
    out: Path,
    model_identity: str,
    load_pipeline: Callable[[], Any],
    *,
    fit_here: bool = True,
    progress: bool = True,
) -> dict[str, Path]:
    """``{steerer name: directory}`` for the methods. Each steerer is fitted into
    ``out/steering/<name>`` unless a fit with the same model, prompt sets and settings is
    already there (its key in ``fit_key.txt``). ``fit_here=False`` (processes other than the
    main one) only names the directories."""
    methods = [m for m in methods if not m.is_baseline]
    if config.steering is not None:
        return {method.steerer_name: Path(config.steering) for method in methods}
    dirs: dict[str, Path] = {}
    for name, method in {m.steerer_name: m for m in methods}.items():
        directory = out / "steering" / name
        fit_kwargs = dict(config.fit)
        key = digest(
            {
                "model": model_identity,
                "sets": [config.source, config.target, config.control],
                "map": method.map,
                "gate": method.fit_gate,
                "fit": fit_kwargs,
                "version": CACHE_VERSION,
            }
        )
        key_file = directory / "fit_key.txt"
        if fit_here and not (key_file.is_file() and key_file.read_text().strip() == key):
            print(f"fitting {method.map} with {method.fit_gate} gates on {config.model}")
            # the model's own preset (pipelines or language models), with the method and the config's settings
            steerer = load_pipeline().fit_steering(
                config.source,
                config.target,
                config.control,
                map=method.map,
                gate=method.fit_gate,
                name=name,
                progress=progress,
                **fit_kwargs,
            )
            steerer.save_pretrained(directory)
            key_file.write_text(key + "\n")
        dirs[name] = directory
    return dirs


def prompt_gate_openings(
    config: EvalConfig,
    out: Path,
    model_identity: str,
    load_pipeline: Callable[[], Any],
    *,
    fit_here: bool = True,
) -> dict[str, bool]:
    """Per evaluation prompt, whether the prompt-level gate opens (``{}`` when no method is
    prompt-gated). The gate is fitted on the config's source and control prompts into
    ``out/steering/prompt-gate`` (reused while its key is unchanged) and its readings are
    written beside it, which processes other than the main one (``fit_here=False``) read."""
    from .baselines import PromptGate

    if not any(m.prompt_gated for m in config.method_list):
        return {}
    directory = out / "steering" / "prompt-gate"
    readings = directory / "openings.json"
    prompts = list(
        dict.fromkeys(
            config.concept_prompts
            + config.control_prompts
            + config.pairs_prompts
            + ([""] if config.empty_seeds else [])
        )
    )
    from .text import is_text_config

    # the model family's gate settings, unless the config's fit overrides them
    defaults = FitConfig.for_text() if is_text_config(config) else FitConfig.for_diffusion()
    fit_settings = {k: config.fit.get(k, getattr(defaults, k)) for k in ("n_components", "gate_l2", "seed")}
    key = digest(
        {
            "model": model_identity,
            "sets": [config.source, config.control],
            "fit": fit_settings,
            "prompts": prompts,
            "version": CACHE_VERSION,
        }
    )
    key_file = directory / "fit_key.txt"
    if fit_here and not (key_file.is_file() and key_file.read_text().strip() == key):
        print(f"fitting the prompt-level gate on {config.model}")
        pipe = load_pipeline()
        gate = PromptGate.fit(
            pipe,
            config.source,
            config.control,
            n_components=fit_settings["n_components"],
            l2=fit_settings["gate_l2"],
            seed=fit_settings["seed"],
        )
        gate.save_pretrained(directory)
        openings = gate.openings(pipe, prompts)
        readings.write_text(
            json.dumps({"accuracy": gate.accuracy, "openings": dict(zip(prompts, openings, strict=True))}, indent=1)
        )
        key_file.write_text(key + "\n")
    if not readings.is_file():
        raise FileNotFoundError(f"{readings} is missing: the main process fits the prompt-level gate first")
    gate_threshold = PromptGate.from_pretrained(directory).threshold
    return {p: v >= gate_threshold for p, v in json.loads(readings.read_text())["openings"].items()}
