"""One steer-or-not decision per sample, from every layer's sample gate over the denoising steps
before steering starts (``FitConfig(sample_decision="accumulated")`` or ``"stacked"``).

A single layer's sample gate at a single step is a weak witness (``docs/removal.md``, section 6,
measures how often it opens on control images); the decision pools every layer over the steps
before the window. While a session *observes* (steps before its window,
switched by the pipeline), each hook adds its layer's sample-gate logit of the steered rows to
:class:`SampleDecision`; at the first steered call the decision is taken, ``score >
threshold``, and held for the rest of the call: a sample is steered at its gates' positions or
not at all.

Each layer's logits are divided by their spread on control samples and averaged over the
observed steps. The score weighs those layer means alike (*accumulated*) or by a logistic
regression of source against control samples (*stacked*). The threshold is a quantile of
control samples' scores. All are calibrated by a pipeline's ``fit_steering`` and saved in the
steerer's config.

Examples:
    >>> decision = SampleDecision(threshold=0.5)
    >>> decision.observe("a", torch.tensor([2.0, -1.0]))
    >>> decision.observe("b", torch.tensor([0.0, 0.0]))
    >>> decision.factor(torch.device("cpu"))
    tensor([1., 0.])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from .errors import SteeringError
from .linear import THRESHOLD_MARGIN, fit_logistic, separating_threshold

__all__ = ["DECISION_KEY", "SampleDecision", "calibrate_decision"]

#: where a steerer's config keeps its calibrated decision (``{"kind": "accumulated" or "stacked",
#: "threshold": τ, "scales": {layer: spread}, "weights": {layer: w} or None, "bias": b,
#: "quantile": q, "margin": m, "spread": std of the held-out control scores, "samples": n,
#: "num_inference_steps": steps}``)
DECISION_KEY = "decision"


class SampleDecision:
    """The evidence for one call's samples and, once taken, their decision (1 steer, 0 not).

    Each layer's logits are divided by its ``scales`` entry (its spread on control samples) and
    averaged over the observed steps; the score is ``sum_l weights[l] * mean_l + bias``, with
    equal weights over the observed layers where ``weights`` is ``None``. ``record=True`` also
    keeps each observation, as observed, by layer (calibration reads them)."""

    def __init__(
        self,
        threshold: float,
        scales: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        bias: float = 0.0,
        *,
        record: bool = False,
    ) -> None:
        self.threshold = float(threshold)
        self.scales = dict(scales or {})
        self.weights = None if weights is None else dict(weights)
        self.bias = float(bias)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.decided: torch.Tensor | None = None
        #: set by a pipeline's step window while the steps before the window run
        self.observing = False
        self.records: list[tuple[str, torch.Tensor]] | None = [] if record else None

    def observe(self, layer: str, logits: torch.Tensor) -> None:
        """Add one layer's sample-gate logits of the observed rows, shape ``(B,)``."""
        if self.decided is not None:
            raise SteeringError("this call's per-sample decision is already taken; observations come before steering")
        logits = logits.detach().float().reshape(-1)
        if self.records is not None:
            self.records.append((layer, logits.cpu()))
        size = next(iter(self.sums.values())).shape if self.sums else logits.shape
        if logits.shape != size:
            raise SteeringError(f"the steered rows changed from {size[0]} to {logits.numel()} samples within one call")
        scaled = logits / self.scales.get(layer, 1.0)
        self.sums[layer] = scaled if layer not in self.sums else self.sums[layer] + scaled
        self.counts[layer] = self.counts.get(layer, 0) + 1

    def layer_means(self) -> dict[str, torch.Tensor]:
        """Each observed layer's mean scaled logit per sample."""
        if not self.sums:
            raise SteeringError(
                "this steering decides per sample from the denoising steps before its steering window, and none "
                "was observed: steer with a window that starts after 0 (the steerer's saved steering_steps, or "
                "e.g. steering_steps=(0.5, 1.0)); language models have no such steps, fit them with "
                "sample_decision='per-layer'"
            )
        return {layer: total / self.counts[layer] for layer, total in self.sums.items()}

    def score(self) -> torch.Tensor:
        """Each sample's score: the weighted sum of its layers' mean scaled logits, plus the bias."""
        means = self.layer_means()
        if self.weights is None:
            return torch.stack(list(means.values())).mean(0)
        missing = sorted(set(self.weights) - set(means))
        if missing:
            raise SteeringError(
                f"this steering decides from layers {missing}, which were not observed; steer all of its layers"
            )
        score = torch.full_like(next(iter(means.values())), self.bias)
        for layer, weight in self.weights.items():
            score += weight * means[layer]
        return score

    def factor(self, device: torch.device) -> torch.Tensor:
        """``(B,)``: 1.0 for the samples to steer, 0.0 for the others (taken once, then held)."""
        if self.decided is None:
            self.decided = (self.score() > self.threshold).float()
        return self.decided.to(device)


