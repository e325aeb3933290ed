"""Steering maps T(t): how to steer. Additive (CAA, ITI) and diagonal affine (Linear-AcT, LinEAS).

Every map acts on one unit (channel) at a time and exposes ``delta(x) = T(x) - x`` so that
the gate can scale it: ``t' = t + strength * gate(t) * delta(t)``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..names import MAP_NAMES
from .errors import InputSetError
from .linear import fit_logistic, separating_bounds, sorted_quantiles

__all__ = ["MAP_NAMES", "SteeringMap", "fit_caa", "fit_iti", "fit_linear_act", "identity_affine_map"]


class SteeringMap(nn.Module):
    """A per-unit steering map.

    * ``kind="additive"``: ``T(t) = t + bias``;
    * ``kind="affine"``: ``T(t) = weight * t + bias``, applied only where ``t`` lies in
      ``[support_lo, support_hi]`` when a support is given (identity outside).

    All tensors are float32 vectors of the layer's width.
    """

    def __init__(
        self,
        bias: torch.Tensor,
        weight: torch.Tensor | None = None,
        support: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        bias = torch.as_tensor(bias, dtype=torch.float32).flatten()
        self.kind = "additive" if weight is None else "affine"
        self.bias = nn.Parameter(bias.clone(), requires_grad=False)
        self.weight = None
        if weight is not None:
            weight = torch.as_tensor(weight, dtype=torch.float32).flatten()
            if weight.shape != bias.shape:
                raise ValueError(f"weight {tuple(weight.shape)} and bias {tuple(bias.shape)} differ in width")
            self.weight = nn.Parameter(weight.clone(), requires_grad=False)
        self.support_lo: torch.Tensor | None
        self.support_hi: torch.Tensor | None
        if support is None:
            self.register_buffer("support_lo", None)
            self.register_buffer("support_hi", None)
        else:
            if self.kind != "affine":
                raise ValueError("a source support only applies to affine maps")
            lo, hi = (torch.as_tensor(s, dtype=torch.float32).flatten().clone() for s in support)
            self.register_buffer("support_lo", lo)
            self.register_buffer("support_hi", hi)

    @property
    def width(self) -> int:
        return self.bias.numel()

    @property
    def has_support(self) -> bool:
        return self.support_lo is not None

    def delta(self, x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """``T(x) - x`` for ``x`` in float32; ``shape`` broadcasts a ``(C,)`` vector over ``x``."""
        bias = self.bias.view(shape)
        if self.weight is None:
            return bias
        delta = torch.addcmul(bias, self.weight.view(shape) - 1.0, x)  # (w - 1) * x + b in one kernel
        if self.support_lo is not None:
            # inside the support iff clamping changes nothing (NaN is outside): two kernels, not three
            inside = torch.clamp(x, self.support_lo.view(shape), self.support_hi.view(shape)) == x
            delta = torch.where(inside, delta, 0.0)
        return delta

    def extra_repr(self) -> str:
        return f"kind={self.kind}, width={self.width}, support={self.has_support}"


def _check_pair(source: torch.Tensor, target: torch.Tensor, what: str) -> None:
    if source.ndim != 2 or target.ndim != 2:
        raise InputSetError(
            f"{what}: expected (samples, channels) matrices, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    if source.shape[0] == 0 or target.shape[0] == 0:
        raise InputSetError(f"{what}: the source and target sets must both be non-empty")
    if source.shape[1] != target.shape[1]:
        raise InputSetError(f"{what}: source has {source.shape[1]} channels, target {target.shape[1]}")


def fit_caa(source: torch.Tensor, target: torch.Tensor) -> SteeringMap:
    """Mean shift (CAA): ``T(t) = t + mean(target) - mean(source)``."""
    _check_pair(source, target, "CAA")
    return SteeringMap(target.double().mean(0) - source.double().mean(0))


def fit_iti(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    alpha: float | str = "auto",
    probe: str = "logistic",
    l2: float = 1.0,
) -> SteeringMap:
    """ITI: ``T(t) = t + alpha * sigma * theta``.

    ``theta`` is the unit normal of a logistic probe separating source (0) from target (1)
    (``probe="logistic"``) or the normalised mean difference (``probe="mean_diff"``);
    ``sigma`` is the standard deviation of the projections of source and target on
    ``theta``. ``alpha="auto"`` moves the source mean's projection onto the target's:
    ``alpha = (mean_T - mean_S) . theta / sigma``.
    """
    _check_pair(source, target, "ITI")
    s, t = source.double(), target.double()
    if probe == "logistic":
        labels = torch.cat([torch.zeros(len(s)), torch.ones(len(t))])
        theta, _ = fit_logistic(torch.cat([s, t]), labels, l2=l2)
    elif probe == "mean_diff":
        theta = t.mean(0) - s.mean(0)
    else:
        raise ValueError(f"probe must be 'logistic' or 'mean_diff', got {probe!r}")
    norm = theta.norm()
    if not bool(norm > 0):
        raise InputSetError("ITI: source and target activations are identical; nothing separates them")
    theta = theta / norm
    projections = torch.cat([s, t]) @ theta
    sigma = projections.std().clamp_min(1e-12)
    if alpha == "auto":
        alpha_value = float(((t.mean(0) - s.mean(0)) @ theta) / sigma)
    elif isinstance(alpha, (int, float)) and math.isfinite(alpha):
        alpha_value = float(alpha)
    else:
        raise ValueError(f"alpha must be 'auto' or a finite number, got {alpha!r}")
    return SteeringMap(alpha_value * sigma * theta)


def fit_linear_act(
    source: torch.Tensor,
    target: torch.Tensor,
    *,
    support_quantiles: tuple[float, float] | None = (0.0, 1.0),
) -> SteeringMap:
    """Linear-AcT: per unit, least squares between sorted source and sorted target samples.

    With equal counts the sorted samples are paired directly (1-D optimal transport); with
    unequal counts both sides are resampled at the same ``min(n_S, n_T)`` quantile levels.
    The map is applied only inside the source support ``[q_lo, q_hi]`` quantiles of each
    unit (``(0, 1)``: min and max); ``support_quantiles=None`` applies it everywhere. No source
    sample lies on an edge of the support, where rounding would decide whether it is steered: the
    edges lie midway to the next sample outside, or, beyond the extremes, 0.01 standard
    deviations of the unit's source samples further out (:func:`~.linear.separating_bounds`).
    """
    _check_pair(source, target, "Linear-AcT")
    count = min(source.shape[0], target.shape[0])
    xs = sorted_quantiles(source.double(), count)
    yt = sorted_quantiles(target.double(), count)
    x_mean, y_mean = xs.mean(0), yt.mean(0)
    x_centered = xs - x_mean
    variance = x_centered.pow(2).sum(0)
    covariance = (x_centered * (yt - y_mean)).sum(0)
    degenerate = variance <= 1e-12 * (1 + x_mean.abs())
    weight = torch.where(degenerate, torch.ones_like(variance), covariance / variance.clamp_min(1e-300))
    bias = y_mean - weight * x_mean
    support = None
    if support_quantiles is not None:
        lo_q, hi_q = support_quantiles
        if not 0.0 <= lo_q < hi_q <= 1.0:
            raise ValueError(f"support_quantiles must satisfy 0 <= lo < hi <= 1, got {support_quantiles}")
        support = separating_bounds(source, (lo_q, hi_q))
    return SteeringMap(bias, weight=weight, support=support)


def identity_affine_map(width: int) -> SteeringMap:
    """An affine map that does nothing (``weight = 1, bias = 0``): LinEAS's starting point."""
    return SteeringMap(torch.zeros(width), weight=torch.ones(width))
