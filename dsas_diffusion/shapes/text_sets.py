"""Text concept sets of the Shapes world: what a continuation of ``shapes-lm`` mentions, and the
prompt files of the text evaluation (``prompts/text/<concept>/``).

Three text concepts: an object (``banana``), an attribute (``red``) and the negative register
(``negative``). The banana and red steerings are fitted on the image prompt files
(``prompts/banana``, ``prompts/red``: their captions are documents of the grammar), so one
steering recipe serves ``shapes-sd`` and ``shapes-lm``; the negative register has its own
fitting sets. Every concept has two evaluation files, drawn from the grammar by
:func:`make_text_sets`:

* ``eval_concept.txt``: first sentences of documents that go on after a sentence carrying the
  concept (its continuation is sampled; the concept rate is how often it mentions the
  concept again);
* ``eval_control.txt``: documents without the concept whose objects are all introduced in
  the first sentence, cut in the middle of their second sentence (its greedy continuation
  must not change; the grammar lets it refer to the objects, not add one).

Examples:
    >>> mentions("the picture has two shapes. look at the banana.", "banana")
    True
    >>> mentions("a small red square lies on the left.", "negative")
    False
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from ..prompts import read_prompts
from .concepts import PROMPTS_DIR
from .data import COLOURS, SHAPES
from .text import (
    _SLOT,
    NEGATIVE_WORDS,
    TEMPLATES,
    Document,
    InvalidText,
    _article,
    negative_sentences,
    parse_document,
    sample_document,
    sentence_error,
    split_sentences,
)

__all__ = [
    "HELD_OUT_TEXT_CONCEPTS",
    "TEXT_CONCEPTS",
    "TEXT_DIR",
    "concept_words",
    "grammar_checks",
    "is_text_concept",
    "make_text_sets",
    "mentions",
    "neutral_version",
    "text_concept_files",
    "without_concept",
]

TEXT_DIR = PROMPTS_DIR / "text"
#: the text concepts: an object, an attribute, a register
TEXT_CONCEPTS = ("banana", "red", "negative")
#: text concepts with evaluation and fitting sets but no shipped steering: kept apart from every
#: choice of settings and evaluated last (``docs/text.md``)
HELD_OUT_TEXT_CONCEPTS = ("star",)


def is_text_concept(concept: str) -> bool:
    """Whether the grammar can count ``concept``: a shape, an object colour or ``"negative"``."""
    return concept == "negative" or concept in SHAPES or concept in COLOURS


def concept_words(concept: str) -> list[str]:
    """The words that carry ``concept`` (the negative register: its ten words)."""
    return list(NEGATIVE_WORDS) if concept == "negative" else [concept]


def mentions(text: str, concept: str) -> bool:
    """Whether ``text`` mentions ``concept``: a shape or colour word of the grammar (they name
    objects only: backgrounds are white, black or gray), or ``"negative"``: any negative word.
    Exact on the grammar's sentences; on other text, a word-list check."""
    if not is_text_concept(concept):
        raise ValueError(f"{concept!r} is not a text concept: use a shape, a colour or 'negative'")
    if concept == "negative":
        return negative_sentences(text) > 0
    return concept in re.findall(r"[a-z]+", text.lower())


def neutral_version(text: str) -> str:
    """``text`` with its negative words taken out ("an ugly, dirty red square" -> "a red
    square"): the same scene in the neutral register.

    Examples:
        >>> neutral_version("an ugly, dirty red square lies on the left. the rotten background is white.")
        'a red square lies on the left. the background is white.'
    """
    words = "|".join(NEGATIVE_WORDS)
    plain = re.sub(rf"\b(?:{words})(?:, (?:{words}))? ", "", text)
    return _article(plain)


def _first(doc: Document, concept: str) -> bool:
    """Whether the document's first sentence carries ``concept``."""
    if concept == "negative":
        return doc.negative[0]
    return mentions(doc.sentences[0], concept)


