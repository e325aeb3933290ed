"""Small linear-algebra estimators used by the maps and the gate (torch only, float64)."""

from __future__ import annotations

import torch

__all__ = [
    "THRESHOLD_MARGIN",
    "fit_logistic",
    "fit_pca",
    "separating_bounds",
    "separating_threshold",
    "sorted_quantiles",
    "stratified_folds",
]

#: above the largest calibration value, how far a threshold lies, in standard deviations of the values
THRESHOLD_MARGIN = 0.01


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, *, l2: float = 1.0, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """L2-regularised logistic regression, ``sum(log-loss) + l2/2 * ||w||^2`` (bias unpenalised).

    Features are standardised internally; the returned ``(weight, bias)`` act on the raw
    features: ``logit = features @ weight + bias``.
    """
    x = features.double()
    y = labels.double()
    mean = x.mean(0)
    std = x.std(0, unbiased=False).clamp_min(1e-12)
    z = (x - mean) / std
    weight = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = z @ weight + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="sum")
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    raw_weight = weight.detach() / std
    raw_bias = bias.detach() - (mean * raw_weight).sum()
    return raw_weight, raw_bias


def fit_pca(features: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(mean, components)`` with components ``(C, r)`` orthonormal columns."""
    x = features.double()
    mean = x.mean(0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:n_components].T.contiguous()


def sorted_quantiles(samples: torch.Tensor, count: int) -> torch.Tensor:
    """Per column, ``count`` quantiles at levels ``(i + 0.5) / count`` (Hazen plotting positions).

    With ``count`` equal to the number of samples this is exactly the sorted samples; with
    another count the sorted samples are interpolated linearly (clamped at the extremes).
    """
    ordered = samples.sort(dim=0).values
    size = ordered.shape[0]
    if size == count:
        return ordered
    positions = ((torch.arange(count, dtype=torch.float64) + 0.5) * size / count - 0.5).clamp(0, size - 1)
    lower = positions.floor().long()
    upper = (lower + 1).clamp_max(size - 1)
    fraction = (positions - lower).to(ordered.dtype).unsqueeze(1).to(ordered.device)
    return ordered[lower] * (1 - fraction) + ordered[upper] * fraction


def stratified_folds(labels: torch.Tensor, folds: int, seed: int) -> list[torch.Tensor]:
    """Split sample indices into ``folds`` test folds with the class ratio kept."""
    generator = torch.Generator().manual_seed(seed)
    assignment = torch.empty(labels.shape[0], dtype=torch.long)
    for value in labels.unique():
        members = (labels == value).nonzero().flatten()
        members = members[torch.randperm(members.numel(), generator=generator)]
        assignment[members] = torch.arange(members.numel()) % folds
    return [(assignment == fold).nonzero().flatten() for fold in range(folds)]


def separating_threshold(values: torch.Tensor, quantile: float, margin: float = THRESHOLD_MARGIN) -> float:
    """A threshold for ``value > threshold`` at the ``quantile`` of ``values`` that none of them lies on.

    The values at or below the ``quantile`` (linear interpolation, as :func:`torch.quantile`) stay
    at or below the threshold and those above it stay above, so the count on each side is the
    quantile's; but the threshold lies midway between the highest value at or below the quantile
    and the lowest one above it, and with nothing above (``quantile=1``) ``margin`` standard
    deviations of ``values`` above the largest. A calibration value then keeps its side when it
    is computed again with other rounding (another batch, thread count, CPU or dtype), unless two
    values are that close to each other.

    Examples:
        >>> separating_threshold(torch.tensor([0.0, 1.0, 2.0, 4.0]), 0.5)  # between 1 and 2
        1.5
        >>> round(separating_threshold(torch.tensor([0.0, 1.0, 2.0, 4.0]), 1.0, margin=0.1), 4)  # 4 + 0.1 * std
        4.1708
    """
    return float(_separating_columns(values.detach().double().reshape(-1, 1), quantile, margin)[0])


def separating_bounds(
    values: torch.Tensor, quantiles: tuple[float, float], margin: float = THRESHOLD_MARGIN
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of ``values`` ``(samples, units)``, bounds ``[low, high]`` at its ``quantiles``
    that lie on none of its values, as :func:`separating_threshold` places one: with ``(0, 1)``
    the minimum and the maximum, each widened by ``margin`` standard deviations, so that the
    extreme samples lie inside with room to spare.

    Examples:
        >>> low, high = separating_bounds(torch.tensor([[0.0], [1.0], [2.0]]), (0.0, 1.0), margin=0.1)
        >>> round(float(low), 2), round(float(high), 2)
        (-0.1, 2.1)
    """
    low_q, high_q = quantiles
    rows = values.detach().double()
    return -_separating_columns(-rows, 1.0 - low_q, margin), _separating_columns(rows, high_q, margin)


def _separating_columns(values: torch.Tensor, quantile: float, margin: float) -> torch.Tensor:
    """:func:`separating_threshold` of each column of ``values`` ``(samples, units)``."""
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must lie in (0, 1], got {quantile!r}")
    if not margin > 0.0:
        raise ValueError(f"margin must be positive, got {margin!r}")
    if values.shape[0] == 0:
        raise ValueError("a threshold needs at least one calibration value")
    ordered = values.sort(dim=0).values
    size = ordered.shape[0]
    level = torch.quantile(ordered, quantile, dim=0)
    count = (ordered <= level).sum(0)  # per column, the values at or below the quantile (at least one)
    highest = ordered.gather(0, (count - 1).unsqueeze(0))[0]
    following = ordered.gather(0, count.clamp_max(size - 1).unsqueeze(0))[0]
    spread = ordered.std(0) if size > 1 else torch.zeros_like(highest)
    spread = torch.where(spread > 0, spread, highest.abs().clamp_min(1.0))
    return torch.where(count < size, (highest + following) / 2, highest + margin * spread)
