"""``shapes-sd``: a Stable Diffusion pipeline (UNet, CLIP text encoder) trained on Shapes scenes."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..models import SCHEDULE, TOKENIZER_MAX_LENGTH, make_sd_unet, make_text_encoder, sd_scheduler
from .common import LatentBank, Optimisation, shapes_tokenizer, tidy_saved_pipeline, training_device
from .vae import load_vae

__all__ = ["SD_STAGES", "train_sd"]

# Cosine cycles, each from the previous one's averaged weights, on fresh scenes (a new bank
# seed); the shipped checkpoint is the last (train_stages reuses earlier cycles already trained).
SD_STAGES: tuple[dict, ...] = (
    {"steps": 4000, "lr": 1e-3, "bank_seed": 3},
    {"steps": 6000, "lr": 5e-4, "bank_seed": 6},
    {"steps": 2500, "lr": 2.5e-4, "bank_seed": 9},
)


def train_sd(
    work_dir: Path,
    out: Path,
    steps: int = 4000,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    bank_size: int = 65536,
    snr_gamma: float = 5.0,
    bank_seed: int | None = None,
    init_from: Path | None = None,
    name: str = "shapes-sd",
) -> Path:
    """One cosine cycle of ``shapes-sd`` training, from scratch or from the UNet and text
    encoder of the pipeline saved at ``init_from``; writes the averaged pipeline to ``out/name``."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    device = training_device()
    vae = load_vae(work_dir, device, seed, init_from)
    tokenizer = shapes_tokenizer(work_dir)
    if init_from is None:
        text_encoder = make_text_encoder(32)
        unet = make_sd_unet(cross_attention_dim=text_encoder.config.hidden_size)
    else:
        text_encoder = CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet", dtype=torch.float32)
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    optimisation = Optimisation([unet, text_encoder], lr, steps)
    bank = LatentBank(vae, bank_size, seed + 3 if bank_seed is None else bank_seed, device)
    alphas = noise_scheduler.alphas_cumprod.to(device)
    bar = tqdm(range(steps), desc=name)
    for _ in bar:
        latents, captions = bank.sample(batch_size)
        latents = latents * vae.config.scaling_factor
        captions = ["" if torch.rand(()) < 0.1 else c for c in captions]  # prompt dropout for CFG
        ids = tokenizer(
            captions, padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        hidden = text_encoder(ids)[0]
        noise = torch.randn_like(latents) + 0.1 * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
        t = torch.randint(0, SCHEDULE["num_train_timesteps"], (latents.shape[0],), device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise
        prediction = unet(noisy, t, encoder_hidden_states=hidden).sample
        # Min-SNR-gamma weighting (Hang et al., 2023): nearly clean timesteps, where the
        # epsilon loss is large but says little about shape, are weighted down
        snr = a / (1 - a)
        weight = snr.clamp(max=snr_gamma) / snr
        loss = (weight * (prediction - noise).pow(2)).mean()
        optimisation.step(loss)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    averaged_unet, averaged_text_encoder = optimisation.averaged()
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=averaged_text_encoder,
        tokenizer=tokenizer,
        unet=averaged_unet,
        scheduler=sd_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    target = out / name
    pipeline.to(torch.float16).save_pretrained(target)
    tidy_saved_pipeline(target)
    print(f"{name} -> {target}")
    return target
