"""The gate diagnostic's measures: ROC-AUC by ranks, and the separation of concept positions
located by the Shapes detector, on rendered scenes with activations built to know the answer."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from dsas_diffusion.eval.diagnostic import CapturedRun, gate_separation, roc_auc
from dsas_diffusion.shapes.data import parse_caption, render_scene
from dsas_diffusion.steering import HookPoint, Steerer
from dsas_diffusion.steering.gate import LinearGate
from dsas_diffusion.steering.layer import SteeringLayer
from dsas_diffusion.steering.maps import SteeringMap


def test_roc_auc_is_the_fraction_of_correctly_ordered_pairs_ties_counting_half():
    generator = torch.Generator().manual_seed(0)
    positive = torch.randint(0, 6, (40,), generator=generator).float()
    negative = torch.randint(0, 5, (30,), generator=generator).float()
    pairs = [1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(positive, negative)]
    assert roc_auc(positive, negative) == pytest.approx(sum(pairs) / len(pairs), abs=1e-4)
    assert roc_auc(positive, positive) == pytest.approx(0.5)
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0


GRID = 8
CONCEPT = ["a yellow banana on a gray background", "a red banana and a blue square on a black background"]
CONTROL = ["a green star on a white background", "a blue circle on a gray background"]


def _run(prompts: list[str], concept: str) -> CapturedRun:
    """Rendered scenes, and activations whose channel 0 is the concept object's area at each
    position of an 8x8 grid (the rest noise): the answer a perfect gate would give."""
    generator = torch.Generator().manual_seed(1)
    images, rows = [], []
    for prompt in prompts:
        scene = render_scene(parse_caption(prompt))
        images.append(scene.image)
        objects = [m for o, m in zip(scene.spec.objects, scene.masks, strict=True) if concept in (o.colour, o.shape)]
        mask = torch.zeros(scene.masks[0].shape)
        for m in objects:
            mask = torch.maximum(mask, torch.from_numpy(m).float())
        area = F.adaptive_avg_pool2d(mask[None, None], GRID).flatten()
        acts = torch.randn(3, GRID * GRID, 4, generator=generator) * 0.1  # 3 steps
        acts[..., 0] = area
        rows.append(acts)
    activations = {"layer": torch.stack(rows).half()}
    return CapturedRun(list(prompts), [0], images, activations, {"layer": (GRID, GRID)})


def _steerer(weight: list[float]) -> Steerer:
    layer = SteeringLayer(
        HookPoint("layer", layout="channels_last"),
        SteeringMap(torch.zeros(4)),
        LinearGate(torch.tensor(weight), -4.0),
    )
    return Steerer([layer])


def test_a_gate_reading_the_concept_separates_it_everywhere_and_a_blind_one_does_not():
    concept_run, control_run = _run(CONCEPT, "banana"), _run(CONTROL, "banana")
    rows = gate_separation(_steerer([10.0, 0.0, 0.0, 0.0]), concept_run, control_run, "banana")
    assert [r["step"] for r in rows] == [0, 1, 2, "all"]
    pooled = rows[-1]
    assert pooled["auc"] == 1.0 and pooled["auc_spatial"] == 1.0
    assert pooled["gate_in_mask"] > 0.5 > 0.05 > pooled["gate_rest_of_image"]
    assert pooled["gate_control"] < 0.05 and pooled["control_open"] == 0.0
    assert pooled["concept_positions"] > 0
    blind = gate_separation(_steerer([0.0, 10.0, 0.0, 0.0]), concept_run, control_run, "banana")[-1]
    assert 0.3 < blind["auc"] < 0.7 and 0.3 < blind["auc_spatial"] < 0.7
