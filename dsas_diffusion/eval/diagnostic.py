"""Where the gates open, measured against ground truth on the Shapes world.

Every object of a Shapes image can be located exactly: its colour's pixels. This module
renders prompts unsteered, keeps the activations of the hooked layers at every denoising
step (conditional rows of the guidance batch), and measures per layer and step how well a
steerer's gates separate the concept object's positions (its pixels in the unsteered image,
downsampled to the layer's grid) from every position of control images: ROC-AUC, and the
mean gate inside the concept mask, on the rest of the same image and on control images.
Because the activations are kept, many gate variants are scored on one set of renders.

``single_layer_removal`` measures the other half: how much of the concept each layer's map
removes when only that layer is steered.

Example (``benchmarks/gate_diagnostic.py`` runs it on the shipped concepts)::

    runs = {group: capture_runs(pipe, points, prompts[group], seeds=[0]) for group in ("concept", "control")}
    rows = gate_separation(steerer, runs["concept"], runs["control"], concept="banana")
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..steering import HookPoint, Steerer
from ..steering.hookpoints import position_rows, register_reader, resolve_module

OPEN = 0.05  # a gate at least this open counts as open

__all__ = [
    "CapturedRun",
    "capture_runs",
    "concept_fractions",
    "gate_separation",
    "mask_coverage",
    "roc_auc",
    "single_layer_removal",
    "summarise_separation",
]


@dataclass
class CapturedRun:
    """Unsteered renders of ``prompts`` x ``seeds`` and their hooked activations.

    ``activations[layer]`` is ``(images, steps, positions, C)`` float16 on the CPU (conditional
    rows only); ``grids[layer]`` the ``(h, w)`` layout of the positions.
    """

    prompts: list[str]
    seeds: list[int]
    images: list[Image.Image]
    activations: dict[str, torch.Tensor]
    grids: dict[str, tuple[int, int]]

    @property
    def image_prompts(self) -> list[str]:
        """The prompt of each image (seed-major, as rendered)."""
        return [prompt for _ in self.seeds for prompt in self.prompts]


def _grid(positions: int, image_size: tuple[int, int]) -> tuple[int, int]:
    height, width = image_size
    rows = round(math.sqrt(positions * height / width))
    if rows == 0 or positions % rows:
        raise ValueError(f"cannot lay {positions} positions out on a grid of aspect {height}:{width}")
    return rows, positions // rows


def capture_runs(
    pipe: Any,
    points: Sequence[HookPoint],
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] = (0,),
    num_inference_steps: int = 25,
    batch_size: int = 8,
    **call: Any,
) -> CapturedRun:
    """Render ``prompts`` with every seed (image ``i`` of a batch uses ``seed``, as the
    evaluation does) and keep the activations at ``points`` (keyed by :attr:`HookPoint.key`:
    a gate reading its module's input needs ``layer.gate_point``), conditional rows only."""
    denoiser = pipe.denoiser
    captured: dict[str, list[torch.Tensor]] = {point.key: [] for point in points}
    handles = []

    def make_hook(point: HookPoint):
        def hook(tensor: torch.Tensor) -> None:
            tensor = tensor.detach()
            rows = tensor.shape[0]
            guided = rows == 2 * current["images"]
            if guided:
                tensor = tensor[rows // 2 :]
            layout = "channels_first" if point.layout == "channels_first" or tensor.ndim == 4 else "channels_last"
            captured[point.key].append(position_rows(tensor, layout).to("cpu", torch.float16))

        return hook

    current = {"images": 0}
    images: list[Image.Image] = []
    sizes: dict[str, int] = {}
    for point in points:
        handles.extend(register_reader(resolve_module(denoiser, point.module), point, make_hook(point)))
    try:
        per_batch: dict[str, list[torch.Tensor]] = {point.key: [] for point in points}
        for seed in seeds:
            for start in range(0, len(prompts), batch_size):
                chunk = list(prompts[start : start + batch_size])
                current["images"] = len(chunk)
                for buffer in captured.values():
                    buffer.clear()
                generators = [torch.Generator().manual_seed(seed) for _ in chunk]
                with torch.no_grad():
                    out = pipe(chunk, generator=generators, num_inference_steps=num_inference_steps, **call)
                images += out.images
                for name, calls in captured.items():
                    stacked = torch.stack(calls[-num_inference_steps:], dim=1)  # (B, steps, positions, C)
                    per_batch[name].append(stacked)
                    sizes[name] = stacked.shape[2]
    finally:
        for handle in handles:
            handle.remove()
    size = (images[0].size[1], images[0].size[0])
    return CapturedRun(
        list(prompts),
        list(seeds),
        images,
        {name: torch.cat(chunks) for name, chunks in per_batch.items()},
        {name: _grid(count, size) for name, count in sizes.items()},
    )


def concept_fractions(run: CapturedRun, concept: str) -> dict[str, torch.Tensor]:
    """Per layer, ``(images, positions)``: the fraction of each position's area covered by
    the concept object in the unsteered image (0 where the prompt has no concept)."""
    from ..shapes import concept_mask

    masks = torch.stack(
        [
            torch.from_numpy(concept_mask(image, prompt, concept).astype(np.float32))
            for image, prompt in zip(run.images, run.image_prompts, strict=True)
        ]
    )
    return {name: mask_coverage(masks, grid) for name, grid in run.grids.items()}


def mask_coverage(masks: torch.Tensor | np.ndarray, grid: tuple[int, int]) -> torch.Tensor:
    """``(images, rows * columns)``: the share of each position's area of a ``grid`` of
    positions that lies inside each image's mask (``masks``: ``(images, height, width)``).

    Examples:
        >>> mask_coverage(torch.tensor([[[1, 1, 0, 0]] * 4]), (2, 2))
        tensor([[1., 0., 1., 0.]])
    """
    masks = torch.as_tensor(masks).float()
    return F.adaptive_avg_pool2d(masks.unsqueeze(1), tuple(grid)).flatten(1)


def roc_auc(positive: torch.Tensor, negative: torch.Tensor) -> float:
    """Probability that a random positive scores above a random negative (ties count half).

    Examples:
        >>> roc_auc(torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.85]))
        0.75
    """
    if positive.numel() == 0 or negative.numel() == 0:
        return float("nan")
    values = torch.cat([positive.flatten(), negative.flatten()]).double()
    order = values.argsort()
    ranks = torch.empty_like(values)
    ranks[order] = torch.arange(1, values.numel() + 1, dtype=torch.float64)
    # average ranks over ties
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    sums = torch.zeros_like(unique).index_add_(0, inverse, ranks)
    ranks = (sums / counts)[inverse]
    count_pos, count_neg = positive.numel(), negative.numel()
    auc = (ranks[:count_pos].sum() - count_pos * (count_pos + 1) / 2) / (count_pos * count_neg)
    return round(float(auc), 4)


def gate_separation(
    steerer: Steerer,
    concept_run: CapturedRun,
    control_run: CapturedRun,
    concept: str,
    *,
    inside: float = 0.5,
    steps: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """One row per layer and denoising step (``step`` ``"all"`` pools the steps): ROC-AUC of
    the gate's opening between concept positions (at least ``inside`` of their area covered
    by the concept object) and every control position (``auc``), and between concept
    positions and the rest of the same images, where the object is not (``auc_spatial``);
    the mean applied gate inside the concept mask, on the rest of the concept images and on
    control images; and the fraction of control positions whose gate is at least 0.05."""
    fractions = concept_fractions(concept_run, concept)
    rows = []
    for layer in steerer.layers:
        name, gate, reading = layer.name, layer.gate, layer.gate_point.key
        if gate is None or reading not in concept_run.activations:
            continue
        concept_acts = concept_run.activations[reading].float()  # (images, steps, positions, C)
        control_acts = control_run.activations[reading].float()
        with torch.no_grad():
            opening = {"concept": gate.opening(concept_acts, -1), "control": gate.opening(control_acts, -1)}
            applied = {"concept": gate(concept_acts, -1).squeeze(-1), "control": gate(control_acts, -1).squeeze(-1)}
        opening = {k: v.squeeze(-1) for k, v in opening.items()}
        mask = fractions[reading].unsqueeze(1).expand(-1, concept_acts.shape[1], -1)  # (images, steps, positions)
        chosen = range(concept_acts.shape[1]) if steps is None else steps
        for step in [*chosen, "all"]:
            pick = slice(None) if step == "all" else slice(step, step + 1)
            in_mask, away = mask[:, pick] >= inside, mask[:, pick] == 0
            concept_open, control_open = opening["concept"][:, pick], opening["control"][:, pick]
            rows.append(
                {
                    "layer": name,
                    "step": step,
                    "auc": roc_auc(concept_open[in_mask], control_open),
                    "auc_spatial": roc_auc(concept_open[in_mask], concept_open[away]),
                    "gate_in_mask": _mean(applied["concept"][:, pick][in_mask]),
                    "gate_rest_of_image": _mean(applied["concept"][:, pick][away]),
                    "gate_control": _mean(applied["control"][:, pick]),
                    "control_open": _mean((applied["control"][:, pick] >= OPEN).float()),
                    "concept_positions": int(in_mask.sum()),
                }
            )
    return rows


def _mean(values: torch.Tensor) -> float:
    return round(float(values.float().mean()), 4) if values.numel() else float("nan")


def single_layer_removal(
    pipe: Any,
    steerer: Steerer,
    concept: str,
    prompts: Sequence[str],
    *,
    strength: float,
    seeds: Sequence[int] = (0,),
    judge: Any = None,
    **call: Any,
) -> list[dict[str, Any]]:
    """The concept rate (Shapes detector) with no layer, every layer, and each layer of
    ``steerer`` alone steered at ``strength`` (``call`` holds the other pipeline arguments,
    e.g. ``steering_gate`` and ``steering_cfg``). Other steerers on ``pipe`` are set aside
    meanwhile."""
    from ..shapes import ShapeJudge, concepts_drawn

    judge = judge or ShapeJudge()
    names = [layer.name for layer in steerer.layers if layer.gate is None or layer.gate.enabled]
    loaded = pipe.steerers
    pipe.unload_steering()
    rows = []
    try:
        for label, layers in [("none", []), ("all", names), *((name, [name]) for name in names)]:
            if layers:
                pipe.load_steering(Steerer([steerer.layer(n) for n in layers], config=steerer.config), name="probe")
            images = []
            for seed in seeds:
                generators = [torch.Generator().manual_seed(seed) for _ in prompts]
                kwargs = dict(call) if layers else {k: v for k, v in call.items() if not k.startswith("steering_")}
                with torch.no_grad():
                    images += (
                        pipe(list(prompts), generator=generators, **kwargs).images
                        if not layers
                        else pipe(list(prompts), generator=generators, steering_strength=strength, **kwargs).images
                    )
            pipe.unload_steering()
            drawn = concepts_drawn(judge, images, [p for _ in seeds for p in prompts], concept)
            rows.append({"steered": label, "concept_rate": round(float(np.mean(drawn)), 4)})
    finally:
        pipe.unload_steering()
        for name, kept in loaded.items():
            pipe.load_steering(kept, name=name)
    return rows


def summarise_separation(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> list[dict[str, Any]]:
    """The ``"all"``-steps rows averaged over layers, one line per combination of ``keys``
    (e.g. ``("concept", "preset", "variant")``), with the lowest layer AUC beside the mean."""
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if row.get("step") == "all":
            groups.setdefault(tuple(row[k] for k in keys), []).append(row)
    lines = []
    for key, members in groups.items():
        line = dict(zip(keys, key, strict=True))
        line["layers"] = len(members)
        for metric in ("auc", "auc_spatial", "gate_in_mask", "gate_rest_of_image", "gate_control", "control_open"):
            line[metric] = round(float(np.nanmean([m[metric] for m in members])), 3)
        line["auc_min"] = round(float(np.nanmin([m["auc"] for m in members])), 3)
        lines.append(line)
    return lines
