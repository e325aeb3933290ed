"""Small linear-algebra estimators used by the maps and the gate (torch only, float64)."""

from __future__ import annotations

import torch

__all__ = ["fit_logistic", "fit_pca", "sorted_quantiles", "stratified_folds"]


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
