"""What a user would pick instead of DSAS: a prompt-level gate, a negative prompt and
diffusers' Safe Latent Diffusion (images), banned words (text), as the evaluation runs them.

* :class:`PromptGate`: the DSAS gate's classifier (:func:`~dsas_diffusion.steering.fit_gate`,
  with the pipelines' 20 PCA components) fitted on the prompt's embedding (the mean over tokens of ``pipe.encode_prompt``'s prompt
  embeddings, what the denoiser reads), source prompts against control prompts. Where it
  opens, the evaluation steers the whole image uniformly; where it stays shut the call is the
  stock one. No activation of the denoiser is read.
* :func:`baseline_images`: ``negative-prompt`` is the stock call with the concept as
  ``negative_prompt`` at a guidance scale; ``sld`` is ``StableDiffusionPipelineSafe`` built
  ``from_pipe`` on the same components, the concept as ``safety_concept``, at a
  ``sld_guidance_scale`` (its other arguments at diffusers' defaults).
* :func:`bad_words_ids`: ``bad-words`` bans the concept's words at decoding (``generate``'s
  ``bad_words_ids``); on a language model the prompt-level gate reads the mean over the
  prompt's tokens of the model's last hidden state.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..steering import LinearGate, fit_gate
from .methods import ConfigError, Method

__all__ = [
    "PromptGate",
    "bad_words_ids",
    "baseline_defaults",
    "baseline_images",
    "default_setting",
    "prompt_features",
    "safe_latent_diffusion",
]

GATE_WEIGHTS, GATE_CONFIG = "prompt_gate.safetensors", "prompt_gate.json"


@torch.no_grad()
def _text_features(lm: Any, prompts: Sequence[str], batch_size: int) -> torch.Tensor:
    tokenizer, rows = lm.tokenizer, []
    for start in range(0, len(prompts), batch_size):
        encoded = tokenizer(
            list(prompts[start : start + batch_size]), return_tensors="pt", padding=True, padding_side="right"
        )
        mask = encoded["attention_mask"]
        out = lm.model(**{k: v.to(lm.device) for k, v in encoded.items()}, output_hidden_states=True)
        hidden = out.hidden_states[-1].float().cpu()
        rows.append((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1))
    return torch.cat(rows)


@torch.no_grad()
def prompt_features(pipe: Any, prompts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
    """``(N, D)``: per prompt, the mean over tokens of the prompt embeddings ``pipe.encode_prompt``
    gives the denoiser (any diffusers family: SD, SDXL, SD3, FLUX, PixArt); for a
    :class:`~dsas_diffusion.text.DSASLanguageModel`, of its last hidden state over the prompt."""
    if not hasattr(pipe, "encode_prompt"):
        return _text_features(pipe, prompts, batch_size)
    parameters = inspect.signature(pipe.encode_prompt).parameters
    rows = []
    for start in range(0, len(prompts), batch_size):
        call: dict[str, Any] = {"prompt": list(prompts[start : start + batch_size])}
        for name, value in (
            ("prompt_2", None),
            ("prompt_3", None),
            ("device", pipe._execution_device),
            ("num_images_per_prompt", 1),
            ("do_classifier_free_guidance", False),
        ):
            if name in parameters:
                call[name] = value
        embeddings = pipe.encode_prompt(**call)[0]
        rows.append(embeddings.float().mean(dim=1).cpu())
    return torch.cat(rows)


class PromptGate:
    """A linear classifier on the prompt's embedding: does the prompt ask for the concept?

    Examples:
        >>> gate = PromptGate.fit(pipe, ["a yellow banana on a white background"] * 8,  # doctest: +SKIP
        ...                       ["a red square on a black background"] * 8)
        >>> gate.opens(pipe, ["a yellow banana on a black background", ""])  # doctest: +SKIP
        [True, False]
    """

    def __init__(self, gate: LinearGate, threshold: float = 0.5) -> None:
        self.gate, self.threshold = gate, float(threshold)

    @classmethod
    def fit(
        cls,
        pipe: Any,
        source_prompts: Sequence[str],
        control_prompts: Sequence[str],
        *,
        n_components: int = 20,
        l2: float = 1.0,
        seed: int = 0,
    ) -> PromptGate:
        """Fit on ``source_prompts`` (the concept asked for) against ``control_prompts``."""
        gate = fit_gate(
            prompt_features(pipe, source_prompts),
            prompt_features(pipe, control_prompts),
            n_components=n_components,
            l2=l2,
            seed=seed,
        )
        return cls(gate)

    @property
    def accuracy(self) -> float:
        """Held-out (cross-validated) accuracy on the fitting prompts."""
        return self.gate.accuracy

    @torch.no_grad()
    def openings(self, pipe: Any, prompts: Sequence[str]) -> list[float]:
        return self.gate(prompt_features(pipe, prompts)).squeeze(-1).tolist()

    def opens(self, pipe: Any, prompts: Sequence[str]) -> list[bool]:
        """Per prompt, whether the gate opens (steer the whole image) or stays shut."""
        return [value >= self.threshold for value in self.openings(pipe, prompts)]

    def save_pretrained(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {"weight": self.gate.weight.detach(), "bias": self.gate.bias.detach().reshape(1)}, directory / GATE_WEIGHTS
        )
        meta = {
            "accuracy": self.gate.accuracy,
            "threshold": self.threshold,
            "n_components": self.gate.n_components,
            "features": "mean over tokens of encode_prompt's prompt embeddings",
        }
        (directory / GATE_CONFIG).write_text(json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> PromptGate:
        directory = Path(directory)
        if not (directory / GATE_WEIGHTS).is_file():
            raise FileNotFoundError(f"no prompt gate in {str(directory)!r} (expected {GATE_WEIGHTS})")
        tensors = load_file(directory / GATE_WEIGHTS)
        meta = json.loads((directory / GATE_CONFIG).read_text())
        gate = LinearGate(
            tensors["weight"], tensors["bias"][0], accuracy=meta["accuracy"], n_components=meta.get("n_components")
        )
        return cls(gate, meta["threshold"])


def safe_latent_diffusion(pipe: Any, concept: str) -> Any:
    """``StableDiffusionPipelineSafe`` on ``pipe``'s components with ``concept`` as its safety
    concept; a :class:`ConfigError` for a pipeline that is not Stable Diffusion (UNet)."""
    from diffusers import StableDiffusionPipeline, StableDiffusionPipelineSafe

    if not isinstance(pipe, StableDiffusionPipeline):
        raise ConfigError(
            f"method 'sld': diffusers' Safe Latent Diffusion exists for Stable Diffusion (UNet) pipelines only, "
            f"not for {type(pipe).__name__}; remove 'sld' from methods"
        )
    safe = StableDiffusionPipelineSafe.from_pipe(
        pipe, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = concept
    return safe


def bad_words_ids(tokenizer: Any, words: Sequence[str]) -> list[list[int]]:
    """The token sequences of ``words`` as written, capitalised, and after a space, for
    ``generate(bad_words_ids=...)`` (sequences holding the unknown token are left out).

    Examples:
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> bad_words_ids(AutoTokenizer.from_pretrained("gpt2"), ["banana"])  # doctest: +SKIP
        [[3820, 2271], [40058], [33, 36871], [...]]
    """
    sequences: list[list[int]] = []
    for word in words:
        for variant in dict.fromkeys((word, f" {word}", word.capitalize(), f" {word.capitalize()}")):
            ids = tokenizer(variant, add_special_tokens=False).input_ids
            if ids and tokenizer.unk_token_id not in ids and ids not in sequences:
                sequences.append(ids)
    if not sequences:
        raise ConfigError(f"bad-words: none of {list(words)} is a word the tokenizer knows")
    return sequences


def default_setting(method: Method, pipeline_class: type) -> float | None:
    """The setting a user gets by default: the pipeline's ``guidance_scale`` for a negative
    prompt, ``StableDiffusionPipelineSafe``'s ``sld_guidance_scale`` for SLD."""
    if method.name == "negative-prompt":
        return inspect.signature(pipeline_class.__call__).parameters["guidance_scale"].default
    if method.name == "sld":
        from diffusers import StableDiffusionPipelineSafe

        return inspect.signature(StableDiffusionPipelineSafe.__call__).parameters["sld_guidance_scale"].default
    return None


