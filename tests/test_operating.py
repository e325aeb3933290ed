"""Operating points, bootstrap intervals, the spatial test's bookkeeping and the adaptive
sweep's stopping rules, on rows whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest

from dsas_diffusion.eval.adaptive import AdaptiveSweep
from dsas_diffusion.eval.config import ConfigError, SweepSettings, load_config
from dsas_diffusion.eval.operating import (
    SweepTable,
    best_point,
    bootstrap_intervals,
    method_figures,
    operating_point,
    spatial_rows,
)


def test_the_operating_point_is_where_the_similarity_first_crosses_the_threshold():
    strengths, similarity = [0, 1, 2, 4], [1.0, 0.99, 0.96, 0.99]  # recovers later: the first crossing counts
    point = operating_point(strengths, similarity, 0.98, presence=[0.9, 0.5, 0.2, 0.0])
    assert point["reached"] == 1.0 and point["similarity"] == 0.98
    assert point["strength"] == pytest.approx(1 + 1 / 3) and point["presence"] == pytest.approx(0.4)
    # given unsorted, the same answer
    shuffled = operating_point([2, 0, 4, 1], [0.96, 1.0, 0.99, 0.99], 0.98, presence=[0.2, 0.9, 0.0, 0.5])
    assert shuffled == point
    # a sweep that never falls below the threshold operates at its strongest setting
    end = operating_point([0, 1, 2], [1.0, 0.995, 0.99], 0.98, presence=[0.9, 0.6, 0.3])
    assert end == {"strength": 2.0, "similarity": 0.99, "reached": 0.0, "presence": 0.3}


def test_the_best_point_is_the_least_presence_within_the_threshold():
    # removal turns back at large strengths while control similarity stays above 0.98
    strengths, similarity = [0, 1, 2, 4, 8], [1.0, 1.0, 0.995, 0.99, 0.985]
    presence = [0.8, 0.4, 0.1, 0.3, 0.5]
    assert operating_point(strengths, similarity, 0.98, p=presence)["strength"] == 8  # the strongest
    best = best_point(strengths, similarity, 0.98, "p", p=presence)
    assert (best["strength"], best["p"]) == (2.0, 0.1)
    # the similarity crosses the threshold: the interpolated crossing is a candidate, the
    # strengths past it are not
    crossing = best_point([0, 1, 2, 4], [1.0, 0.99, 0.97, 0.99], 0.98, "p", p=[0.9, 0.5, 0.1, 0.0])
    assert crossing["strength"] == pytest.approx(1.5) and crossing["p"] == pytest.approx(0.3)
    # ties go to the weaker strength
    assert best_point([0, 1, 2], [1.0, 1.0, 1.0], 0.98, "p", p=[0.5, 0.2, 0.2])["strength"] == 1.0


def test_bootstrap_intervals_cover_the_estimate_and_narrow_with_more_units():
    generator = np.random.default_rng(0)

    def width(units: int) -> float:
        table = SweepTable([0.0], {"p": (generator.random((1, units)) < 0.3).astype(float)}, {}, {})
        estimate, low, high = bootstrap_intervals(table, lambda t, d: {"p": t.means(d)["concept_p"][0]})["p"]
        assert low <= estimate <= high
        return high - low

    assert width(400) < width(25) / 2
    table = SweepTable([0.0], {"p": np.ones((1, 5))}, {}, {})
    estimate, low, high = bootstrap_intervals(table, lambda t, d: {"p": t.means(d)["concept_p"][0]}, replicates=0)["p"]
    assert estimate == 1.0 and np.isnan(low) and np.isnan(high)


def _row(method, strength, group, prompt, seed=0, **values):
    return {"method": method, "strength": strength, "group": group, "prompt": prompt, "seed": seed, **values}


def test_the_spatial_test_counts_only_pairs_whose_unsteered_image_shows_both_objects():
    rows = [
        _row("unsteered", 0.0, "pairs", "a", concept_drawn=1.0, others_drawn=1.0),
        _row("unsteered", 0.0, "pairs", "b", concept_drawn=1.0, others_drawn=0.0),  # other object never drawn
        _row("caa/dsas", 1.0, "pairs", "a", concept_drawn=0.0, others_drawn=1.0),
        _row("caa/dsas", 1.0, "pairs", "b", concept_drawn=0.0, others_drawn=0.0),
    ]
    spatial = {(r["method"], r["prompt"]): r for r in spatial_rows(rows)}
    assert spatial[("caa/dsas", "a")]["removed"] == 1.0 and spatial[("caa/dsas", "a")]["kept"] == 1.0
    assert np.isnan(spatial[("caa/dsas", "b")]["removed"]) and np.isnan(spatial[("caa/dsas", "b")]["kept"])


def test_method_figures_read_presence_and_the_spatial_test_at_the_operating_point():
    rows = []
    for prompt in ("c1", "c2"):
        rows += [_row("unsteered", 0.0, "concept", prompt, concept_drawn=1.0, concept_presence=0.9)]
        rows += [_row("m/dsas", 2.0, "concept", prompt, concept_drawn=0.0, concept_presence=0.1)]
    for prompt in ("k1", "k2"):
        rows += [_row("unsteered", 0.0, "control", prompt, clip_similarity=1.0)]
        rows += [_row("m/dsas", 2.0, "control", prompt, clip_similarity=0.96)]
    rows += [_row("unsteered", 0.0, "pairs", "p", concept_drawn=1.0, others_drawn=1.0)]
    rows += [_row("m/dsas", 2.0, "pairs", "p", concept_drawn=0.0, others_drawn=1.0)]
    lines = method_figures(rows, "m/dsas", [0.98, 0.95], replicates=50)
    assert [(line["similarity"], line["rule"]) for line in lines] == [
        (0.98, "strongest"),
        (0.98, "best"),
        (0.95, "strongest"),
        (0.95, "best"),
    ]
    line98, best98, line95, best95 = lines
    # similarity 1.0 -> 0.96 over λ 0 -> 2: 0.98 is crossed half way, 0.95 never
    assert line98["strength"] == pytest.approx(1.0) and line98["reached"]
    assert line98["concept_drawn"][0] == pytest.approx(0.5) and line98["spatial_removed"][0] == pytest.approx(0.5)
    assert line98["spatial_kept"][0] == pytest.approx(1.0)
    assert line95["strength"] == 2.0 and not line95["reached"] and line95["concept_drawn"][0] == 0.0
    assert line98["hypervolume"][0] == pytest.approx(0.96)
    # presence falls all the way, so the best points are the operating points here
    assert best98["strength"] == pytest.approx(1.0) and best98["concept_drawn"][0] == pytest.approx(0.5)
    assert best95["strength"] == 2.0 and best95["concept_drawn"][0] == 0.0


def _sweep_rows(method, strengths, presence, similarity):
    rows = [_row("unsteered", 0.0, "concept", "c", concept_drawn=presence[0])]
    for strength, p, s in zip(strengths, presence[1:], similarity, strict=True):
        rows += [
            _row(method, strength, "concept", "c", concept_drawn=p),
            _row(method, strength, "control", "k", clip_similarity=s),
        ]
    return rows


@pytest.mark.parametrize(
    ("presence", "similarity", "bound", "strengths", "reason"),
    [
        ([1.0, 0.9], [0.4], None, [1.0], "control similarity 0.40 < 0.5"),
        ([1.0, 0.5, 0.49], [0.99, 0.98], None, [1.0, 2.0], "changed by less than 0.02 at strength 2"),
        ([1.0, 1.0, 1.0, 0.5], [0.99] * 3, None, [1.0, 2.0, 4.0], "above the sweep's maximum 4"),
        ([1.0, 0.5], [0.99], 1.5, [1.0], "above the steerer's bound 1.5"),
    ],
)
def test_the_adaptive_sweep_doubles_until_a_stopping_rule_holds(presence, similarity, bound, strengths, reason):
    sweep = AdaptiveSweep(SweepSettings(start=1.0, max=4.0), ["m/dsas"], {"m/dsas": bound})
    for count in range(1, len(strengths) + 1):
        going = sweep.update(_sweep_rows("m/dsas", strengths[:count], presence[: count + 1], similarity[:count]))
        assert sweep.strengths["m/dsas"][:count] == strengths[:count]
    assert not going and reason in sweep.stopped["m/dsas"]
    assert sweep.strengths["m/dsas"] == strengths


def test_a_presence_that_only_crept_does_not_count_as_a_plateau():
    # the banana's Linear-AcT uniform sweep: 0.77 -> 0.72 -> 0.71 is a creep, not a plateau
    sweep = AdaptiveSweep(SweepSettings(start=1.0), ["m/uniform"], {"m/uniform": None})
    assert sweep.update(_sweep_rows("m/uniform", [1.0], [0.77, 0.72], [0.99]))
    assert sweep.update(_sweep_rows("m/uniform", [1.0, 2.0], [0.77, 0.72, 0.71], [0.99, 0.97]))
    assert sweep.strengths["m/uniform"] == [1.0, 2.0, 4.0]
    # once it has moved by `moved`, a flat step stops it
    assert not sweep.update(_sweep_rows("m/uniform", [1.0, 2.0, 4.0], [0.77, 0.72, 0.5, 0.49], [0.99, 0.97, 0.9]))
    assert "changed by less than 0.02 at strength 4" in sweep.stopped["m/uniform"]


def test_an_unmoved_presence_does_not_stop_the_sweep_before_it_starts():
    sweep = AdaptiveSweep(SweepSettings(start=1.0), ["m/uniform"], {"m/uniform": None})
    assert sweep.update(_sweep_rows("m/uniform", [1.0], [0.9, 0.9], [0.999]))
    assert sweep.update(_sweep_rows("m/uniform", [1.0, 2.0], [0.9, 0.9, 0.9], [0.999, 0.999]))
    assert sweep.strengths["m/uniform"] == [1.0, 2.0, 4.0]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"strengths": "often"}, "'auto' or a list"),
        ({"sweep": {"start": 0}}, "0 < start <= max"),
        ({"sweep": {"speed": 2}}, "known keys"),
        ({"sweep": {"starts": {"caa/dsas": -1}}}, "sweep.starts"),
        ({"thresholds": [1.5]}, "thresholds"),
        ({"bootstrap": -1}, "bootstrap"),
        ({"pairs_screen_seeds": 8}, "needs pairs_prompts"),
        ({"pairs_screen_seeds": 1, "pairs_prompts": ["p"], "seeds": [0, 1]}, "at least the number of seeds"),
        ({"pairs_screen_seeds": "8", "pairs_prompts": ["p"]}, "pairs_screen_seeds must be int"),
    ],
)
def test_bad_sweep_settings_fail_with_a_message_naming_the_field(fields, message):
    base = {"concept": "banana", "concept_prompts": ["a"], "control_prompts": ["b"], "steering": None}
    base.update({"source": ["a"], "target": ["b"], "control": ["c"]})
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**base, **fields})


def test_screened_pairs_take_the_first_seeds_showing_both_objects_and_list_only_those_units():
    from dsas_diffusion.eval.cache import list_jobs
    from dsas_diffusion.eval.sweep import screen_pairs

    shown = {("p", 2), ("p", 5), ("p", 7), ("q", 0)}
    rows = [
        _row("unsteered", 0.0, "pairs", prompt, seed, concept_drawn=1.0, others_drawn=float((prompt, seed) in shown))
        for prompt in ("p", "q", "r")
        for seed in range(8)
    ]
    units = screen_pairs(rows, ["p", "q", "r"], 2)
    assert units == [("p", 2), ("p", 5), ("q", 0)]  # r never shows both objects
    base = {"concept": "banana", "concept_prompts": ["a"], "control_prompts": ["b"], "pairs_prompts": ["p", "q", "r"]}
    config = load_config(None, {**base, "source": ["a"], "target": ["b"], "control": ["c"], "seeds": [0, 1]})
    jobs = list_jobs(config, config.method_list[:1], {"caa/none": [1.0]}, units)
    pairs = [(job.method, job.prompt, job.seed) for job in jobs if job.group == "pairs"]
    assert pairs == [(method, p, s) for method in ("unsteered", "caa/none") for p, s in units]
    assert len(jobs) == 2 * (2 * 2 + len(units))  # two runs x (two seeds x concept + control, the units)