def calibrate_decision(
    layers: Iterable,
    control: Sequence[Sequence[Sequence[tuple[str, torch.Tensor]]]],
    quantile: float,
    *,
    source: Sequence[Sequence[Sequence[tuple[str, torch.Tensor]]]] | None = None,
    l2: float = 1.0,
    margin: float = THRESHOLD_MARGIN,
) -> tuple[dict[str, Any], torch.Tensor]:
    """The decision's settings from observed runs, and the held-out control samples' scores.

    ``control`` (and ``source``): per seed round, per run over a chunk of samples, its
    :attr:`SampleDecision.records`. Each layer's scale is the standard deviation of its control
    logits. Without ``source`` the layers weigh alike and the threshold is the ``quantile`` of
    every control sample's score. With ``source`` (*stacked*) a logistic regression (L2 weight
    ``l2``) on the layers' mean scaled logits of source against control samples of every round
    but the last sets the weights and bias, and the threshold is the ``quantile`` of the last
    round's control scores, samples the weights never saw. Scores are computed as a call
    computes them, and the threshold lies on none of them (:func:`~.linear.separating_threshold`,
    ``margin`` standard deviations above the highest with ``quantile=1``), so none of those control
    samples is above it, also when a call rounds their scores otherwise.
    """
    names = [layer.name for layer in layers if layer.sample_gate is not None]
    runs = [run for round_ in control for run in round_ if run]
    if not names or not runs:
        raise SteeringError("no control sample was observed; the per-sample decision cannot be calibrated")
    scales = {}
    for name in names:
        values = torch.cat([logits for run in runs for layer, logits in run if layer == name])
        if values.numel() < 2:
            raise SteeringError(f"too few control observations of layer {name!r} to calibrate the decision")
        scales[name] = float(values.std()) or 1.0
    settings: dict[str, Any] = {"scales": scales, "weights": None, "bias": 0.0}
    held_out = control
    if source is not None:
        if len(control) < 2 or len(source) < 1:
            raise SteeringError("a stacked decision needs at least two rounds of control samples (decision_seeds >= 2)")
        held_out = control[-1:]

        def layer_features(rounds: Sequence[Sequence[Sequence[tuple[str, torch.Tensor]]]]) -> torch.Tensor:
            """``(samples, layers)``: each sample's mean scaled logit per layer, in ``names``' order."""
            means = [_replay(run, scales).layer_means() for round_ in rounds for run in round_ if run]
            return torch.cat([torch.stack([run[name] for name in names], 1) for run in means])

        features = {"source": layer_features(source[:-1] or source), "control": layer_features(control[:-1])}
        labels = torch.cat([torch.ones(len(features["source"])), torch.zeros(len(features["control"]))])
        weight, bias = fit_logistic(torch.cat([features["source"], features["control"]]), labels, l2=l2)
        settings["weights"] = {name: float(w) for name, w in zip(names, weight, strict=True)}
        settings["bias"] = float(bias)
    scores = torch.cat(
        [
            _replay(run, scales, settings["weights"], settings["bias"]).score()
            for round_ in held_out
            for run in round_
            if run
        ]
    )
    settings["threshold"] = separating_threshold(scores, quantile, margin)
    settings["spread"] = float(scores.double().std()) if scores.numel() > 1 else 0.0
    return settings, scores


def _replay(
    run: Sequence[tuple[str, torch.Tensor]],
    scales: Mapping[str, float],
    weights: Mapping[str, float] | None = None,
    bias: float = 0.0,
) -> SampleDecision:
    """A decision fed ``run``'s observations, as a call would have fed them."""
    decision = SampleDecision(0.0, scales, weights, bias)
    for layer, logits in run:
        decision.observe(layer, logits)
    return decision