def baseline_defaults(model: str, guidance_scale: float | None, methods: Sequence[Method]) -> dict[str, float]:
    """Per baseline among ``methods``, the setting a user gets by default with ``model`` (the
    pipeline class read from its ``model_index.json``); ``guidance_scale``: the config's, which
    is then the negative prompt's default."""
    import diffusers

    from ..shapes import resolve_model_path

    baselines = [m for m in methods if m.is_baseline]
    if not baselines:
        return {}
    if all(m.name == "bad-words" for m in baselines):  # one setting: the words are banned
        return {"bad-words": 1.0}
    pipeline_class = getattr(
        diffusers, diffusers.DiffusionPipeline.load_config(resolve_model_path(model))["_class_name"]
    )
    defaults = {m.name: default_setting(m, pipeline_class) for m in baselines}
    if guidance_scale is not None and "negative-prompt" in defaults:
        defaults["negative-prompt"] = float(guidance_scale)
    return {name: float(value) for name, value in defaults.items() if value is not None}


def baseline_images(
    pipe: Any,
    method: Method,
    setting: float,
    concept: str,
    prompts: Sequence[str],
    generators: Sequence[torch.Generator],
    call: Mapping[str, Any],
    safe: Any = None,
) -> list[Any]:
    """The images of a baseline at ``setting`` (guidance scale or ``sld_guidance_scale``);
    ``call``: the config's other call arguments; ``safe``: a :func:`safe_latent_diffusion`
    pipeline to reuse."""
    if method.name == "negative-prompt":
        arguments = {**call, "guidance_scale": setting, "negative_prompt": [concept] * len(prompts)}
        if hasattr(pipe, "steerers"):  # steerers loaded for other methods stay off
            arguments["steering_strength"] = 0.0
        return pipe(list(prompts), generator=list(generators), **arguments).images
    if method.name == "sld":
        safe = safe if safe is not None else safe_latent_diffusion(pipe, concept)
        return safe(list(prompts), generator=list(generators), sld_guidance_scale=setting, **call).images
    raise ValueError(f"{method.name!r} is not a baseline")
