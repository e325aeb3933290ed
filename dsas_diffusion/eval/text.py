"""Evaluating steering of a causal language model: ``dsas eval`` when ``model`` is one.

The config, the strength sweeps, the operating points with their bootstrap intervals, the
caching and the ``accelerate`` sharding are the image evaluation's; a job's output is one
continuation (cached as JSON) instead of one image:

* concept prompts: one continuation sampled at temperature 1 (no top-k, no top-p) per prompt
  and seed; a batch (``batch_size`` jobs of one method and strength) is sampled in one call
  after ``torch.manual_seed`` of its smallest seed, so a continuation depends on the batch
  it was drawn in (the batch size is part of the cache key);
* control prompts: the greedy continuation, once per prompt (the first seed only: greedy
  decoding does not depend on it).

Every continuation stops at the end-of-text token or after ``max_new_tokens``. Its row holds:

* ``concept_drawn``: on a Shapes language model, whether the continuation mentions the
  concept, exact from the grammar (:func:`~dsas_diffusion.shapes.text_sets.mentions`);
* ``concept_presence``: the word-list scorer (any of ``concept_words``; default the concept,
  or the grammar's negative words for ``negative`` on a Shapes language model);
* ``classifier_score``: with ``classifier:`` (a local ``AutoModelForSequenceClassification``
  such as a toxicity model), its probability of ``classifier_label`` for the continuation;
* ``valid`` / ``consistent`` (Shapes language models): every complete sentence of prompt and
  continuation is a sentence of the grammar / the whole is a document of it;
* ``perplexity``: of the continuation's tokens under the unsteered model, given the prompt;
* control prompts: ``exact_match`` (same tokens as the unsteered greedy continuation),
  ``prefix_match`` (their common first tokens over the longer one's length: 1 exactly when
  they match) and ``loglik_change`` (mean log-probability per token of the unsteered
  continuation under the steered model minus under the unsteered one).

The control measure of the sweeps and operating points (``similarity``) is ``prefix_match``
by default, ``exact_match`` on request.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .baselines import bad_words_ids
from .cache import UNSTEERED, ImageCache, Job, job_fields
from .config import ConfigError, EvalConfig, parse_method
from .methods import IMAGE_BASELINES

__all__ = [
    "SIMILARITIES",
    "LanguageModelLoader",
    "TextScorer",
    "check_text_config",
    "continuation_logprob",
    "is_text_config",
    "mentions_any",
    "prefix_match",
    "render_text",
    "score_text_jobs",
]

SIMILARITIES = ("prefix_match", "exact_match")


def is_text_config(config: EvalConfig) -> bool:
    """Whether the config's model is a causal language model (a transformers checkpoint)."""
    from ..text.command import is_language_model

    return is_language_model(config.model)


def check_text_config(config: EvalConfig) -> None:
    """Raise :class:`ConfigError` for what a language-model evaluation cannot run."""
    if config.pairs_prompts or config.pairs_screen_seeds is not None:
        raise ConfigError(
            "pairs_prompts / pairs_screen_seeds belong to the image spatial test; remove them for a language model"
        )
    images_only = [m.name for m in config.method_list if m.name in IMAGE_BASELINES]
    if images_only or config.empty_seeds is not None:
        raise ConfigError(
            f"{images_only or 'empty_seeds'}: image baselines and the empty-prompt test; for a language model use "
            "'bad-words' (the concept's words banned at decoding) and '<map>/prompt'"
        )
    if config.similarity not in SIMILARITIES:
        raise ConfigError(f"similarity must be one of {SIMILARITIES}, got {config.similarity!r}")
    if config.max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be at least 1, got {config.max_new_tokens}")
    words = config.concept_words
    if words is not None and (
        isinstance(words, str) or not words or not all(isinstance(w, str) and w.strip() for w in words)
    ):
        raise ConfigError(f"concept_words must be a non-empty list of words, got {words!r}")
    if config.use_shapes_detector():
        from ..shapes import is_text_concept

        if not is_text_concept(config.concept):
            raise ConfigError(
                f"concept {config.concept!r}: on a Shapes language model the grammar counts a shape, a colour or "
                "'negative'; for another concept set detector: none (the word list then counts it)"
            )
    if config.classifier is not None and not Path(config.classifier).is_dir():
        raise ConfigError(
            f"classifier: {config.classifier!r} is not a folder; give a local AutoModelForSequenceClassification "
            "checkpoint (e.g. a toxicity classifier saved with save_pretrained)"
        )


def text_settings(config: EvalConfig) -> dict[str, Any]:
    """Everything besides method, strength, prompt and seed that decides a continuation (the
    batch size too: a sampled continuation depends on the other prompts of its batch)."""
    return {
        "model": config.model,
        "max_new_tokens": config.max_new_tokens,
        "batch_size": config.batch_size,
        "decoding": "concept: sampled, temperature 1; control: greedy",
    }


