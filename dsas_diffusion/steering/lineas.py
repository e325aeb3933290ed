"""LinEAS: diagonal affine maps trained end to end through the model with a per-unit 1-D
Wasserstein loss, optionally together with the DSAS gates (end-to-end DSAS)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import LinEASConfig
from .errors import InputSetError
from .hookpoints import pool
from .hooks import SteeringSession
from .layer import SteeringLayer
from .linear import sorted_quantiles

__all__ = ["LinEASConfig", "sliced_w2", "train_lineas"]


def sliced_w2(source_rows: torch.Tensor, target_sorted: torch.Tensor) -> torch.Tensor:
    """Mean over units of the squared 1-D Wasserstein-2 distance between the rows of
    ``source_rows`` (sorted here) and ``target_sorted`` (already sorted, same row count)."""
    return (source_rows.sort(dim=0).values - target_sorted).pow(2).mean()


class _BatchStream:
    """Endless shuffled stream of input batches."""

    def __init__(self, inputs: Sequence[Any], seed: int) -> None:
        self.inputs = list(inputs)
        self.generator = torch.Generator().manual_seed(seed)
        self.order: list[int] = []

    def next(self) -> Any:
        if not self.order:
            self.order = torch.randperm(len(self.inputs), generator=self.generator).tolist()
        return self.inputs[self.order.pop()]


def _check_training(
    layers: Sequence[SteeringLayer],
    source_inputs: Sequence[Any],
    control_inputs: Sequence[Any] | None,
    train_gates: bool,
    config: LinEASConfig,
) -> None:
    """Refuse what LinEAS cannot train: no steps, a bad rate, no source, gates without control
    inputs or initial gates, maps that are not affine."""
    if config.steps < 1 or not math.isfinite(config.lr) or config.lr <= 0:
        raise ValueError(f"LinEAS needs steps >= 1 and a positive finite lr, got {config}")
    if not source_inputs:
        raise InputSetError("LinEAS: the source set is empty")
    if train_gates and not control_inputs:
        raise InputSetError("end-to-end DSAS needs control inputs for its retention term")
    for layer in layers:
        if layer.map.kind != "affine":
            raise ValueError(f"LinEAS trains affine maps; layer {layer.name!r} is {layer.map.kind}")
        if train_gates and layer.gate is None:
            raise ValueError(f"end-to-end DSAS needs an initial gate on layer {layer.name!r}")


def train_lineas(
    model: nn.Module,
    layers: Sequence[SteeringLayer],
    forward: Callable[[Any], Any],
    source_inputs: Sequence[Any],
    target_pooled: dict[str, torch.Tensor],
    *,
    control_inputs: Sequence[Any] | None = None,
    train_gates: bool = False,
    config: LinEASConfig | None = None,
    mask_fn: Callable[[Any], torch.Tensor | None] = lambda batch: None,
    progress: bool = True,
) -> list[float]:
    """Train the affine maps of ``layers`` (and their gates if ``train_gates``) in place.

    The loss is ``mean_l W2²(pooled steered source at l, pooled target at l)`` plus, with
    ``train_gates``, ``control_weight * mean_l mean ||steered - unsteered||²`` over control
    batches. After each Adam step the sparse group lasso proximal operator is applied to
    ``(w - 1, b)`` of each layer. Returns the total loss of every step.
    """
    config = config or LinEASConfig()
    _check_training(layers, source_inputs, control_inputs, train_gates, config)
    # train where the activations are (the fitted layers live on the CPU), then move back
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    homes = [layer.map.bias.device for layer in layers]
    for layer in layers:
        layer.to(device)
    parameters = []
    for layer in layers:
        parameters += [layer.map.weight, layer.map.bias]
        if train_gates:
            layer.gate.enabled = True
            parameters += [layer.gate.weight, layer.gate.bias]
    frozen = {p: p.requires_grad for p in model.parameters()}
    source_stream = _BatchStream(source_inputs, config.seed)
    control_stream = _BatchStream(control_inputs or [None], config.seed + 1)
    target_cache: dict[tuple[str, int], torch.Tensor] = {}
    losses: list[float] = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in parameters:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(parameters, lr=config.lr)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)
        bar = tqdm(range(config.steps), desc="LinEAS" + (" + gates" if train_gates else ""), disable=not progress)
        for _ in bar:
            optimizer.zero_grad(set_to_none=True)
            loss = _wasserstein_term(
                model,
                layers,
                forward,
                source_stream,
                target_pooled,
                target_cache,
                train_gates,
                config.batch_size,
                mask_fn,
            )
            if train_gates and config.control_weight > 0:
                loss = loss + config.control_weight * _retention_term(model, layers, forward, control_stream.next())
            loss.backward()
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            _sparse_group_lasso_prox(layers, lr * config.l1, lr * config.group_l1)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
    finally:
        for layer, home in zip(layers, homes, strict=True):
            layer.to(home)
        for p in parameters:
            p.requires_grad_(False)
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    return losses


def _wasserstein_term(model, layers, forward, stream, target_pooled, target_cache, gated, batch_size, mask_fn):
    rows: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    layouts = {layer.name: layer.hook_point.layout for layer in layers}
    current_mask: list[torch.Tensor | None] = [None]

    def observe(name: str, steered: torch.Tensor, gates: torch.Tensor | None) -> None:
        rows[name].append(pool(steered, layouts[name], current_mask[0]))

    with SteeringSession(layers, model, strength=1.0, gated=gated, observer=observe):
        count = 0
        while count < batch_size:
            batch = stream.next()
            current_mask[0] = mask_fn(batch)
            before = len(rows[layers[0].name])
            forward(batch)
            count += sum(r.shape[0] for r in rows[layers[0].name][before:])
            if len(rows[layers[0].name]) == before:
                raise InputSetError(f"LinEAS: module {layers[0].name!r} was not called by the forward pass")
    total = 0.0
    for layer in layers:
        steered = torch.cat(rows[layer.name])
        key = (layer.name, steered.shape[0])
        if key not in target_cache:
            target_cache[key] = sorted_quantiles(target_pooled[layer.name].float(), steered.shape[0]).to(steered.device)
        total = total + sliced_w2(steered, target_cache[key])
    return total / len(layers)


def _retention_term(model, layers, forward, batch) -> torch.Tensor:
    captured: dict[str, list[torch.Tensor]] = {"plain": [], "steered": []}
    for key, strength in (("plain", 0.0), ("steered", 1.0)):

        def observe(name: str, steered: torch.Tensor, gates: torch.Tensor | None, key=key) -> None:
            captured[key].append(steered)

        context = torch.no_grad() if key == "plain" else torch.enable_grad()
        with context, SteeringSession(layers, model, strength=strength, gated=True, observer=observe):
            forward(batch)
    terms = [
        (s - p.detach()).float().pow(2).mean() for s, p in zip(captured["steered"], captured["plain"], strict=True)
    ]
    return torch.stack(terms).mean()


@torch.no_grad()
def _sparse_group_lasso_prox(layers: Sequence[SteeringLayer], l1: float, group: float) -> None:
    if l1 <= 0 and group <= 0:
        return
    for layer in layers:
        offset = torch.cat([layer.map.weight - 1.0, layer.map.bias])
        if l1 > 0:
            offset = offset.sign() * (offset.abs() - l1).clamp_min(0.0)
        if group > 0:
            norm = offset.norm()
            offset = offset * (1.0 - group / norm).clamp_min(0.0) if norm > 0 else offset
        width = layer.width
        layer.map.weight.copy_(offset[:width] + 1.0)
        layer.map.bias.copy_(offset[width:])
