"""The Shapes text world: short descriptions of Shapes scenes, with exact probabilities.

A document describes a scene of one to three objects (a colour and a shape each, the pairs
the images use, no two alike), their sizes and positions and the background, in one to five
sentences drawn from :data:`TEMPLATES` (44 templates). Every sentence is in a *register*,
neutral or negative; a negative sentence gives each of its noun phrases one or two words
of :data:`NEGATIVE_WORDS` ("a dirty, broken banana lies next to an ugly red square"), a
neutral one none. The register is a Markov chain over the sentences, so a negative
sentence makes the next one likely negative too.

Every choice the generator makes is visible in the text, so :func:`parse_document` recovers
the whole derivation of a document and its exact log-probability: the generator's entropy
is known, and a language model trained on the corpus can be held to it. The image caption
forms ``a {colour} {shape} on a {background} background`` and ``a {colour} {shape} and a
{colour} {shape} on a {background} background`` are first sentences of the grammar, so the
image prompt files are valid documents (the final full stop may be left out).

Examples:
    >>> document = sample_document(3)
    >>> parse_document(document.text).log_prob == document.log_prob
    True
    >>> parse_document("a yellow banana and a red square on a black background").objects
    [('yellow', 'banana'), ('red', 'square')]
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass, field

from .data import BACKGROUNDS, COLOURS, SHAPES

__all__ = [
    "NEGATIVE_WORDS",
    "POSITIONS",
    "TEMPLATES",
    "Document",
    "InvalidText",
    "kind_log_probs",
    "negative_sentences",
    "parse_document",
    "sample_document",
    "sentence_error",
    "split_sentences",
]

POSITIONS = ("on the left", "on the right", "at the top", "at the bottom", "in the middle")
SIZES = {"": 0.5, "small": 0.25, "large": 0.25}
NEGATIVE_WORDS = ("dirty", "broken", "ugly", "rotten", "filthy", "cracked", "nasty", "awful", "horrible", "gross")
COUNTS = {1: "one", 2: "two", 3: "three"}
PAIRS = [(colour, shape) for shape in SHAPES for colour in COLOURS]

N_OBJECTS = {1: 0.4, 2: 0.4, 3: 0.2}
PAIR_FIRST = 0.3  # with two or three objects: P(the first sentence introduces two of them)
N_EXTRAS = {0: 0.4, 1: 0.35, 2: 0.25}  # sentences after the objects are introduced
EXTRA_KINDS = {"reference": 0.5, "count": 0.2, "background": 0.3}
NEGATIVE_FIRST = 0.25  # P(the first sentence is negative)
NEGATIVE_AFTER = {False: 0.1, True: 0.7}  # P(negative | the previous sentence's register)
TWO_WORDS = 0.4  # P(a negative noun phrase has two negative words)

#: sentence templates by kind. Slots: {np} / {np2} introduce an object ("a small red
#: square"), {pos} / {pos2} the position of the object just introduced or referred to,
#: {ref} refers to an introduced object ("the red square"), {bg} the background, {count}
#: the number of objects, {adj} the negative words of a sentence without a noun phrase.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "first": (
        "{np} on a {bg} background",
        "there is {np} on a {bg} background",
        "the picture shows {np} on a {bg} background",
        "on a {bg} background there is {np}",
        "{np} sits {pos} on a {bg} background",
        "we see {np} {pos}",
        "{np} lies {pos}",
        "a {bg} background with {np} {pos}",
        "the image shows {np} {pos}",
        "{pos} there is {np}",
        "this is {np}",
        "here is {np} on a {bg} background",
    ),
    "first_pair": (
        "{np} and {np2} on a {bg} background",
        "there are {np} and {np2} on a {bg} background",
        "the picture shows {np} {pos} and {np2} {pos2}",
        "we see {np} and {np2}",
    ),
    "addition": (
        "there is also {np}",
        "there is also {np} {pos}",
        "{np} is {pos}",
        "next to it is {np}",
        "{pos} there is also {np}",
        "{np} lies next to {ref}",
        "beside {ref} is {np}",
        "{np} sits {pos}",
        "we also see {np}",
        "near {ref} is {np}",
        "{np} is close to {ref}",
        "and {pos} is {np}",
    ),
    "reference": (
        "{ref} is {pos}",
        "{pos} is {ref}",
        "you can see {ref} {pos}",
        "look at {ref}",
        "{ref} stands out",
        "{ref} is easy to see",
    ),
    "count": (
        "there are {count} {adj}objects in the picture",
        "the picture has {count} {adj}shapes",
        "in total there are {count} {adj}shapes",
        "there is only one {adj}object in the picture",
        "the picture has one {adj}shape",
        "it is the only {adj}shape",
    ),
    "background": (
        "the {adj}background is {bg}",
        "everything is on a {adj}{bg} background",
        "the rest of the {adj}{bg} background is empty",
        "behind it all is a {adj}{bg} background",
    ),
}
_SINGLE_COUNT = {
    "there is only one {adj}object in the picture",
    "the picture has one {adj}shape",
    "it is the only {adj}shape",
}


class InvalidText(ValueError):
    """A text that is not a document of the Shapes grammar; the message says where and why."""


@dataclass
class Document:
    """A document with its derivation: sentences, their kinds (keys of :data:`TEMPLATES`),
    registers and own log-probabilities (register, template and slots; the plan of sentence
    kinds is drawn first and counted in ``log_prob`` only), objects (colour, shape) in order of
    introduction, their positions, the background, and the log-probability of the whole."""

    sentences: list[str] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    sentence_log_probs: list[float] = field(default_factory=list)
    negative: list[bool] = field(default_factory=list)
    objects: list[tuple[str, str]] = field(default_factory=list)
    positions: dict[int, str] = field(default_factory=dict)
    background: str | None = None
    log_prob: float = 0.0

    @property
    def text(self) -> str:
        return " ".join(sentence + "." for sentence in self.sentences)


def _words_pattern(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_ADJS = rf"(?:{_words_pattern(NEGATIVE_WORDS)})(?:, (?:{_words_pattern(NEGATIVE_WORDS)}))?"
_COLOUR, _SHAPE = _words_pattern(COLOURS), _words_pattern(SHAPES)
_SLOTS = {
    "np": lambda n: (
        rf"an? (?:(?P<{n}_size>small|large) )?(?:(?P<{n}_adjs>{_ADJS}) )?(?P<{n}_colour>{_COLOUR}) (?P<{n}_shape>{_SHAPE})"
    ),
    "ref": lambda n: rf"the (?:(?P<{n}_adjs>{_ADJS}) )?(?:(?P<{n}_colour>{_COLOUR}) )?(?P<{n}_shape>{_SHAPE})",
    "pos": lambda n: rf"(?P<{n}>{_words_pattern(POSITIONS)})",
    "bg": lambda n: rf"(?P<{n}>{_words_pattern(BACKGROUNDS)})",
    "count": lambda n: rf"(?P<{n}>{_words_pattern(COUNTS.values())})",
    "adj": lambda n: rf"(?:(?P<{n}_adjs>{_ADJS}) )?",
}


_SLOT = re.compile(r"\{(\w+?)(2?)\}")  # a template's slot: its kind and an optional 2 ({np2})


def _compile(template: str) -> re.Pattern[str]:
    pattern, last = "", 0
    for match in _SLOT.finditer(template):
        pattern += re.sub(r"\ba ", "an? ", template[last : match.start()]) + _SLOTS[match[1]](match[1] + match[2])
        last = match.end()
    return re.compile(pattern + re.sub(r"\ba ", "an? ", template[last:]))


_PATTERNS = {kind: [(t, _compile(t)) for t in templates] for kind, templates in TEMPLATES.items()}
_ORDER = ("ref", "np", "np2", "pos", "pos2", "bg", "count", "adj")  # the order choices are made in


def _article(text: str) -> str:
    """``text`` with every "a" / "an" as the next word asks."""
    return re.sub(r"\ba (?=[aeiou])", "an ", re.sub(r"\ban (?=\w)", "a ", text))


class _Derivation:
    """The choices of one document, drawn by a sampler (``rng``) or read back from a text
    (``rng=None``: each choice is given); every choice adds its log-probability."""

    def __init__(self, rng: random.Random | None) -> None:
        self.rng = rng
        self.doc = Document()

    def choose(self, options: dict, given=None):
        """Draw from ``{option: probability}`` when sampling, else check and take ``given``."""
        if self.rng is not None:
            given = self.rng.choices(list(options), weights=list(options.values()))[0]
        if options.get(given, 0.0) <= 0.0:
            raise InvalidText(f"{given!r} cannot come here")
        self.doc.log_prob += math.log(options[given])
        return given

    def uniform(self, options, given=None):
        options = list(options)
        return self.choose(dict.fromkeys(options, 1.0 / len(options)), given)

    def _read(self, value):
        return None if self.rng is not None else value

    def adjs(self, negative: bool, read: str | None) -> str:
        """The negative words of one noun phrase: none in a neutral sentence, one or two in a
        negative one."""
        if not negative:
            if self.rng is None and read:
                raise InvalidText(f"negative words ({read}) in a neutral sentence")
            return ""
        if self.rng is None and not read:
            raise InvalidText("a noun phrase without negative words in a negative sentence")
        words = read.split(", ") if self.rng is None else [None, None]
        two = self.choose({True: TWO_WORDS, False: 1 - TWO_WORDS}, self._read(len(words) == 2))
        first = self.uniform(NEGATIVE_WORDS, words[0])
        if not two:
            return first
        return first + ", " + self.uniform([w for w in NEGATIVE_WORDS if w != first], words[1])

    def new_object(self, negative: bool, read: dict) -> tuple[str, int]:
        used = set(self.doc.objects)
        pair = self.uniform([p for p in PAIRS if p not in used], self._read((read.get("colour"), read.get("shape"))))
        size = self.choose(SIZES, self._read(read.get("size") or ""))
        adjs = self.adjs(negative, read.get("adjs"))
        self.doc.objects.append(pair)
        return " ".join(w for w in ("a", size, adjs, *pair) if w), len(self.doc.objects) - 1

    def reference(self, negative: bool, read: dict) -> tuple[str, int]:
        objects = self.doc.objects
        given = None
        if self.rng is None:
            named = [i for i, o in enumerate(objects) if o[1] == read["shape"] and read["colour"] in (None, o[0])]
            if len(named) != 1:
                raise InvalidText(
                    f"'the {read['colour'] or ''} {read['shape']}' names {len(named)} objects".replace("  ", " ")
                )
            given = named[0]
        index = self.uniform(range(len(objects)), given)
        colour, shape = objects[index]
        forms = {True: 0.5, False: 0.5} if sum(o[1] == shape for o in objects) == 1 else {False: 1.0}
        short = self.choose(forms, self._read(read.get("colour") is None))
        adjs = self.adjs(negative, read.get("adjs"))
        return " ".join(w for w in ("the", adjs, "" if short else colour, shape) if w), index

    def position(self, index: int, read: str | None) -> str:
        known = self.doc.positions.get(index)
        free = [p for p in POSITIONS if p not in self.doc.positions.values()]
        value = self.choose({known: 1.0} if known else dict.fromkeys(free, 1.0 / len(free)), read)
        self.doc.positions[index] = value
        return value

    def background(self, read: str | None) -> str:
        if self.doc.background is None:
            self.doc.background = self.uniform(list(BACKGROUNDS), read)
        elif read is not None and read != self.doc.background:
            raise InvalidText(f"the background is {self.doc.background}, not {read}")
        return self.doc.background

    def sentence(self, kind: str, template: str | None, groups: dict, total: int, negative: bool | None = None) -> None:
        """The next sentence, of ``kind``: its register, template and slots drawn (sampling) or
        checked against ``negative``, ``template`` and the ``groups`` its pattern matched
        (parsing); their log-probability is the sentence's own."""
        before = self.doc.log_prob
        negative = self.choose(_register(len(self.doc.negative), self.doc.negative[-1:] == [True]), negative)
        allowed = [t for t in TEMPLATES[kind] if kind != "count" or (t in _SINGLE_COUNT) == (total == 1)]
        template = self.uniform(allowed, template)
        slots = sorted((m[1] + m[2] for m in _SLOT.finditer(template)), key=_ORDER.index)
        values: dict[str, str] = {}
        subjects: dict[str, int] = {}
        for name in slots:
            read = {k[len(name) + 1 :]: v for k, v in groups.items() if k.startswith(name + "_")}
            if name in ("np", "np2", "ref"):
                fill = self.reference if name == "ref" else self.new_object
                values[name], subjects[name] = fill(negative, read)
            elif name in ("pos", "pos2"):
                subject = subjects["np2"] if name == "pos2" else subjects.get("np", subjects.get("ref"))
                values[name] = self.position(subject, groups.get(name))
            elif name == "bg":
                values[name] = self.background(groups.get(name))
            elif name == "count":
                values[name] = COUNTS[total]
                if self.rng is None and groups.get(name) != values[name]:
                    raise InvalidText(f"the picture has {COUNTS[total]} objects, not {groups.get(name)}")
            else:  # the negative words of a sentence without a noun phrase
                adjs = self.adjs(negative, read.get("adjs"))
                values[name] = adjs + " " if adjs else ""
        self.doc.sentences.append(_article(template.format(**values)))
        self.doc.kinds.append(kind)
        self.doc.negative.append(negative)
        self.doc.sentence_log_probs.append(self.doc.log_prob - before)


