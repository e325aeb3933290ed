"""DSAS for transformers causal language models, with the pipelines' API.

    lm = DSASLanguageModel.from_pretrained("Qwen/Qwen2.5-1.5B")      # or DSASLanguageModel(model, tokenizer)
    lm.fit_steering(toxic_texts, non_toxic_texts, neutral_texts)      # Linear-AcT + DSAS on the residual stream
    out = lm.generate(["The weather today"], steering_strength=1.0, max_new_tokens=32, return_gate_maps=True)
    out.texts, out.gate_maps                                          # {steerer: {layer: (batch, tokens)}}

The steerers are the core's :class:`~dsas_diffusion.steering.Steerer` files, the same as the
pipelines'; hooks are context-scoped (they act only in the calling thread / task, and in
contexts copied from it) and removed after every call, also after an exception; on a compiled
model they stay attached between calls (:mod:`dsas_diffusion.steering.resident`).

Gates are per token and stateless: prefill gates each prompt token once and each decoding
step gates its new token, so cached and uncached steered generation agree token for token.
Teacher-forced passes (:meth:`DSASLanguageModel.perplexity`, :meth:`DSASLanguageModel.gates`)
pad on the right; generation pads on the left, and replays pass the position ids generation
used, so a replay sees what generation saw.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import FitConfig
from ..names import DEFAULT_TEXT_PRESET
from ..prompts import check_prompt_list
from ..steering import HookPoint, Steerer, SteeringError, fit_steerer
from ..steering.compiled import is_compiled, run_eagerly
from ..steering.hooks import SteeringSession
from ..steering.plan import CallPlan
from ..steering.registry import DEFAULT_STEERER, SteererRegistry, fit_provenance
from ..steering.resident import ResidentSteering, resident_for
from .architectures import check_token_stream
from .architectures import hook_points as preset_hook_points
from .generation import TextGeneration, position_ids

__all__ = ["DSASLanguageModel", "TextGeneration", "position_ids"]


class DSASLanguageModel(SteererRegistry):
    """A causal language model with DSAS steering: fit, load, generate, score, inspect.

    Examples:
        >>> from transformers import AutoModelForCausalLM, AutoTokenizer  # doctest: +SKIP
        >>> lm = DSASLanguageModel(AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path))  # doctest: +SKIP
        >>> lm.fit_steering(source_texts, target_texts, control_texts)  # doctest: +SKIP
        >>> lm.generate(["Once upon a time"], steering_strength=1.0, max_new_tokens=20).texts  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            if tokenizer.eos_token_id is None:
                raise SteeringError("the tokenizer has neither a pad nor an end-of-text token; set tokenizer.pad_token")
            tokenizer.pad_token = tokenizer.eos_token

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> DSASLanguageModel:
        """Any ``AutoModelForCausalLM`` checkpoint and its tokenizer, or ``"shapes-lm"`` (the
        embedded model, stored in float16 and loaded in float32 unless ``dtype`` says otherwise);
        ``kwargs`` such as ``dtype`` and ``device_map`` go to the model."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..shapes import is_shapes_model, resolve_model_path

        if is_shapes_model(name_or_path):
            kwargs.setdefault("dtype", torch.float32)
        name_or_path = resolve_model_path(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs).eval()
        return cls(model, AutoTokenizer.from_pretrained(name_or_path))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # -- the steerers (load_steering, unload_steering, steerers: SteererRegistry) -----------
    steering_modality = "text"

    def _steering_target(self) -> nn.Module:
        return self.model

    # -- text to batches ---------------------------------------------------------------------
    def _format(self, texts: Sequence[str], chat_template: bool, generation: bool = False) -> list[str]:
        if not chat_template:
            return list(texts)
        return [
            self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=generation
            )
            for text in texts
        ]

    def _batches(
        self,
        texts: Sequence[str],
        batch_size: int,
        max_length: int | None,
        side: str = "right",
        pad_to: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Tokenized batches, padded to their longest text (or to ``pad_to`` tokens)."""
        previous = self.tokenizer.padding_side
        self.tokenizer.padding_side = side
        try:
            batches = []
            for start in range(0, len(texts), batch_size):
                encoded = self.tokenizer(
                    list(texts[start : start + batch_size]),
                    return_tensors="pt",
                    padding=True if pad_to is None else "max_length",
                    truncation=max_length is not None,
                    max_length=max_length if pad_to is None else pad_to,
                )
                mask = encoded["attention_mask"]
                if int(mask.sum(-1).min()) == 0:
                    raise SteeringError("a text is empty after tokenization; remove empty texts")
                batch = {"input_ids": encoded["input_ids"], "attention_mask": mask, "position_ids": position_ids(mask)}
                batches.append({k: v.to(self.device) for k, v in batch.items()})
            return batches
        finally:
            self.tokenizer.padding_side = previous

    # -- fitting -----------------------------------------------------------------------------
    def fit_steering(
        self,
        source_texts: Sequence[str],
        target_texts: Sequence[str],
        control_texts: Sequence[str] | None = None,
        config: FitConfig | None = None,
        *,
        max_length: int | None = 256,
        batch_size: int = 8,
        chat_template: bool = False,
        name: str = DEFAULT_STEERER,
        progress: bool = True,
        **settings: Any,
    ) -> Steerer:
        """Fit a steerer from three text sets and load it under ``name``.

        ``source_texts`` show the concept, ``target_texts`` are the desired version (paired
        or not), ``control_texts`` must be left alone (needed by the gates). Activations are
        pooled over real tokens only (the attention mask); the gates then act per token.
        ``config`` says what to fit (default :meth:`FitConfig.for_text`: CAA on the residual
        stream of every decoder layer, DSAS gates reading each token's context; ``FitConfig()``
        is the method as published); ``settings`` override its fields, e.g. ``preset="attention"``,
        ``layers=range(8, 20)``, ``hook_points=[...]``, ``map="iti"``.

        Examples:
            >>> lm.fit_steering(toxic_texts, polite_texts, neutral_texts, layers=range(8, 20))  # doctest: +SKIP
        """
        config = FitConfig.build(config if config is not None else FitConfig.for_text(), **settings)
        if config.sample_decision != "per-layer":
            raise SteeringError(
                f"sample_decision={config.sample_decision!r} decides from denoising steps, which a language model "
                "does not have; use sample_decision='per-layer'"
            )
        gate = config.gate
        sets = {"source": source_texts, "target": target_texts}
        if gate != "none":
            if not control_texts:
                raise SteeringError("control_texts are needed to fit DSAS gates (texts steering must leave alone)")
            sets["control"] = control_texts
        for label, texts in sets.items():
            check_prompt_list(texts, f"{label}_texts")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SteeringError(f"batch_size must be a positive integer, got {batch_size!r}")
        points = (
            [HookPoint.coerce(p) for p in config.hook_points]
            if config.hook_points is not None
            else preset_hook_points(self.model, config.preset or DEFAULT_TEXT_PRESET, config.layers)
        )
        context_source = None
        if config.context_layer is not None:  # the decoder layer whose context every gate reads
            context_source = preset_hook_points(self.model, "residual", [config.context_layer])[0].module
        batches = self._fit_batches(sets, config, chat_template, batch_size, max_length)
        with run_eagerly() if is_compiled(self.model) else contextlib.nullcontext():
            check_token_stream(self.model, points, batches["source"][0])
            provenance = fit_provenance(
                "text",
                self.model,
                model_type=getattr(self.model.config, "model_type", None),
                preset=None if config.hook_points is not None else config.preset,
                chat_template=chat_template,
                texts={label: list(texts) for label, texts in sets.items()},
            )
            steerer = fit_steerer(
                self.model,
                points,
                batches["source"],
                batches["target"],
                batches.get("control"),
                config,
                forward=lambda batch: self.model(**batch),
                provenance=provenance,
                progress=progress,
                context_source=context_source,
            )
        return self._register(name, steerer)

    def _fit_batches(
        self,
        sets: Mapping[str, Sequence[str]],
        config: FitConfig,
        chat_template: bool,
        batch_size: int,
        max_length: int | None,
    ) -> dict[str, list[dict[str, torch.Tensor]]]:
        """The fitting sets as tokenized batches; with ``gate_fit_on="contrast"`` the source and
        target batches are padded to one length, so that their positions pair up."""
        formatted = {label: self._format(texts, chat_template) for label, texts in sets.items()}
        pad_to = None
        if config.gate_fit_on == "contrast":
            lengths = self.tokenizer(
                formatted["source"] + formatted["target"], truncation=max_length is not None, max_length=max_length
            )["input_ids"]
            pad_to = max(len(ids) for ids in lengths)
        return {
            label: self._batches(texts, batch_size, max_length, pad_to=None if label == "control" else pad_to)
            for label, texts in formatted.items()
        }

    # -- applying ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def steering(
        self,
        strength: float | Mapping[str, float] | None = None,
        *,
        gate: str | bool = "dsas",
        record_gates: bool = False,
    ) -> Iterator[dict[str, SteeringSession]]:
        """Steer the bare ``self.model`` inside the block, for other tools (evaluation
        harnesses, transformers pipelines, streamers). The hooks act in this thread / task
        and in contexts copied from it: to steer ``generate`` in another thread (e.g. with a
        ``TextIteratorStreamer``), start the thread on ``contextvars.copy_context().run``.

        Examples:
            >>> with lm.steering(1.0):  # doctest: +SKIP
            ...     ids = lm.model.generate(**inputs, max_new_tokens=20)
        """
        with self._steered(self._loaded_plan(strength, gate, record_gates=record_gates)) as sessions:
            yield sessions

    def _loaded_plan(self, strength: Any, gate: Any = "dsas", *, maps: bool = False, **kwargs: Any) -> CallPlan:
        """The call's plan (:meth:`_plan`); :class:`SteeringError` if it asks to steer, or for
        gate ``maps``, while no steering is loaded."""
        plan = self._plan(strength, gate, **kwargs)
        if not plan.calls and (strength not in (None, 0, 0.0) or maps):
            raise SteeringError("no steering is loaded: call fit_steering(...) or load_steering(dir) first")
        return plan

    @contextlib.contextmanager
    def _steered(self, plan: CallPlan) -> Iterator[dict[str, SteeringSession]]:
        """Steer ``self.model`` inside the block as ``plan`` says; the sessions by name."""
        # a compiled model keeps its hooks attached between calls (tensors carry each call's λ);
        # recording gates appends to lists per call, so that runs eagerly with per-call hooks
        resident = None
        if plan.calls and is_compiled(self.model):
            resident = resident_for(self, self.model, self._steerer_table(), ResidentSteering)
        with contextlib.ExitStack() as stack:
            if resident is not None and not plan.record_gates:
                yield stack.enter_context(resident.run(plan)) if plan.steering else {}
                return
            if resident is not None:
                stack.enter_context(run_eagerly())
            yield plan.open(self.model, stack)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        steering_strength: float | Sequence[float] | Mapping[str, Any] | None = None,
        steering_gate: str | bool = "dsas",
        return_gate_maps: bool = False,
        chat_template: bool = False,
        **generate_kwargs: Any,
    ) -> TextGeneration:
        """``model.generate`` on ``prompts`` (left-padded), steered; greedy, sampling and beam
        search alike; steered calls turn off ``generate``'s automatic compilation (static
        caches still work, eagerly). With ``return_gate_maps`` the gates of every forwarded token come from
        the generation itself when each output row is one prompt's single sequence, and from
        a steered replay of the final sequences otherwise (beam search, several sequences).
        ``steering_strength``: one λ for every loaded steerer, one λ per prompt (a list as long
        as ``prompts``), ``{name: λ or [λ per prompt]}``, or ``None`` (the saved defaults); a
        prompt at λ 0 gets the unsteered tokens, also beside steered prompts in the batch.

        Examples:
            >>> out = lm.generate(["The cat", "The dog"], steering_strength=[0.0, 16.0])  # doctest: +SKIP
        """
        check_prompt_list(prompts, "prompts")
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        config = generate_kwargs.get("generation_config") or self.model.generation_config
        beams = generate_kwargs.get("num_beams", config.num_beams or 1)
        returned = generate_kwargs.get("num_return_sequences", config.num_return_sequences or 1)
        expanded = max(beams, returned) > 1  # rows that are not one prompt's single sequence
        # one λ per prompt, for each of its rows: generate expands every prompt to adjacent rows
        plan = self._loaded_plan(
            steering_strength,
            steering_gate,
            maps=return_gate_maps,
            prompts=len(prompts),
            repeat=max(beams, returned),
            record_gates=return_gate_maps and not expanded,
        )
        if return_gate_maps and all(call.gate == "none" for call in plan.calls.values()):
            raise SteeringError("gate maps come from the DSAS gates: use steering_gate='dsas' with return_gate_maps")
        batch = self._batches(self._format(prompts, chat_template, generation=True), len(prompts), None, "left")[0]
        batch.pop("position_ids")
        if plan.steering or return_gate_maps:
            # generate compiles the forward by itself with a static cache on a GPU; a compiled
            # forward would not run the steering hooks as they are, so steered calls run eager
            if generate_kwargs.get("disable_compile") is False:
                raise SteeringError(
                    "disable_compile=False: generate's automatic compilation is not supported with steering; "
                    "leave it out (steered calls run eager) or steer with strength 0"
                )
            generate_kwargs["disable_compile"] = True
        with torch.no_grad(), self._steered(plan) as sessions:
            sequences = self.model.generate(**batch, **generate_kwargs)
        if isinstance(sequences, Mapping) or hasattr(sequences, "sequences"):
            sequences = sequences.sequences
        width = batch["input_ids"].shape[1]
        eos = generate_kwargs.get("eos_token_id", self.model.generation_config.eos_token_id)
        mask = self._sequence_mask(sequences, width, batch["attention_mask"], eos)
        maps = None
        if return_gate_maps:
            if plan.record_gates:
                maps = {name: self._generation_maps(session, mask) for name, session in sessions.items()}
            else:
                # (the finished sequences: each prompt's returned ones, adjacent)
                replayed = self._plan(
                    steering_strength,
                    steering_gate,
                    prompts=len(prompts),
                    repeat=sequences.shape[0] // len(prompts),
                    record_gates=True,
                )
                maps = self._replay(sequences, mask, replayed)
        continuation = [ids[width:][mask[i, width:]] for i, ids in enumerate(sequences)]
        texts = self.tokenizer.batch_decode(continuation, skip_special_tokens=True)
        tokens = [self.tokenizer.convert_ids_to_tokens(ids[mask[i]]) for i, ids in enumerate(sequences)]
        return TextGeneration(texts, sequences, width, maps, tokens, mask)

    def _sequence_mask(
        self, sequences: torch.Tensor, width: int, prompt_mask: torch.Tensor, eos: int | Sequence[int] | None
    ) -> torch.Tensor:
        """Real tokens of each generated row: the prompt's (no left padding) and the continuation
        up to and including its first end-of-text token (``eos``, or the tokenizer's)."""
        rows = sequences.shape[0]
        repeat = rows // prompt_mask.shape[0]
        mask = torch.ones_like(sequences, dtype=torch.bool)
        mask[:, :width] = prompt_mask.repeat_interleave(repeat, 0).bool()
        if eos is None:
            eos = self.tokenizer.eos_token_id
        ends = {eos} if isinstance(eos, int) else set(eos or [])
        ends.discard(None)
        new = sequences[:, width:]
        is_end = torch.zeros_like(new, dtype=torch.bool)
        for token in ends:
            is_end |= new == token
        after = (is_end.long().cumsum(-1) - is_end.long()) > 0  # strictly after the first end
        mask[:, width:] = ~after
        return mask

    @staticmethod
    def _generation_maps(session: SteeringSession, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        maps = {}
        for layer, records in session.gate_maps.items():
            if not records:
                continue
            gates = torch.cat([record.float() for record in records], dim=1)  # prefill, then one token a step
            full = torch.full(mask.shape, float("nan"))
            full[:, : gates.shape[1]] = gates
            maps[layer] = full.masked_fill(~mask.cpu(), float("nan"))
        return maps

    def _replay(
        self, sequences: torch.Tensor, mask: torch.Tensor, plan: CallPlan
    ) -> dict[str, dict[str, torch.Tensor]]:
        """Steered teacher-forced pass over finished sequences as ``plan`` says (gates recorded):
        each token's gate, NaN where ``mask`` is off and at the last token (generation never
        forwards it)."""
        attention = mask.clone()
        batch = {"input_ids": sequences, "attention_mask": attention.long(), "position_ids": position_ids(attention)}
        with torch.no_grad(), self._steered(plan) as sessions:
            self.model(**batch)
        last = torch.zeros_like(mask)
        last[:, -1] = True
        keep = (mask & ~last).cpu()
        return {
            name: {
                layer: records[0].float().masked_fill(~keep, float("nan"))
                for layer, records in session.gate_maps.items()
                if records
            }
            for name, session in sessions.items()
        }

    def gates(
        self, texts: Sequence[str], *, steering_strength: float | Mapping[str, float] | None = None, batch_size: int = 8
    ) -> list[dict[str, Any]]:
        """Per text: its ``tokens`` and ``gate_maps`` (``{steerer: {layer: (tokens,) float}}``),
        from a steered teacher-forced pass; exact for text from any decoding mode."""
        check_prompt_list(texts, "texts")
        plan = self._loaded_plan(steering_strength, record_gates=True)
        out = []
        for batch in self._batches(texts, batch_size, None):
            with torch.no_grad(), self._steered(plan) as sessions:
                self.model(**batch)
            for row in range(batch["input_ids"].shape[0]):
                real = batch["attention_mask"][row].bool().cpu()
                out.append(
                    {
                        "tokens": self.tokenizer.convert_ids_to_tokens(batch["input_ids"][row][real.to(self.device)]),
                        "gate_maps": {
                            name: {layer: rec[0][row].float()[real] for layer, rec in s.gate_maps.items() if rec}
                            for name, s in sessions.items()
                        },
                    }
                )
        return out

    def perplexity(
        self,
        texts: Sequence[str],
        *,
        steering_strength: float | Mapping[str, float] | None = None,
        steering_gate: str | bool = "dsas",
        batch_size: int = 8,
    ) -> list[float]:
        """Each text's perplexity under the (steered) model: ``exp`` of its mean next-token
        negative log-likelihood, one teacher-forced pass per batch."""
        check_prompt_list(texts, "texts")
        plan = self._loaded_plan(steering_strength, steering_gate)
        values = []
        for batch in self._batches(texts, batch_size, None):
            with torch.no_grad(), self._steered(plan):
                logits = self.model(**batch).logits.float()
            targets = batch["input_ids"][:, 1:]
            real = batch["attention_mask"][:, 1:].bool()
            nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), targets, reduction="none")
            counts = real.sum(-1).clamp(min=1)
            values += torch.exp((nll * real).sum(-1) / counts).tolist()
        return values
