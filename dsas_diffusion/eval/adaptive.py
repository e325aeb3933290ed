"""``strengths: auto``: each method swept over its own range.

A fixed λ grid favours whichever method is stronger per unit of λ. Here every method starts
at its own start value and doubles (``SweepSettings.factor``) until its concept presence
stops moving, its control images are lost, or the next strength passes the maximum or the
steerer's own bound. The run renders and scores one round of strengths at a time; the
image cache makes a rerun or an extended sweep render only what is new.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .config import SweepSettings
from .operating import mean_of

__all__ = ["AdaptiveSweep"]


class AdaptiveSweep:
    """The strengths of every method so far, and why each sweep stopped.

    Args:
        settings: the sweep's start, factor, maximum and stopping thresholds.
        methods: method names (``"caa/dsas"``...).
        bounds: per method, the largest strength its steerer accepts (``None``: no bound).
        presence_key: the row key of concept presence that decides the plateau
            (``"concept_drawn"`` on the Shapes world, ``"concept_presence"`` otherwise).
        similarity_key: the row key of control similarity (``"clip_similarity"`` for
            images, ``"prefix_match"`` or ``"exact_match"`` for text).

    Examples:
        >>> sweep = AdaptiveSweep(SweepSettings(start=1, max=4), ["caa/dsas"], {"caa/dsas": None})
        >>> sweep.strengths
        {'caa/dsas': [1.0]}
        >>> rows = [{"method": "unsteered", "strength": 0.0, "group": "concept", "concept_drawn": 1.0},
        ...         {"method": "caa/dsas", "strength": 1.0, "group": "concept", "concept_drawn": 0.5},
        ...         {"method": "caa/dsas", "strength": 1.0, "group": "control", "clip_similarity": 0.99}]
        >>> sweep.update(rows), sweep.strengths
        (True, {'caa/dsas': [1.0, 2.0]})
    """

    def __init__(
        self,
        settings: SweepSettings,
        methods: Sequence[str],
        bounds: Mapping[str, float | None],
        presence_key: str = "concept_drawn",
        similarity_key: str = "clip_similarity",
    ) -> None:
        self.settings = settings
        self.presence_key, self.similarity_key = presence_key, similarity_key
        self.bounds = dict(bounds)
        self.strengths: dict[str, list[float]] = {}
        self.stopped: dict[str, str] = {}
        for method in methods:
            grid = settings.grid_for(method)
            if grid is not None:  # a baseline's fixed settings, rendered in the first round
                self.strengths[method] = grid
                self.stopped[method] = "a fixed grid of settings"
                continue
            start = settings.start_for(method)
            bound = self.bounds.get(method)
            if bound is not None and start > bound:
                self.strengths[method] = []
                self.stopped[method] = f"its start {start:g} is above the steerer's bound {bound:g}"
            else:
                self.strengths[method] = [start]

    @property
    def active(self) -> list[str]:
        return [m for m in self.strengths if m not in self.stopped]

    def _curve(self, rows: Sequence[Mapping[str, Any]], method: str) -> tuple[list[float], list[float]]:
        """Concept presence at 0 and at each strength so far, and control similarity."""
        unsteered = [r for r in rows if r["method"] == "unsteered" and r["group"] == "concept"]
        presence = [mean_of(unsteered, self.presence_key)]
        similarity = [1.0]
        for strength in self.strengths[method]:
            chosen = [r for r in rows if r["method"] == method and float(r["strength"]) == strength]
            presence.append(mean_of([r for r in chosen if r["group"] == "concept"], self.presence_key))
            similarity.append(mean_of([r for r in chosen if r["group"] == "control"], self.similarity_key))
        if any(v is None for v in presence + similarity):
            raise ValueError(f"{method}: some strengths have no scored rows yet; score every round before update()")
        return presence, similarity  # type: ignore[return-value]

    def update(self, rows: Sequence[Mapping[str, Any]]) -> bool:
        """Read the scored rows of the last round and give every active method its next
        strength or a reason to stop; returns whether any method goes on."""
        settings = self.settings
        for method in self.active:
            presence, similarity = self._curve(rows, method)
            last = self.strengths[method][-1]
            moved = abs(presence[-1] - presence[0]) >= max(settings.moved, settings.plateau)
            if similarity[-1] < settings.min_similarity:
                self.stopped[method] = (
                    f"control similarity {similarity[-1]:.2f} < {settings.min_similarity:g} at strength {last:g}"
                )
                continue
            if len(presence) >= 3 and moved and abs(presence[-1] - presence[-2]) < settings.plateau:
                self.stopped[method] = (
                    f"concept presence changed by less than {settings.plateau:g} at strength {last:g}"
                )
                continue
            following = last * settings.factor
            bound = self.bounds.get(method)
            if following > settings.max:
                self.stopped[method] = f"next strength {following:g} is above the sweep's maximum {settings.max:g}"
            elif bound is not None and following > bound:
                self.stopped[method] = f"next strength {following:g} is above the steerer's bound {bound:g}"
            else:
                self.strengths[method].append(following)
        return bool(self.active)
