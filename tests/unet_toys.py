"""A small random diffusers UNet fed with latents whose "concept" is a bright square on one
channel: the core's per-position steering checked on a real architecture (random weights,
built from a config)."""

from __future__ import annotations

import contextlib

import torch

from dsas_diffusion.steering import Steerer

HOOK = "down_blocks.0.resnets.0"
HOOKS = [HOOK, "down_blocks.1.resnets.0", "mid_block.resnets.0"]


def build_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16,
        attention_head_dim=4,
        norm_num_groups=8,
    ).eval()


def make_latents(count: int, seed: int, concept: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise latents; with ``concept`` a bright 6x6 square on channel 0 at a random place."""
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(count, 4, 16, 16, generator=generator) * 0.5
    masks = torch.zeros(count, 16, 16, dtype=torch.bool)
    if concept:
        for i in range(count):
            top, left = torch.randint(0, 10, (2,), generator=generator).tolist()
            masks[i, top : top + 6, left : left + 6] = True
        latents[:, 0] += 3.0 * masks
    return latents, masks


def batches(seed: int, concept: bool, count: int = 8, size: int = 4) -> list[dict]:
    text = torch.zeros(size, 3, 16)
    return [
        {"sample": make_latents(size, seed * 100 + i, concept)[0], "timestep": 10, "encoder_hidden_states": text}
        for i in range(count)
    ]


def block_output(unet, steerer: Steerer | None, latents: torch.Tensor, gate: str):
    """The first hooked block's output (after steering, if a steerer is given) and, when
    gated, its recorded gate map."""
    outputs = []
    text = torch.zeros(latents.shape[0], 3, 16)
    module = unet.get_submodule(HOOK)
    gated = gate != "none"
    steering = steerer.apply(unet, gate=gate, record_gates=gated) if steerer is not None else contextlib.nullcontext()
    with torch.no_grad(), steering as session:
        handle = module.register_forward_hook(lambda m, i, o: outputs.append(o))  # after any steering hook
        try:
            unet(latents, 10, encoder_hidden_states=text)
        finally:
            handle.remove()
    gates = session.gate_maps[HOOK][0].float() if steerer is not None and gated else None
    return outputs[0], gates