class LanguageModelLoader:
    """The config's :class:`~dsas_diffusion.text.DSASLanguageModel`, loaded on first use."""

    def __init__(self, model: str, device: str) -> None:
        self.model, self.device = model, device
        self.lm: Any = None

    def __call__(self) -> Any:
        if self.lm is None:
            from ..text import DSASLanguageModel

            self.lm = DSASLanguageModel.from_pretrained(self.model)
            self.lm.model.to(self.device)
        return self.lm


def load_steerers(lm: Any, steering_dirs: Mapping[str, Path]) -> None:
    for name, directory in steering_dirs.items():
        if name not in lm.steerers:
            lm.load_steering(directory, name=name)


def concept_words_of(config: EvalConfig) -> list[str]:
    """The words that carry the concept: ``concept_words``, else the grammar's (Shapes
    language models), else the concept itself."""
    if config.concept_words is not None:
        return list(config.concept_words)
    if config.use_shapes_detector():
        from ..shapes import concept_words

        return concept_words(config.concept)
    return [config.concept]


def _steering(job: Job, loaded: Sequence[str]) -> dict[str, Any]:
    """``steering_strength`` / ``steering_gate`` for ``job`` (every other steerer at 0)."""
    if job.method == UNSTEERED or parse_method(job.method).is_baseline:
        return {"steering_strength": 0.0}
    chosen = parse_method(job.method)
    strengths = {name: (job.strength if name == chosen.steerer_name else 0.0) for name in loaded}
    return {"steering_strength": strengths, "steering_gate": chosen.gate}


def render_text(
    lm: Any,
    config: EvalConfig,
    work: Sequence[Sequence[Job]],
    cache: ImageCache,
    steering_dirs: Mapping[str, Path],
    *,
    process_index: int = 0,
    progress: bool = True,
) -> int:
    """Generate every batch of ``work`` (jobs of one method and strength) into ``cache``;
    each continuation is written under a temporary name and renamed into place."""
    load_steerers(lm, steering_dirs)
    count = 0
    banned = None  # the concept's words as token sequences, read on the first bad-words batch
    for batch in tqdm(work, desc=f"generate (process {process_index})", disable=not progress, position=process_index):
        steering = _steering(batch[0], list(lm.steerers))
        if batch[0].method == "bad-words":
            banned = banned or bad_words_ids(lm.tokenizer, concept_words_of(config))
            steering["bad_words_ids"] = banned
        groups: dict[bool, list[Job]] = {}
        for job in batch:
            groups.setdefault(job.group == "control", []).append(job)
        for greedy, jobs in groups.items():
            decoding = (
                {"do_sample": False} if greedy else {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
            )
            torch.manual_seed(min(job.seed for job in jobs))
            out = lm.generate(
                [job.prompt for job in jobs], max_new_tokens=config.max_new_tokens, **decoding, **steering
            )
            for row, job in enumerate(jobs):
                ids = out.sequences[row][out.mask[row].to(out.sequences.device)].tolist()
                record = {
                    "prompt": job.prompt,
                    "prompt_length": int(out.mask[row, : out.prompt_length].sum()),
                    "ids": ids,
                    "continuation": out.texts[row],
                    "text": lm.tokenizer.decode(ids, skip_special_tokens=True),
                }
                path = cache.path(job)
                temporary = path.with_suffix(f".{process_index}.tmp")
                temporary.write_text(json.dumps(record))
                temporary.replace(path)
                count += 1
    return count


@torch.no_grad()
def continuation_logprob(
    lm: Any,
    sequences: Sequence[Sequence[int]],
    starts: Sequence[int],
    *,
    strength: float | Mapping[str, float] = 0.0,
    gate: str = "dsas",
    batch_size: int = 32,
) -> list[float]:
    """Per sequence, the mean log-probability of its tokens from ``starts[i]`` on, each given
    the ones before (teacher forcing, right padding); NaN for an empty continuation."""
    from ..text.model import position_ids

    values: list[float] = []
    pad = lm.tokenizer.pad_token_id
    for first in range(0, len(sequences), batch_size):
        chunk = [list(s) for s in sequences[first : first + batch_size]]
        width = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, sequence in enumerate(chunk):
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids(mask)}
        with lm.steering(strength, gate=gate):
            logits = lm.model(**{k: v.to(lm.device) for k, v in batch.items()}).logits.float().cpu()
        logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        for row, sequence in enumerate(chunk):
            start = starts[first + row]
            values.append(float(logp[row, start - 1 : len(sequence) - 1].mean()) if len(sequence) > start else math.nan)
    return values


def mentions_any(text: str, words: set[str] | Sequence[str]) -> bool:
    """Whether ``text`` holds any of ``words`` (lower-case) as a whole word: the word-list scorer.

    Examples:
        >>> mentions_any("A dirty square.", {"dirty", "gross"}), mentions_any("a dirtyish square", ["dirty"])
        (True, False)
    """
    return bool(set(words) & set(re.findall(r"[\w']+", text.lower())))


