"""Where a user would operate a method, with bootstrap intervals.

A method's sweep gives, per strength λ (0 = the unsteered images), the mean control
similarity (CLIP image similarity of control images to their unsteered selves) and the mean
concept presence on the concept prompts. The *operating point at similarity ``t``* is the
strongest setting whose control similarity stays at least ``t``: walking up the sweep from
λ = 0, the point where the similarity first falls below ``t``, found by linear interpolation
between the two strengths around it (every other measure is interpolated with the same
weight). A sweep whose similarity never falls below ``t`` operates at its strongest λ.

A conditional method can keep its control images at every strength while its removal turns
back at large λ (an over-steered object reads as the concept again), so the strongest
setting is not always the one a user would choose. The *best point within ``t``* is the
setting with the least concept presence among those whose control similarity stays at
least ``t`` (the sweep's strengths and the interpolated crossing). It is chosen on the
evaluation prompts themselves, so it is optimistic by the choice among a handful of
strengths; the bootstrap repeats the choice in every replicate, so its interval carries it.

The baselines (a negative prompt, Safe Latent Diffusion) are swept over a fixed grid whose
order says nothing about their effect (a lower guidance scale changes control images too).
Their *best point within ``t``* is the grid setting (or the unsteered images) with the least
concept presence among those whose control similarity stays at least ``t``, without
interpolation; their *default point* is the setting a user gets by default.

Intervals: the units of an evaluation are (prompt, seed) pairs. A bootstrap replicate draws
the concept, control and pair units with replacement (the same draw at every strength, so
the sweep stays paired) and recomputes the figure; the interval is the 2.5th and 97.5th
percentile over the replicates.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "MEASURES",
    "SweepTable",
    "best_point",
    "bootstrap_intervals",
    "discrete_point",
    "empty_rows",
    "hypervolume",
    "mean_of",
    "method_figures",
    "operating_point",
    "spatial_rows",
    "sweep_table",
]


def hypervolume(points: Sequence[tuple[float, float]]) -> float:
    """Area dominated by ``points`` (both coordinates larger is better) above (0, 0).

    Examples:
        >>> hypervolume([(1.0, 0.2), (0.5, 0.8)])  # 1 x 0.2 + 0.5 x (0.8 - 0.2)
        0.5
    """
    cleaned = sorted(((max(0.0, u), max(0.0, r)) for u, r in points), key=lambda p: -p[0])
    area, best = 0.0, 0.0
    for index, (utility, removal) in enumerate(cleaned):
        best = max(best, removal)
        following = cleaned[index + 1][0] if index + 1 < len(cleaned) else 0.0
        area += (utility - following) * best
    return round(area, 6)


def mean_of(rows: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The mean of ``key`` over the rows that have it (``None`` and NaN mark rows that do not
    count), or ``None`` when none does.

    Examples:
        >>> mean_of([{"p": 1.0}, {"p": None}, {"p": float("nan")}, {"p": 0.0}], "p")
        0.5
    """
    values = [float(row[key]) for row in rows if row.get(key) is not None and not math.isnan(row[key])]
    return float(np.mean(values)) if values else None


def _setting(
    strengths: Sequence[float], similarity: Sequence[float], index: int, reached: float, measures: Mapping[str, Any]
) -> dict[str, float]:
    """The sweep's figures at its ``index``-th setting, as an operating point."""
    point = {"strength": float(strengths[index]), "similarity": float(similarity[index]), "reached": reached}
    point.update({name: float(v[index]) for name, v in measures.items()})
    return point


def operating_point(
    strengths: Sequence[float], similarity: Sequence[float], threshold: float, **measures: Sequence[float]
) -> dict[str, float]:
    """The operating point of one sweep at control similarity ``threshold``.

    Returns ``strength``, ``similarity`` and each of ``measures`` at that point, and
    ``reached`` (1.0 when the similarity fell below the threshold within the sweep, 0.0 when
    the sweep ends first and the point is its strongest setting).

    Examples:
        >>> point = operating_point([0, 1, 2], [1.0, 0.99, 0.97], 0.98, presence=[0.8, 0.4, 0.2])
        >>> round(point["strength"], 3), round(point["presence"], 3), point["reached"]
        (1.5, 0.3, 1.0)
    """
    order = np.argsort(np.asarray(strengths, dtype=float), kind="stable")
    lam = np.asarray(strengths, dtype=float)[order]
    sim = np.asarray(similarity, dtype=float)[order]
    values = {name: np.asarray(v, dtype=float)[order] for name, v in measures.items()}
    below = np.flatnonzero(sim < threshold)
    if below.size == 0:
        index = len(lam) - 1
        return _setting(lam, sim, index, 0.0, values)
    upper = int(below[0])
    if upper == 0:  # already below at the weakest setting: operate there
        return _setting(lam, sim, 0, 1.0, values)
    lower = upper - 1
    span = sim[lower] - sim[upper]
    weight = float((sim[lower] - threshold) / span) if span > 0 else 0.0

    def at(v: np.ndarray) -> float:
        return float(v[lower] + weight * (v[upper] - v[lower]))

    point = {"strength": at(lam), "similarity": float(threshold), "reached": 1.0}
    point.update({name: at(v) for name, v in values.items()})
    return point


