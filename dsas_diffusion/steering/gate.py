"""The DSAS gate: when to steer. PCA + logistic regression folded into one affine score."""

from __future__ import annotations

import torch
from torch import nn

from ..names import GATE_ACTIVATIONS, GATE_READS
from .errors import InputSetError
from .linear import fit_logistic, fit_pca, separating_threshold, stratified_folds

__all__ = [
    "GATE_ACTIVATIONS",
    "LinearGate",
    "calibrate_gate_on_positions",
    "calibrate_gate_two_sided",
    "fit_gate",
    "gate_accuracy_scale",
    "gate_opening",
]


def gate_opening(logits: torch.Tensor, activation: str, *, inplace: bool = False) -> torch.Tensor:
    """A gate's opening in [0, 1] from its logits: a sigmoid, a ReLU clipped at 1, or a step
    (1 above 0, else 0; NaN gives 0); ``inplace`` overwrites ``logits`` where it can.

    Examples:
        >>> gate_opening(torch.tensor([-1.0, 0.5, 2.0]), "relu"), gate_opening(torch.tensor([-1.0, 0.5]), "step")
        (tensor([0.0000, 0.5000, 1.0000]), tensor([0., 1.]))
    """
    if activation == "step":
        return (logits > 0).to(logits.dtype)
    if activation == "sigmoid":
        return logits.sigmoid_() if inplace else torch.sigmoid(logits)
    return logits.clamp_(0.0, 1.0) if inplace else logits.clamp(0.0, 1.0)