def prefix_match(a: Sequence[int], b: Sequence[int]) -> float:
    """The common first tokens of ``a`` and ``b`` over the longer one's length (1 when equal).

    Examples:
        >>> prefix_match([1, 2, 3, 4], [1, 2, 9]), prefix_match([5], [5])
        (0.5, 1.0)
    """
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    common = 0
    for x, y in zip(a, b):  # noqa: B905 - stops at the shorter one
        if x != y:
            break
        common += 1
    return common / longest


class TextScorer:
    """What scores continuations: the language model itself (perplexity, log-likelihoods),
    the Shapes grammar where it applies, the word list, an optional classifier."""

    def __init__(self, load: Callable[[], Any], config: EvalConfig, steering_dirs: Mapping[str, Path]) -> None:
        self.load, self.steering_dirs = load, steering_dirs
        self.grammar = config.use_shapes_detector()
        self.words = {w.strip().lower() for w in concept_words_of(config)}
        self.classifier = self.classifier_tokenizer = None
        self.label = None
        if config.classifier is not None:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer

            self.classifier = AutoModelForSequenceClassification.from_pretrained(config.classifier).eval()
            self.classifier_tokenizer = AutoTokenizer.from_pretrained(config.classifier)
            labels = self.classifier.config.id2label
            wanted = config.classifier_label
            matches = [i for i, name in labels.items() if wanted is None or str(name).lower() == wanted.lower()]
            if not matches:
                raise ConfigError(
                    f"classifier_label {wanted!r} is not one of the classifier's labels {list(labels.values())}"
                )
            self.label = max(matches)

    def lm(self) -> Any:
        lm = self.load()
        load_steerers(lm, self.steering_dirs)
        return lm

    def word_rate(self, text: str) -> float:
        return float(mentions_any(text, self.words))

    @torch.no_grad()
    def classify(self, texts: Sequence[str]) -> list[float]:
        self.classifier_tokenizer.padding_side = "right"  # where classifiers expect it
        encoded = self.classifier_tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        probabilities = self.classifier(**encoded).logits.float().softmax(-1)
        return probabilities[:, self.label].tolist()


def score_text_jobs(
    scorer: TextScorer, config: EvalConfig, jobs: Sequence[Job], cache: ImageCache
) -> list[dict[str, Any]]:
    """One row per job, every measure of its continuation."""
    if not jobs:
        return []
    from ..shapes import grammar_checks, mentions

    lm = scorer.lm()
    records = [json.loads(cache.path(job).read_text()) for job in jobs]
    own = continuation_logprob(lm, [r["ids"] for r in records], [r["prompt_length"] for r in records])
    classified = scorer.classify([r["continuation"] for r in records]) if scorer.classifier is not None else None
    control = [i for i, job in enumerate(jobs) if job.group == "control"]
    change: dict[int, float] = {}
    references = {i: json.loads(cache.path(jobs[i].reference).read_text()) for i in control}
    if control:
        ref_ids = [references[i]["ids"] for i in control]
        ref_starts = [references[i]["prompt_length"] for i in control]
        base = dict(zip(control, continuation_logprob(lm, ref_ids, ref_starts), strict=True))
        by_setting: dict[tuple[str, float], list[int]] = {}
        for i in control:
            # a prompt-gated job is steered as the job that stands for it; banned words leave
            # the model's probabilities as they are, so their change is not defined
            resolved = cache.resolve(jobs[i])
            if resolved.method == UNSTEERED or not parse_method(resolved.method).is_baseline:
                by_setting.setdefault((resolved.method, resolved.strength), []).append(i)
        for chosen in by_setting.values():
            steering = _steering(cache.resolve(jobs[chosen[0]]), list(lm.steerers))
            steered = continuation_logprob(
                lm,
                [references[i]["ids"] for i in chosen],
                [references[i]["prompt_length"] for i in chosen],
                strength=steering["steering_strength"],
                gate=steering.get("steering_gate", "dsas"),
            )
            change.update({i: value - base[i] for i, value in zip(chosen, steered, strict=True)})
    rows = []
    for index, (job, record) in enumerate(zip(jobs, records, strict=True)):
        continuation = record["continuation"]
        row: dict[str, Any] = {
            **job_fields(config, job),
            "continuation": continuation,
            "concept_drawn": float(mentions(continuation, config.concept)) if scorer.grammar else None,
            "concept_presence": scorer.word_rate(continuation),
            "perplexity": round(math.exp(-own[index]), 5) if not math.isnan(own[index]) else None,
        }
        if classified is not None:
            row["classifier_score"] = round(classified[index], 5)
        if scorer.grammar:
            row["valid"], row["consistent"] = grammar_checks(record["text"])
        if index in references:
            reference = references[index]
            start, ref_start = record["prompt_length"], reference["prompt_length"]
            row["exact_match"] = float(record["ids"][start:] == reference["ids"][ref_start:])
            row["prefix_match"] = round(prefix_match(record["ids"][start:], reference["ids"][ref_start:]), 5)
            row["loglik_change"] = round(change[index], 6) if index in change else None
        rows.append(row)
    return rows