def best_point(
    strengths: Sequence[float],
    similarity: Sequence[float],
    threshold: float,
    presence: str,
    **measures: Sequence[float],
) -> dict[str, float]:
    """The best point of one sweep within control similarity ``threshold``: the least
    ``measures[presence]`` among the strengths below the first one whose similarity falls
    under ``threshold``, and the interpolated operating point (ties: the weaker strength).

    Examples:
        >>> point = best_point([0, 1, 2, 4], [1.0, 1.0, 0.99, 0.99], 0.98, "p", p=[0.8, 0.1, 0.3, 0.5])
        >>> point["strength"], point["p"], point["reached"]
        (1.0, 0.1, 0.0)
    """
    candidates = [operating_point(strengths, similarity, threshold, **measures)]
    order = sorted(range(len(strengths)), key=lambda i: float(strengths[i]))
    for index in order:
        if similarity[index] < threshold:  # the similarity fell below: no stronger setting counts
            break
        candidates.append(_setting(strengths, similarity, index, 0.0, measures))

    def key(point: dict[str, float]) -> tuple[float, float]:
        value = point[presence]
        return (math.inf if math.isnan(value) else value, point["strength"])

    return min(candidates, key=key)


def discrete_point(
    strengths: Sequence[float],
    similarity: Sequence[float],
    threshold: float,
    presence: str,
    **measures: Sequence[float],
) -> dict[str, float]:
    """The best setting of a grid (no interpolation): the least ``measures[presence]`` among the
    settings whose control similarity is at least ``threshold`` (ties: the higher similarity).

    Examples:
        >>> point = discrete_point([0, 2.5, 7.5], [1.0, 0.9, 0.99], 0.98, "p", p=[0.8, 0.0, 0.5])
        >>> point["strength"], point["p"]
        (7.5, 0.5)
    """
    chosen = [i for i in range(len(strengths)) if similarity[i] >= threshold] or [int(np.argmax(similarity))]

    def key(i: int) -> tuple[float, float]:
        value = float(measures[presence][i])
        return (math.inf if math.isnan(value) else value, -float(similarity[i]))

    return _setting(strengths, similarity, min(chosen, key=key), 0.0, measures)


GROUPS = ("concept", "control", "pairs", "empty")


