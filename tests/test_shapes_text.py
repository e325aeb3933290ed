"""The Shapes text world: sampling and parsing agree, probabilities are exact, bad text is refused."""

import itertools
import math

import pytest

from dsas_diffusion.shapes import PROMPTS_DIR
from dsas_diffusion.shapes.data import BACKGROUNDS, COLOURS
from dsas_diffusion.shapes.text import (
    N_EXTRAS,
    N_OBJECTS,
    NEGATIVE_FIRST,
    NEGATIVE_WORDS,
    POSITIONS,
    SIZES,
    TEMPLATES,
    InvalidText,
    kind_log_probs,
    negative_sentences,
    parse_document,
    sample_document,
    sentence_error,
)


def test_the_parser_reads_back_every_choice_of_the_sampler():
    registers = set()
    for seed in range(2000):
        document = sample_document(seed)
        parsed = parse_document(document.text)
        assert parsed.text == document.text
        assert math.isclose(parsed.log_prob, document.log_prob, rel_tol=0, abs_tol=1e-9)
        assert parsed.objects == document.objects and parsed.negative == document.negative
        assert negative_sentences(document.text) == sum(document.negative)
        assert all(sentence_error(sentence) is None for sentence in document.sentences)
        registers.add(tuple(document.negative))
    assert len(TEMPLATES["first"]) + sum(len(t) for k, t in TEMPLATES.items() if k != "first") >= 40
    assert (True, True) in registers and (False, True) in registers and (True, False) in registers


def test_probabilities_of_all_one_sentence_neutral_documents_sum_to_their_share():
    """Every one-sentence neutral document about a banana, enumerated: their probabilities add up
    to P(one object) · P(no further sentence) · P(neutral) · P(the object is a banana)."""
    total = 0.0
    for template in TEMPLATES["first"]:
        slots = {
            "np": [" ".join(w for w in ("a", size, colour, "banana") if w) for size in SIZES for colour in COLOURS],
            "bg": list(BACKGROUNDS) if "{bg}" in template else [None],
            "pos": list(POSITIONS) if "{pos}" in template else [None],
        }
        for np, bg, pos in itertools.product(*slots.values()):
            total += math.exp(parse_document(template.format(np=np, bg=bg, pos=pos)).log_prob)
    expected = N_OBJECTS[1] * N_EXTRAS[0] * (1 - NEGATIVE_FIRST) * len(COLOURS) / (len(COLOURS) * 5)
    assert math.isclose(total, expected, rel_tol=1e-9)


def test_the_log_probability_splits_into_sentences_and_the_plan_read_sentence_by_sentence():
    """Each sentence's own choices plus the plan read one sentence at a time add up to the whole;
    the plan's next-kind probabilities over every kind and the end sum to one."""
    kinds_seen = set()
    for seed in range(1000):
        document = sample_document(seed)
        parsed = parse_document(document.text)
        assert parsed.kinds == document.kinds and len(document.kinds) == len(document.sentences)
        assert parsed.sentence_log_probs == pytest.approx(document.sentence_log_probs, abs=1e-12)
        whole = sum(kind_log_probs(document.kinds)) + sum(document.sentence_log_probs)
        assert math.isclose(whole, document.log_prob, abs_tol=1e-9)
        kinds_seen.update(document.kinds)
        following = [kind for kind in TEMPLATES if kind_log_probs([*document.kinds[:-1], kind])[-2] > -math.inf]
        assert document.kinds[-1] in following
        next_or_end = [math.exp(kind_log_probs([*document.kinds[:-1], kind])[-2]) for kind in following]
        assert math.isclose(sum(next_or_end) + math.exp(kind_log_probs(document.kinds[:-1])[-1]), 1.0, rel_tol=1e-9)
    assert kinds_seen == set(TEMPLATES)
    assert kind_log_probs(["first", "first", "count"])[1:] == [-math.inf] * 3


def test_the_image_prompt_files_are_documents_of_the_grammar():
    lines = [
        line.strip()
        for path in sorted(PROMPTS_DIR.rglob("*.txt"))
        if path.relative_to(PROMPTS_DIR).parts[0] != "text"  # the text concepts' files: test_eval_text.py
        for line in path.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert len(lines) > 500
    for line in lines:
        assert parse_document(line).sentences == [line]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("a red square is on the left.", "matches no sentence form"),  # an addition cannot open a text
        ("a red square on a black background. the background is white.", "the background is black, not white"),
        ("a red square on a black background. the blue star is on the left.", "names 0 objects"),
        ("a red square on a black background. there is also a red square.", "cannot come here"),  # twice the same
        ("a red square on a black background. the red square stands out. there is also a blue star.", "introduced after"),
        ("we see a red square and a red star. the square is on the left. the star is on the left.", "cannot come here"),
        ("a red square lies on the left. the square is on the right.", "cannot come here"),
        ("a red square on a black background. there are two objects in the picture.", "cannot come here"),
        ("we see a red square and a blue star. there are three objects in the picture.", "not three"),
        ("an ugly red square lies on the left. beside the ugly square is a blue star.", "without negative words"),
        ("a ugly red square lies on the left.", "should read 'an ugly red square lies on the left'"),
        ("a red square on a black background. there is also a blue star. there is also a green circle. "
         "there is also a red circle.", "at most 3"),
        ("a red square on a black background.. the square stands out.", "not sentences"),
        ("a red square on a black background. the square stands out. the square stands out. the square stands out.",
         "cannot come here"),
    ],
)  # fmt: skip
def test_texts_outside_the_grammar_are_refused_with_the_reason(text, problem):
    with pytest.raises(InvalidText, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_document(text)


def test_negative_sentences_counts_sentences_with_any_negative_word():
    assert negative_sentences("there is a cracked star. it is fine. " + " ".join(NEGATIVE_WORDS) + ".") == 2
    assert negative_sentences("a red square on a black background") == 0


@pytest.mark.parametrize(
    ("sentence", "problem"),
    [
        ("a red square lies next to", "matches no sentence form"),
        ("a red squares on a black background", "matches no sentence form"),
        ("beside the ugly square is a blue star", "without negative words"),
        ("a gross, gross green square lies on the left", "repeat"),
        ("there are one objects in the picture", "plural count of one"),
        ("we see a awful red banana on the right", "should read 'we see an awful red banana on the right'"),
        ("we see an red banana on the right", "should read 'we see a red banana on the right'"),
    ],
)
def test_sentences_outside_the_grammar_are_named_on_their_own(sentence, problem):
    assert problem in sentence_error(sentence)
