"""The shipped Shapes concept sets: valid captions, the concept where it belongs and nowhere
else, evaluation prompts apart from the fitting sets, and the generated ones reproducible."""

from __future__ import annotations

import pytest

from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes import (
    EVAL_SETS,
    FIT_SETS,
    HELD_OUT_CONCEPTS,
    TUNING_CONCEPTS,
    concept_dir,
    concept_names,
    make_concept_sets,
)
from dsas_diffusion.shapes.data import parse_caption


def _carrying(prompt: str, concept: str) -> int:
    """How many objects of the prompt carry the concept (its shape or its colour)."""
    return sum(concept in (o.colour, o.shape) for o in parse_caption(prompt).objects)


def _sets(concept: str) -> dict[str, list[str]]:
    return {name: read_prompts(concept_dir(concept) / f"{name}.txt") for name in (*FIT_SETS, *EVAL_SETS)}


def test_every_tuning_and_held_out_concept_ships_its_sets():
    assert set(TUNING_CONCEPTS) | set(HELD_OUT_CONCEPTS) == set(concept_names())
    assert not set(TUNING_CONCEPTS) & set(HELD_OUT_CONCEPTS)


@pytest.mark.parametrize("concept", [*TUNING_CONCEPTS, *HELD_OUT_CONCEPTS])
def test_concept_sets_put_the_concept_where_it_belongs(concept):
    sets = _sets(concept)
    assert [len(sets[name]) for name in (*FIT_SETS, *EVAL_SETS)] == [30, 30, 30, 32, 32, 32]
    assert all(_carrying(p, concept) >= 1 for p in sets["source"] + sets["eval_concept"])
    assert all(_carrying(p, concept) == 0 for p in sets["target"] + sets["control"] + sets["eval_control"])
    # the spatial test: exactly one of two objects carries the concept, the two of different colours
    for prompt in sets["eval_pairs"]:
        objects = parse_caption(prompt).objects
        assert len(objects) == 2 and _carrying(prompt, concept) == 1 and objects[0].colour != objects[1].colour
    # evaluation scenes of two objects were never fitted on (lone objects repeat with other seeds)
    fitted = set(sets["source"]) | set(sets["control"])
    for name in EVAL_SETS:
        assert not [p for p in sets[name] if " and " in p and p in fitted], name
    assert not set(sets["eval_control"]) & set(sets["control"])
    for name in ("source", "control", *EVAL_SETS):  # targets may repeat: a pair without its concept object
        assert len(set(sets[name])) == len(sets[name]), f"{name} repeats a prompt"


@pytest.mark.parametrize("concept", ["star", "green", "triangle"])
def test_generated_concept_sets_are_reproducible(concept):
    assert make_concept_sets(concept) == _sets(concept)


def test_targets_follow_their_sources_line_by_line():
    sets = make_concept_sets("star")
    assert sets["target"][0] == "a red circle on a white background"  # a lone star becomes a circle
    pair = next(i for i, p in enumerate(sets["source"]) if " and " in p)
    assert len(parse_caption(sets["target"][pair]).objects) == 1  # the star of a pair is left out
    colour = make_concept_sets("green")
    source, target = colour["source"][0], colour["target"][0]
    assert source.replace("green", "blue") == target
    with pytest.raises(ValueError, match="neither a Shapes shape"):
        make_concept_sets("teapot")
