"""``shapes-mmdit``: a Stable Diffusion 3 pipeline (MMDiT, two CLIP text encoders, no T5)
trained on Shapes scenes with the same VAE as ``shapes-sd``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..models import make_mmdit_transformer, make_text_encoder
from .common import LatentBank, Optimisation, shapes_tokenizer, tidy_saved_pipeline, training_device
from .vae import load_vae

__all__ = ["MMDIT_STAGES", "train_mmdit"]

MMDIT_T5_LENGTHS = (1, 4, 16, 64, 256)
MMDIT_T5_WEIGHTS = (0.4, 0.25, 0.15, 0.15, 0.05)
# As for shapes-sd: cosine cycles, each from the previous one's averaged weights on fresh scenes.
MMDIT_STAGES: tuple[dict, ...] = (
    {"steps": 3800, "lr": 5e-4, "bank_seed": 4},
    {"steps": 4000, "lr": 2.5e-4, "bank_seed": 7},
)


def _trained_models(init_from: Path | None, device: torch.device) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The transformer and the two text encoders to train, in training mode on ``device``: new
    (after the VAE and the tokenizer, from the seeded generator) or those saved at ``init_from``."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    if init_from is None:
        half = 32
        text_encoder = make_text_encoder(half, with_projection=True)
        text_encoder_2 = make_text_encoder(half, with_projection=True)
        transformer = make_mmdit_transformer(text_hidden=2 * half, pooled_dim=2 * half)
    else:
        init_from = Path(init_from)
        text_encoder, text_encoder_2 = (
            CLIPTextModelWithProjection.from_pretrained(init_from / sub, dtype=torch.float32)
            for sub in ("text_encoder", "text_encoder_2")
        )
        transformer = SD3Transformer2DModel.from_pretrained(init_from / "transformer", dtype=torch.float32)
    return tuple(module.to(device).train() for module in (transformer, text_encoder, text_encoder_2))


def train_mmdit(
    work_dir: Path,
    out: Path,
    steps: int = 3800,
    batch_size: int = 64,
    lr: float = 5e-4,
    seed: int = 0,
    bank_size: int = 65536,
    bank_seed: int | None = None,
    init_from: Path | None = None,
    name: str = "shapes-mmdit",
) -> Path:
    """One cosine cycle of ``shapes-mmdit`` training, from scratch or from the transformer and
    text encoders of the pipeline saved at ``init_from``; writes the averaged pipeline to ``out/name``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    device = training_device()
    vae = load_vae(work_dir, device, seed, init_from)
    tokenizer = shapes_tokenizer(work_dir)
    transformer, text_encoder, text_encoder_2 = _trained_models(init_from, device)

    def assemble(transformer, text_encoder, text_encoder_2) -> StableDiffusion3Pipeline:
        """SD3 with its two CLIP text encoders and no T5 (text_encoder_3 = None)."""
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    pipe = assemble(transformer, text_encoder, text_encoder_2)  # its encode_prompt builds the conditioning
    optimisation = Optimisation([transformer, text_encoder, text_encoder_2], lr, steps)
    bank = LatentBank(vae, bank_size, seed + 4 if bank_seed is None else bank_seed, device)
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    lengths = torch.tensor(MMDIT_T5_WEIGHTS)
    bar = tqdm(range(steps), desc=name)
    for _ in bar:
        latents, captions = bank.sample(batch_size)
        latents = (latents - shift) * scale
        captions = ["" if torch.rand(()) < 0.1 else c for c in captions]
        t5_length = MMDIT_T5_LENGTHS[int(torch.multinomial(lengths, 1))]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=captions,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=t5_length,
        )
        sigmas = torch.sigmoid(torch.randn(latents.shape[0], device=device))  # logit-normal timesteps
        noise = torch.randn_like(latents)
        noisy = (1 - sigmas.view(-1, 1, 1, 1)) * latents + sigmas.view(-1, 1, 1, 1) * noise
        prediction = transformer(
            noisy, encoder_hidden_states=prompt_embeds, pooled_projections=pooled, timestep=sigmas * 1000
        ).sample
        loss = (prediction - (noise - latents)).pow(2).mean()
        optimisation.step(loss)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    final = assemble(*optimisation.averaged())
    target = out / name
    final.to(torch.float16).save_pretrained(target)
    tidy_saved_pipeline(target)
    print(f"{name} -> {target}")
    return target