@dataclass
class SweepTable:
    """One method's per-image measures as matrices ``(strengths, units)``, strength 0 (the
    unsteered images) first. ``concept`` / ``control`` / ``pairs`` map a measure name to its
    matrix; a unit is a (prompt, seed) pair; NaN marks a unit that does not count (e.g. a
    pair whose unsteered image lacks one of its objects). ``empty``: the empty prompt's seeds."""

    strengths: list[float]
    concept: dict[str, np.ndarray]
    control: dict[str, np.ndarray]
    pairs: dict[str, np.ndarray]
    empty: dict[str, np.ndarray] = field(default_factory=dict)

    def means(self, draws: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Per strength, the mean of every measure (over the drawn units, if given), named
        ``<group>_<measure>``."""
        out = {}
        for group in GROUPS:
            for name, matrix in getattr(self, group).items():
                chosen = matrix if draws is None else matrix[:, draws[group]]
                with np.errstate(invalid="ignore"):
                    counted = np.sum(~np.isnan(chosen), axis=1)
                    total = np.nansum(chosen, axis=1)
                    out[f"{group}_{name}"] = np.where(counted > 0, total / np.maximum(counted, 1), np.nan)
        return out


def sweep_table(
    rows: Sequence[Mapping[str, Any]],
    method: str,
    measures: Mapping[str, Sequence[str]],
) -> SweepTable:
    """Build a method's :class:`SweepTable` from evaluation rows (``method``, ``strength``,
    ``group``, ``prompt``, ``seed`` and the measures; the unsteered rows are method
    ``"unsteered"``). ``measures`` names the row keys to keep per group."""
    strengths = sorted({0.0, *(float(r["strength"]) for r in rows if r["method"] == method)})
    index = {s: i for i, s in enumerate(strengths)}
    groups: dict[str, dict[str, np.ndarray]] = {}
    for group in GROUPS:
        chosen = [r for r in rows if r["group"] == group and r["method"] in (method, "unsteered")]
        units = sorted({(r["prompt"], r["seed"]) for r in chosen})
        column = {u: j for j, u in enumerate(units)}
        matrices = {name: np.full((len(strengths), len(units)), np.nan) for name in measures.get(group, ())}
        for r in chosen:
            strength = 0.0 if r["method"] == "unsteered" else float(r["strength"])
            for name, matrix in matrices.items():
                value = r.get(name)
                if value is not None:
                    matrix[index[strength], column[(r["prompt"], r["seed"])]] = float(value)
        groups[group] = matrices
    return SweepTable(strengths, groups["concept"], groups["control"], groups["pairs"], groups["empty"])


def bootstrap_intervals(
    table: SweepTable,
    statistic: Callable[[SweepTable, Mapping[str, np.ndarray] | None], Mapping[str, float]],
    *,
    replicates: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float, float]]:
    """Per figure of ``statistic`` (a mapping of named floats): ``(estimate, low, high)``,
    the figure on all units and its 95% percentile interval over bootstrap replicates of the
    units (each group drawn with replacement). ``replicates=0`` gives NaN intervals.

    Examples:
        >>> table = SweepTable([0.0], {"p": np.array([[0.0, 1.0, 1.0, 0.0]])}, {}, {})
        >>> figures = bootstrap_intervals(table, lambda t, d: {"p": t.means(d)["concept_p"][0]})
        >>> estimate, low, high = figures["p"]
        >>> estimate, low <= 0.5 <= high
        (0.5, True)
    """
    generator = np.random.default_rng(seed)
    sizes = {
        group: next(iter(getattr(table, group).values())).shape[1] if getattr(table, group) else 0 for group in GROUPS
    }
    estimates = {name: float(value) for name, value in statistic(table, None).items()}
    samples: dict[str, list[float]] = {name: [] for name in estimates}
    for _ in range(replicates):
        draws = {
            group: generator.integers(0, size, size) if size else np.zeros(0, int) for group, size in sizes.items()
        }
        for name, value in statistic(table, draws).items():
            samples[name].append(float(value))
    out = {}
    for name, estimate in estimates.items():
        finite = np.asarray([v for v in samples[name] if np.isfinite(v)], dtype=float)
        if finite.size == 0:
            out[name] = (estimate, float("nan"), float("nan"))
        else:
            low, high = np.percentile(finite, [2.5, 97.5])
            out[name] = (estimate, float(low), float(high))
    return out


def spatial_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The spatial test's rows with ``removed`` (the concept object gone) and ``kept`` (the
    other objects drawn as prompted), NaN for (prompt, seed) units whose unsteered image did
    not show both the concept object and the others (they cannot test anything)."""
    eligible = {
        (r["prompt"], r["seed"])
        for r in rows
        if r["group"] == "pairs"
        and r["method"] == "unsteered"
        and r.get("concept_drawn") == 1.0
        and r.get("others_drawn") == 1.0
    }
    out = []
    for r in rows:
        if r["group"] != "pairs":
            continue
        ok = (r["prompt"], r["seed"]) in eligible and r.get("concept_drawn") is not None
        removed = 1.0 - float(r["concept_drawn"]) if ok else float("nan")
        kept = float(r.get("others_drawn") or 0.0) if ok else float("nan")
        out.append({**r, "removed": removed, "kept": kept, "removed_and_kept": removed * kept})
    return out


