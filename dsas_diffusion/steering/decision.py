"""One steer-or-not decision per sample, from every layer's sample gate over the denoising steps
before steering starts (``FitConfig(sample_decision="accumulated")``).

A single layer's sample gate at a single step is a weak witness: calibrated to open on 1% of
control samples, per-layer sample gates opened on 10-18% of control images at the late steps of
``shapes-sd`` (``docs/removal.md``). Averaged over every layer and every step before the
steering window, the same logits decide far more reliably. While a session *observes* (steps
before its window, switched by the pipeline), each hook adds its layer's sample-gate logit of
the steered rows to :class:`SampleDecision`; at the first steered call the decision is taken,
``mean logit > threshold``, and held for the rest of the call: a sample is steered at its
gates' positions or not at all.

Each layer's logits are divided by their spread on control samples, so every layer weighs
alike; the threshold is a quantile of the control samples' mean scaled logit. Both are
calibrated by a pipeline's ``fit_steering`` and saved in the steerer's config.

Examples:
    >>> decision = SampleDecision(threshold=0.5)
    >>> decision.observe("a", torch.tensor([2.0, -1.0]))
    >>> decision.observe("b", torch.tensor([0.0, 0.0]))
    >>> decision.factor(torch.device("cpu"))
    tensor([1., 0.])
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .errors import SteeringError

__all__ = ["DECISION_KEY", "SampleDecision", "calibrate_decision"]

#: where a steerer's config keeps its calibrated decision (``{"threshold": τ, "scales": {layer:
#: spread}, "quantile": q, "samples": n, "num_inference_steps": steps}``)
DECISION_KEY = "decision"


class SampleDecision:
    """The evidence for one call's samples and, once taken, their decision (1 steer, 0 not).

    ``scales``: each layer's logits are divided by its scale (the spread of its logit on control
    samples, so that every layer weighs alike); ``record=True`` also keeps each observation, as
    observed, by layer (calibration reads them)."""

    def __init__(self, threshold: float, scales: Mapping[str, float] | None = None, *, record: bool = False) -> None:
        self.threshold = float(threshold)
        self.scales = dict(scales or {})
        self.evidence: torch.Tensor | None = None
        self.count = 0
        self.decided: torch.Tensor | None = None
        self.records: list[tuple[str, torch.Tensor]] | None = [] if record else None

    def observe(self, layer: str, logits: torch.Tensor) -> None:
        """Add one layer's sample-gate logits of the observed rows, shape ``(B,)``."""
        if self.decided is not None:
            raise SteeringError("this call's per-sample decision is already taken; observations come before steering")
        logits = logits.detach().float().reshape(-1)
        if self.records is not None:
            self.records.append((layer, logits.cpu()))
        if self.evidence is None:
            self.evidence = torch.zeros_like(logits)
        elif self.evidence.shape != logits.shape:
            raise SteeringError(
                f"the steered rows changed from {self.evidence.numel()} to {logits.numel()} samples within one call"
            )
        self.evidence += logits / self.scales.get(layer, 1.0)
        self.count += 1

    def mean(self) -> torch.Tensor:
        """Each sample's mean scaled logit over the observations so far."""
        if self.evidence is None:
            raise SteeringError(
                "this steering decides per sample from the denoising steps before its steering window, and none "
                "was observed: steer with a window that starts after 0 (the steerer's saved steering_steps, or "
                "e.g. steering_steps=(0.5, 1.0)); language models have no such steps, fit them with "
                "sample_decision='per-layer'"
            )
        return self.evidence / self.count

    def factor(self, device: torch.device) -> torch.Tensor:
        """``(B,)``: 1.0 for the samples to steer, 0.0 for the others (taken once, then held)."""
        if self.decided is None:
            self.decided = (self.mean() > self.threshold).float()
        return self.decided.to(device)


def calibrate_decision(
    layers: Iterable, runs: Sequence[Sequence[tuple[str, torch.Tensor]]], quantile: float
) -> tuple[float, dict[str, float], torch.Tensor]:
    """The decision's threshold and per-layer scales from control samples, with their means.

    ``runs``: per run over a chunk of control samples, its :attr:`SampleDecision.records`. Each
    layer's scale is the standard deviation of its logits over every run; the threshold is the
    ``quantile`` of the samples' mean scaled logit, computed as a call computes it (so that with
    ``quantile=1`` no calibration sample is above it).
    """
    names = [layer.name for layer in layers if layer.sample_gate is not None]
    if not names or not any(runs):
        raise SteeringError("no control sample was observed; the per-sample decision cannot be calibrated")
    scales = {}
    for name in names:
        values = torch.cat([logits for run in runs for layer, logits in run if layer == name])
        if values.numel() < 2:
            raise SteeringError(f"too few control observations of layer {name!r} to calibrate the decision")
        scales[name] = float(values.std()) or 1.0
    means = []
    for run in runs:
        if run:
            replay = SampleDecision(0.0, scales)
            for name, logits in run:
                replay.observe(name, logits)
            means.append(replay.mean())
    values = torch.cat(means)
    return float(torch.quantile(values.double(), quantile)), scales, values