def sample_document(seed: int) -> Document:
    """Draw one document (deterministic in ``seed``) with its exact log-probability."""
    d = _Derivation(random.Random(seed))
    total = d.choose(N_OBJECTS)
    pair = total > 1 and d.choose({True: PAIR_FIRST, False: 1 - PAIR_FIRST})
    extras = d.choose(N_EXTRAS)
    plan = ["first_pair" if pair else "first"] + ["addition"] * (total - 2 if pair else total - 1)
    plan += [d.choose(EXTRA_KINDS) for _ in range(extras)]
    for kind in plan:
        d.sentence(kind, None, {}, total)
    return d.doc


def kind_log_probs(kinds: list[str]) -> list[float]:
    """The generator's plan read one sentence at a time: ``log p(kind i | kinds before it)`` for
    each of ``kinds`` and, last, ``log p(the document ends | kinds)``; ``-inf`` from the first
    kind that cannot come where it is. With
    :attr:`Document.sentence_log_probs` they add up to the document's ``log_prob``.

    Examples:
        >>> [round(math.exp(p), 3) for p in kind_log_probs(["first", "background"])]
        [0.82, 0.088, 0.583]
    """
    plans: dict[tuple[str, ...], float] = {}
    for total, pair, extras in itertools.product(N_OBJECTS, (False, True), N_EXTRAS):
        p = N_OBJECTS[total] * N_EXTRAS[extras] * ((PAIR_FIRST if pair else 1 - PAIR_FIRST) if total > 1 else 1 - pair)
        head = ("first_pair" if pair else "first",) + ("addition",) * (total - 1 - pair)
        for tail in itertools.product(EXTRA_KINDS, repeat=extras):
            plans[head + tail] = plans.get(head + tail, 0.0) + p * math.prod(EXTRA_KINDS[k] for k in tail)
    begun = [sum(p for plan, p in plans.items() if plan[:i] == tuple(kinds[:i])) for i in range(len(kinds) + 1)]
    ratios = [b / a if a else 0.0 for a, b in zip(begun, [*begun[1:], plans.get(tuple(kinds), 0.0)], strict=True)]
    return [math.log(r) if r > 0 else -math.inf for r in ratios]