class LinearGate(nn.Module):
    """``s(t) = scale * f(g(weight . t + bias))`` per position, with ``g`` a sigmoid, a ReLU
    clipped at 1 or a step (1 above 0, else 0) (the *opening*) and ``f`` the floor: with ``floor = τ > 0``,
    ``f(o) = max(0, (o − τ) / (1 − τ))``, so a gate opened less than ``τ`` is exactly 0 and
    stays 0 whatever the strength, and a fully open gate is still 1. ``accuracy`` is the
    held-out accuracy measured when it was fitted; ``enabled=False`` switches the layer off
    when gating is on (layer selection). ``reads``: what the gate reads at its layer's
    module: ``"output"`` (the activation it steers, as published), ``"input"`` (e.g. a
    cross-attention's query input, the image stream before the prompt enters it) or
    ``"context"`` (a language model's tokens' prefix, :mod:`.context`); its width is then
    that of what it reads. ``source``: for a gate reading the context, the module whose
    context it reads (a decoder layer called before its own module), ``None`` for its own.

    Examples:
        >>> gate = LinearGate(torch.tensor([1.0, 0.0]), 0.0, floor=0.5)
        >>> gate(torch.tensor([[-3.0, 5.0], [0.0, 5.0], [3.0, 5.0]])).squeeze(-1)
        tensor([0.0000, 0.0000, 0.9051])
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: float | torch.Tensor,
        *,
        accuracy: float = float("nan"),
        scale: float = 1.0,
        enabled: bool = True,
        activation: str = "sigmoid",
        n_components: int | None = None,
        floor: float = 0.0,
        reads: str = "output",
        source: str | None = None,
    ) -> None:
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"gate activation must be one of {GATE_ACTIVATIONS}, got {activation!r}")
        if reads not in GATE_READS:
            raise ValueError(f"a gate reads one of {GATE_READS} of its module, got {reads!r}")
        if source is not None and reads != "context":
            raise ValueError(f"a gate reads another module's context only: source={source!r} with reads={reads!r}")
        if not 0.0 <= float(floor) < 1.0:
            raise ValueError(f"gate floor must lie in [0, 1), got {floor!r}")
        self.weight = nn.Parameter(torch.as_tensor(weight, dtype=torch.float32).flatten().clone(), requires_grad=False)
        self.bias = nn.Parameter(torch.as_tensor(bias, dtype=torch.float32).reshape(()).clone(), requires_grad=False)
        self.accuracy = float(accuracy)
        self.scale = float(scale)
        self.enabled = bool(enabled)
        self.activation = activation
        self.n_components = n_components
        self.floor = float(floor)
        self.reads = reads
        self.source = source

    @property
    def width(self) -> int:
        return self.weight.numel()

    def logits(self, x: torch.Tensor, feature_dim: int) -> torch.Tensor:
        """``weight . x + bias`` at every position, keeping a size-1 feature dimension."""
        bias = self.bias.reshape(1)
        if feature_dim == -1:  # one matrix-vector product with the bias added in the same kernel
            return torch.nn.functional.linear(x, self.weight.view(1, -1), bias)
        # channels first (B, C, *positions): one batched matrix-vector product over the
        # flattened positions with the bias folded in (several times faster on the CPU
        # than a 1x1 convolution with one output channel, and no transposed copy)
        batch, width = x.shape[0], x.shape[1]
        flat = x.reshape(batch, width, -1)
        logits = torch.baddbmm(bias.view(1, 1, 1), self.weight.view(1, 1, width).expand(batch, 1, width), flat)
        return logits.view(batch, 1, *x.shape[2:])

    def opening(self, x: torch.Tensor, feature_dim: int = -1) -> torch.Tensor:
        """``g(weight . x + bias)`` in [0, 1] at every position, before the floor and scale."""
        return gate_opening(self.logits(x, feature_dim), self.activation)

    def forward(self, x: torch.Tensor, feature_dim: int = -1) -> torch.Tensor:
        value = self.opening(x, feature_dim)
        if self.floor > 0.0:
            value = value.sub_(self.floor).clamp_(min=0.0).mul_(1.0 / (1.0 - self.floor))
        return value * self.scale if self.scale != 1.0 else value

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, accuracy={self.accuracy:.3f}, scale={self.scale:.3f}, "
            f"enabled={self.enabled}, activation={self.activation}, floor={self.floor:g}, reads={self.reads}"
            + (f", source={self.source}" if self.source else "")
        )


def gate_accuracy_scale(accuracy: float) -> float:
    """Accuracy-aware scaling: 0 at chance (0.5) rising linearly to 1 at perfect accuracy."""
    return float(min(1.0, max(0.0, (accuracy - 0.5) / 0.5)))


def _fit_folded(
    source: torch.Tensor, control: torch.Tensor, n_components: int, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    features = torch.cat([source, control]).double()
    labels = torch.cat([torch.ones(len(source)), torch.zeros(len(control))])
    mean, components = fit_pca(features, n_components)
    projected = (features - mean) @ components
    beta, beta0 = fit_logistic(projected, labels, l2=l2)
    weight = components @ beta  # fold PCA into the classifier
    bias = beta0 - mean @ weight
    return weight, bias


def fit_gate(
    source: torch.Tensor,
    control: torch.Tensor,
    *,
    n_components: int = 5,
    l2: float = 1.0,
    cv_folds: int = 5,
    seed: int = 0,
    activation: str = "sigmoid",
) -> LinearGate:
    """Fit the DSAS gate on source (label 1) vs control (label 0) activations.

    PCA with ``n_components`` on source and control together, then an L2 logistic
    regression on the projections; both folded into one ``(weight, bias)`` so that the
    gate costs one dot product per position. Held-out accuracy is the mean over
    ``cv_folds`` stratified folds (each fold refits PCA and classifier).

    Examples:
        >>> import torch
        >>> source, control = torch.randn(32, 16) + 2.0, torch.randn(32, 16)
        >>> gate = fit_gate(source, control)
        >>> gate.accuracy > 0.9
        True
    """
    for name, rows in (("source", source), ("control", control)):
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise InputSetError(f"gate: the {name} set is empty; give it at least {n_components + 1} samples")
    if source.shape[1] != control.shape[1]:
        raise InputSetError(f"gate: source has {source.shape[1]} channels, control {control.shape[1]}")
    total = source.shape[0] + control.shape[0]
    if n_components < 1:
        raise ValueError("n_components must be at least 1")
    if total <= n_components:
        raise InputSetError(
            f"gate: {total} source + control samples cannot fit {n_components} PCA components; "
            f"give more samples or lower n_components to at most {total - 1}"
        )
    n_components = min(n_components, source.shape[1])
    weight, bias = _fit_folded(source, control, n_components, l2)
    accuracy = _cross_validated_accuracy(source, control, n_components, l2, cv_folds, seed)
    return LinearGate(weight, bias, accuracy=accuracy, activation=activation, n_components=n_components)


def _cross_validated_accuracy(
    source: torch.Tensor, control: torch.Tensor, n_components: int, l2: float, folds: int, seed: int
) -> float:
    labels = torch.cat([torch.ones(len(source)), torch.zeros(len(control))]).long()
    folds = min(folds, int(min(len(source), len(control))))
    if folds < 2:
        return float("nan")
    features = torch.cat([source, control]).double()
    correct = 0
    for test in stratified_folds(labels, folds, seed):
        train = torch.ones(len(labels), dtype=torch.bool)
        train[test] = False
        train_source = features[train & (labels == 1)]
        train_control = features[train & (labels == 0)]
        components = min(n_components, len(train_source) + len(train_control) - 1)
        weight, bias = _fit_folded(train_source, train_control, components, l2)
        predicted = (features[test] @ weight + bias > 0).long()
        correct += int((predicted == labels[test]).sum())
    return correct / len(labels)


def calibrate_gate_on_positions(
    gate: LinearGate, control_positions: torch.Tensor, *, quantile: float = 0.99, ceiling: float = 0.05
) -> LinearGate:
    """Shift the gate's bias so that only ``1 - quantile`` of control *positions* open it
    beyond ``ceiling``.

    A gate fitted on pooled (per-sample mean) activations places its boundary between two
    means whose spread is much smaller than that of single positions, so applied per
    position it opens on many ordinary positions. This keeps the pooled direction and
    moves the threshold: at the ``quantile`` of control-position logits the gate equals
    ``ceiling``. The bias only ever decreases (the gate never opens more than before). A step
    gate, which decides, opens at :func:`~.linear.separating_threshold` of those logits, so that
    no control position sits on its edge.
    """
    if not 0.0 < quantile < 1.0 or not 0.0 < ceiling < 1.0:
        raise ValueError("quantile and ceiling must lie strictly between 0 and 1")
    if control_positions.ndim != 2 or control_positions.shape[0] == 0:
        raise InputSetError("gate calibration needs control positions: a non-empty (rows, C) matrix")
    with torch.no_grad():
        logits = control_positions.float() @ gate.weight
        if gate.activation == "step":
            level = torch.tensor(separating_threshold(logits, quantile), dtype=torch.float32)
        else:
            level = torch.quantile(logits.double(), quantile).float()
        target_logit = _logit_of(gate, ceiling)
        new_bias = torch.minimum(gate.bias, target_logit - level)
        gate.bias.copy_(new_bias)
    return gate


def _logit_of(gate: LinearGate, level: float) -> float:
    """The pre-activation value at which the gate's opening equals ``level`` (a step's: 0, where
    it opens)."""
    if gate.activation == "step":
        return 0.0
    return float(torch.logit(torch.tensor(level, dtype=torch.float64))) if gate.activation == "sigmoid" else level


def calibrate_gate_two_sided(
    gate: LinearGate,
    control_positions: torch.Tensor,
    concept_positions: torch.Tensor,
    *,
    control_quantile: float = 0.99,
    control_level: float = 0.05,
    concept_quantile: float = 0.5,
    concept_level: float = 0.9,
) -> bool:
    """Rescale and shift the gate so that both ends are where they should be: at the
    ``control_quantile`` of control positions the opening is ``control_level`` (control
    stays shut) and at the ``concept_quantile`` of concept positions it is ``concept_level``
    (the concept opens it). The direction is kept; its scale and the bias are set.

    A step gate has no slope: it opens above the control quantile (at
    :func:`~.linear.separating_threshold`, so that no control row sits on its edge), and ``True``
    says that the concept quantile lies above it. When the fitted direction does not put those two
    quantiles in the right order (the concept's is below the control's), no rescaling can meet
    both: the control end is kept (as :func:`calibrate_gate_on_positions` does) and ``False``
    is returned.
    """
    if not 0.0 < control_level < concept_level < 1.0:
        raise ValueError("calibration levels must satisfy 0 < control_level < concept_level < 1")
    for name, rows in (("control", control_positions), ("concept", concept_positions)):
        if rows.ndim != 2 or rows.shape[0] == 0:
            raise InputSetError(f"two-sided gate calibration needs {name} positions: a non-empty (rows, C) matrix")
    with torch.no_grad():
        weight = gate.weight.double()
        low = torch.quantile(control_positions.double() @ weight, control_quantile)
        high = torch.quantile(concept_positions.double() @ weight, concept_quantile)
        if gate.activation == "step":  # no slope to set: open above the control quantile
            edge = separating_threshold(control_positions.double() @ weight, control_quantile)
            gate.bias.fill_(-edge)
            return bool(high > edge)
        target_low, target_high = _logit_of(gate, control_level), _logit_of(gate, concept_level)
        if not bool(high > low):
            gate.bias.copy_(torch.minimum(gate.bias, torch.tensor(target_low - float(low), dtype=torch.float32)))
            return False
        factor = (target_high - target_low) / float(high - low)
        gate.weight.mul_(factor)
        gate.bias.fill_(target_low - factor * float(low))
    return True