def empty_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The empty prompt's rows with ``unasked_drawn`` (the concept drawn, for the seeds whose
    unsteered image shows it) and ``unasked_similarity`` / ``unasked_change`` (CLIP similarity
    and pixel change to the unsteered image, for the other seeds); NaN where a seed does not
    count."""
    shown = {
        r["seed"]
        for r in rows
        if r["group"] == "empty" and r["method"] == "unsteered" and r.get("concept_drawn") == 1.0
    }
    out = []
    nan = float("nan")
    for r in rows:
        if r["group"] != "empty":
            continue
        has = r["seed"] in shown
        out.append(
            {
                **r,
                "unasked_drawn": float(r.get("concept_drawn") or 0.0) if has else nan,
                "unasked_similarity": nan if has else r.get("clip_similarity", nan),
                "unasked_change": nan if has else r.get("pixel_change", nan),
            }
        )
    return out


MEASURES = {
    "concept": ("concept_drawn", "concept_presence"),
    "control": ("clip_similarity",),
    "pairs": ("removed", "kept", "removed_and_kept", "outside_change", "inside_change"),
    "empty": ("unasked_drawn", "unasked_similarity", "unasked_change"),
}


def method_figures(
    rows: Sequence[Mapping[str, Any]],
    method: str,
    thresholds: Sequence[float],
    *,
    replicates: int = 1000,
    seed: int = 0,
    similarity_key: str = "clip_similarity",
    default: float | None = None,
) -> list[dict[str, Any]]:
    """Two lines per threshold for ``method``, its operating point (``rule: "strongest"``)
    and its best point within the threshold (``rule: "best"``): the strength and, with
    bootstrap intervals, concept presence (detector and CLIP), the spatial test's removal
    and keep rates and pixel change outside and inside the concept's mask (0-255), the
    concept nobody asked for (drawn; similarity and pixel change of the rest, 0-255), and the
    method's hypervolume (control similarity vs 1 - presence). ``similarity_key``: the rows'
    control measure (``"prefix_match"`` for text).

    A baseline swept over a grid (``default``: its default setting) gets ``rule: "best"`` by
    :func:`discrete_point` per threshold and one ``rule: "default"`` line instead."""
    measures = {**MEASURES, "control": (similarity_key,)}
    plain = [r for r in rows if r["group"] not in ("pairs", "empty")]
    table = sweep_table([*plain, *spatial_rows(rows), *empty_rows(rows)], method, measures)
    detector = "concept_drawn" in table.concept and not np.all(np.isnan(table.concept["concept_drawn"]))
    presence = "concept_concept_drawn" if detector else "concept_concept_presence"
    grid = default is not None
    if grid and default not in table.strengths:
        raise ValueError(f"{method}: its default setting {default:g} is not among its settings {table.strengths}")

    def statistic(t: SweepTable, draws: Mapping[str, np.ndarray] | None) -> dict[str, float]:
        means = t.means(draws)
        similarity = means[f"control_{similarity_key}"]
        figures = {"hypervolume": hypervolume(list(zip(similarity, 1.0 - means[presence], strict=True)))}
        for threshold in thresholds:
            if grid:
                points = {
                    "best": discrete_point(t.strengths, similarity, threshold, presence, **means),
                    "default": _setting(t.strengths, similarity, t.strengths.index(default), 0.0, means),
                }
            else:
                points = {
                    "strongest": operating_point(t.strengths, similarity, threshold, **means),
                    "best": best_point(t.strengths, similarity, threshold, presence, **means),
                }
            for rule, point in points.items():
                for name in ("strength", "reached", "similarity", *means):
                    figures[f"{threshold}:{rule}:{name}"] = point[name]
        return figures

    figures = bootstrap_intervals(table, statistic, replicates=replicates, seed=seed)
    has = {
        "detector": detector,
        "spatial": table.pairs["removed"].shape[1] > 0,
        "unasked": table.empty["unasked_drawn"].shape[1] > 0,
    }
    lines = []
    for threshold in thresholds:
        for rule in ("best", "default") if grid else ("strongest", "best"):
            if rule == "default" and threshold != thresholds[0]:
                continue
            lines.append(_figure_line(figures, method, threshold, rule, has))
    return lines


def _figure_line(
    figures: Mapping[str, Any], method: str, threshold: float, rule: str, has: Mapping[str, bool]
) -> dict[str, Any]:
    """One line of :func:`method_figures`: the figures of ``rule`` at ``threshold`` (``None``
    for the measures the rows do not have: ``has["detector"]``, ``"spatial"``, ``"unasked"``)."""
    key = f"{threshold}:{rule}:"

    def figure(name: str, present: bool = True, scale: float = 1.0) -> Any:
        if not present:
            return None
        value = figures[key + name]
        return value if scale == 1.0 else tuple(scale * v for v in value)

    spatial, unasked = has["spatial"], has["unasked"]
    return {
        "method": method,
        "similarity": threshold if rule != "default" else None,
        "rule": rule,
        "strength": figures[key + "strength"][0],
        "reached": bool(figures[key + "reached"][0]),
        "concept_drawn": figure("concept_concept_drawn", has["detector"]),
        "concept_presence": figure("concept_concept_presence"),
        "control_similarity": figure("similarity"),
        "unasked_drawn": figure("empty_unasked_drawn", unasked),
        "unasked_similarity": figure("empty_unasked_similarity", unasked),
        "unasked_change": figure("empty_unasked_change", unasked, 255.0),  # (0-255)
        "spatial_removed": figure("pairs_removed", spatial),
        "spatial_kept": figure("pairs_kept", spatial),
        "outside_change": figure("pairs_outside_change", spatial, 255.0),
        "inside_change": figure("pairs_inside_change", spatial, 255.0),
        "hypervolume": figures["hypervolume"],
    }