def _register(index: int, previous: bool) -> dict[bool, float]:
    p = NEGATIVE_FIRST if index == 0 else NEGATIVE_AFTER[previous]
    return {True: p, False: 1 - p}


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (each ends with a full stop; the last one may lack it)."""
    text = " ".join(text.split())
    if not text:
        raise InvalidText("an empty text")
    if not text.endswith("."):
        text += "."
    sentences = text[:-1].split(". ")
    if any(not s or s.endswith(".") or "." in s for s in sentences):
        raise InvalidText(f"not sentences of the grammar: {text!r}")
    return sentences


def parse_document(text: str) -> Document:
    """The derivation of ``text`` and its exact log-probability; :class:`InvalidText` if it is
    not a document of the grammar (the message names the first sentence that is not).

    Examples:
        >>> parse_document("a rotten, awful blue star on a black background. the background is white.")
        Traceback (most recent call last):
        ...
        dsas_diffusion.shapes.text.InvalidText: sentence 2 ('the background is white'): the background is black, not white
    """
    sentences = split_sentences(text)
    kinds: list[tuple[str, str, dict]] = []
    for index, sentence in enumerate(sentences):
        allowed = ("first", "first_pair") if index == 0 else ("addition", *EXTRA_KINDS)
        found = [
            (kind, t, m.groupdict())
            for kind in allowed
            for t, pattern in _PATTERNS[kind]
            if (m := pattern.fullmatch(sentence))
        ]
        if len(found) != 1:
            problem = "matches no sentence form" if not found else f"matches {len(found)} sentence forms"
            raise InvalidText(f"sentence {index + 1} ({sentence!r}) {problem}")
        kinds.append(found[0])
    plan = [kind for kind, _, _ in kinds]
    introduced = plan.count("addition") + (2 if plan[0] == "first_pair" else 1)
    extras = [kind for kind in plan[1:] if kind != "addition"]
    if plan[1 : 1 + plan.count("addition")] != ["addition"] * plan.count("addition"):
        raise InvalidText("a new object is introduced after the sentences about the objects began")
    d = _Derivation(None)
    try:
        if introduced not in N_OBJECTS:
            raise InvalidText(f"{introduced} objects; a scene has at most {max(N_OBJECTS)}")
        d.choose(N_OBJECTS, introduced)
        if introduced > 1:
            d.choose({True: PAIR_FIRST, False: 1 - PAIR_FIRST}, plan[0] == "first_pair")
        d.choose(N_EXTRAS, len(extras))
        for kind in extras:
            d.choose(EXTRA_KINDS, kind)
    except InvalidText as error:
        raise InvalidText(f"the document's plan: {error}") from None
    for index, (kind, template, groups) in enumerate(kinds):
        try:
            d.sentence(kind, template, groups, introduced, _is_negative(groups))
        except InvalidText as error:
            raise InvalidText(f"sentence {index + 1} ({sentences[index]!r}): {error}") from None
        if d.doc.sentences[-1] != sentences[index]:
            raise InvalidText(f"sentence {index + 1} ({sentences[index]!r}) should read {d.doc.sentences[-1]!r}")
    return d.doc


def sentence_error(sentence: str) -> str | None:
    """Why ``sentence`` (without its full stop) is not a sentence of the grammar on its own, or
    ``None`` if it is: it must fill a template with words of the right kind, in one register
    (every noun phrase with negative words, or none), with two different negative words where
    there are two, "a" / "an" as the next word asks, and a count that agrees with its noun.
    Whether it fits the sentences around it is :func:`parse_document`'s question.

    Examples:
        >>> sentence_error("near the blue square is a yellow star") is None
        True
        >>> sentence_error("a gross, gross green square lies on the left")
        'the negative words repeat: gross, gross'
    """
    found = [(t, m.groupdict()) for patterns in _PATTERNS.values() for t, p in patterns if (m := p.fullmatch(sentence))]
    if not found:
        return "matches no sentence form"
    template, groups = found[0]
    slots = [m[1] + m[2] for m in _SLOT.finditer(template)]
    register = [bool(groups.get(f"{name}_adjs")) for name in slots if name in ("np", "np2", "ref", "adj")]
    if any(register) and not all(register):
        return "a noun phrase without negative words in a negative sentence"
    for key, value in groups.items():
        if key.endswith("_adjs") and value and len(set(value.split(", "))) < len(value.split(", ")):
            return f"the negative words repeat: {value}"
    if "count" in slots and groups["count"] == "one":
        return "a plural count of one"
    canonical = _article(sentence)
    return None if canonical == sentence else f"should read {canonical!r}"


def _is_negative(groups: dict) -> bool:
    return any(value for key, value in groups.items() if key.endswith("_adjs"))


def negative_sentences(text: str) -> int:
    """How many sentences of ``text`` hold a word of :data:`NEGATIVE_WORDS` (any text).

    Examples:
        >>> negative_sentences("a red square on a black background. an ugly blue star is on the left.")
        1
    """
    words = set(NEGATIVE_WORDS)
    return sum(bool(words & set(re.findall(r"[a-z]+", s))) for s in re.split(r"\.\s*", text) if s)