def _introduced_first(doc: Document) -> bool:
    """Whether every object of the document is introduced in its first sentence: the
    sentences after it only refer to them, so no continuation can bring in a new object."""
    named = re.findall(rf"\b(?:{'|'.join(COLOURS)}) (?:{'|'.join(SHAPES)})\b", doc.sentences[0])
    return len(named) == len(doc.objects)


def _fitted(prompt: str, sets: dict[str, list[str]], seen: set[str]) -> bool:
    """Whether ``prompt`` begins a fitting text (``seen``: the image files' captions)."""
    fitting = [t for name in ("source", "target", "control") for t in sets.get(name, [])]
    return any(t.startswith(prompt) for t in [*fitting, *seen])


def make_text_sets(concept: str, seed: int = 0, count: int = 32) -> dict[str, list[str]]:
    """The prompt sets of a text concept, drawn from documents ``seed * 10**6 + i``:

    * ``eval_concept``: ``count`` distinct first sentences (with their full stop) of
      documents of two sentences or more whose first sentence carries the concept;
    * ``eval_control``: ``count`` distinct documents of two sentences or more that never
      mention the concept and introduce every object in their first sentence, cut after the
      first half of their second sentence's words;
    * fitting sets of documents: ``source``, for ``negative`` documents with every sentence
      negative, otherwise documents that mention the concept; ``target``, each one in the
      neutral register (:func:`neutral_version`) or with the concept swapped for a colour or
      shape the document does not have (:func:`without_concept`); ``control``, documents
      without the concept. For banana and red they are drawn after the evaluation sets, from
      documents ``seed * 10**6 + 500_000 + i``, so the evaluation sets stay those drawn before
      they existed.

    No evaluation prompt begins a fitting text (nor, for banana and red, an image prompt file's
    caption).
    """
    if not is_text_concept(concept):
        raise ValueError(f"{concept!r} is not a text concept: use a shape, a colour or 'negative'")
    sets: dict[str, list[str]] = {"eval_concept": [], "eval_control": []}
    fitting = concept == "negative"
    if fitting:
        sets.update(source=[], target=[], control=[])
    seen = set()
    if concept != "negative" and (PROMPTS_DIR / concept / "source.txt").is_file():
        files = [PROMPTS_DIR / concept / f"{name}.txt" for name in ("source", "target", "control")]
        seen = {prompt + "." for file in files for prompt in read_prompts(file)}
    index = seed * 10**6
    while any(len(items) < count for items in sets.values()):
        doc = sample_document(index)
        index += 1
        text = doc.text
        if fitting and len(sets["source"]) < count and all(doc.negative):
            sets["source"].append(text)
            sets["target"].append(neutral_version(text))
        elif fitting and len(sets["control"]) < count and not any(doc.negative):
            sets["control"].append(text)
        elif len(doc.sentences) < 2:
            continue
        elif _first(doc, concept) and len(sets["eval_concept"]) < count:
            prompt = doc.sentences[0] + "."
            if prompt not in sets["eval_concept"] and not _fitted(prompt, sets, seen):
                sets["eval_concept"].append(prompt)
        elif not mentions(text, concept) and _introduced_first(doc) and len(sets["eval_control"]) < count:
            words = doc.sentences[1].split()
            prompt = doc.sentences[0] + ". " + " ".join(words[: max(1, len(words) // 2)])
            if prompt not in sets["eval_control"] and not _fitted(prompt, sets, seen):
                sets["eval_control"].append(prompt)
    if not fitting:
        sets.update(_document_fitting_sets(concept, seed, count, sets))
    return sets


def without_concept(doc: Document, concept: str) -> str:
    """``doc``'s text with the shape or colour ``concept`` swapped, everywhere, for the first one
    of the grammar that the document does not have: the same scene without the concept.

    Examples:
        >>> sample_document(7).text
        'a yellow triangle on a white background.'
        >>> without_concept(sample_document(7), "triangle")
        'a yellow circle on a white background.'
    """
    kinds = SHAPES if concept in SHAPES else tuple(COLOURS)
    used = {shape if concept in SHAPES else colour for colour, shape in doc.objects}
    swap = next(k for k in kinds if k != concept and k not in used)
    return _article(re.sub(rf"\b{concept}\b", swap, doc.text))


def _document_fitting_sets(
    concept: str, seed: int, count: int, evaluation: dict[str, list[str]]
) -> dict[str, list[str]]:
    """Fitting sets of documents for a shape or colour: ``count`` documents mentioning it (each
    with its :func:`without_concept` as target) and ``count`` without it; none begins with an
    evaluation prompt."""
    sets: dict[str, list[str]] = {"source": [], "target": [], "control": []}
    prompts = evaluation["eval_concept"] + evaluation["eval_control"]
    drawn: set[str] = set()
    index = seed * 10**6 + 500_000
    while len(sets["source"]) < count or len(sets["control"]) < count:
        doc = sample_document(index)
        index += 1
        text = doc.text
        if text in drawn or any(text.startswith(prompt) for prompt in prompts):
            continue
        label = "source" if mentions(text, concept) else "control"
        if len(sets[label]) < count:
            drawn.add(text)
            sets[label].append(text)
            if label == "source":
                sets["target"].append(without_concept(doc, concept))
    return sets


def text_concept_files(concept: str, documents: bool = True) -> dict[str, Path]:
    """The prompt files of a text concept: ``source`` / ``target`` / ``control`` (the fitting
    documents of :func:`make_text_sets`) and ``eval_concept`` / ``eval_control``. With
    ``documents=False`` the fitting files of a shape or colour are its image prompt files
    (one-sentence captions; the negative register has none)."""
    if concept not in TEXT_CONCEPTS + HELD_OUT_TEXT_CONCEPTS:
        known = ", ".join(TEXT_CONCEPTS + HELD_OUT_TEXT_CONCEPTS)
        raise ValueError(f"no text concept {concept!r}; shipped: {known}")
    fitting = TEXT_DIR / concept if concept == "negative" or documents else PROMPTS_DIR / concept
    files = {name: fitting / f"{name}.txt" for name in ("source", "target", "control")}
    files.update({name: TEXT_DIR / concept / f"{name}.txt" for name in ("eval_concept", "eval_control")})
    for path in files.values():
        read_prompts(path)  # a clear error if a file is missing or empty
    return files


def _longest_sentence() -> int:
    """The most words a sentence of the grammar can have (every slot at its longest)."""
    longest = {"np": 6, "ref": 5, "pos": 3, "bg": 1, "count": 1, "adj": 2}  # "a large ugly, dirty red star"
    return max(
        len(_SLOT.sub("", template).split()) + sum(longest[m[1]] for m in _SLOT.finditer(template))
        for templates in TEMPLATES.values()
        for template in templates
    )


#: a fragment after the last full stop with more words than this is the start of no sentence
LONGEST_SENTENCE = _longest_sentence()


def grammar_checks(text: str) -> tuple[float, float]:
    """``(valid, consistent)`` of a Shapes text: every sentence up to its last full stop a
    sentence of the grammar, and those sentences a document of it. What follows the last full
    stop (a continuation cut by its token budget) is left out unless it is longer than any
    sentence (then neither holds). NaN, NaN: no full sentence.

    Examples:
        >>> grammar_checks("a red star lies on the left. the square is easy to see.")
        (1.0, 0.0)
        >>> grammar_checks("a red star lies on the left. the star is")
        (1.0, 1.0)
        >>> grammar_checks("a red star lies on the left. " + "on a " * 20)
        (0.0, 0.0)
    """
    end = text.rfind(".") + 1
    if len(text[end:].split()) > LONGEST_SENTENCE:
        return 0.0, 0.0
    complete = text[:end].strip()
    if not complete:
        return math.nan, math.nan
    try:
        valid = all(sentence_error(s) is None for s in split_sentences(complete))
    except InvalidText:
        return 0.0, 0.0
    try:
        parse_document(complete)
    except InvalidText:
        return float(valid), 0.0
    return float(valid), 1.0
