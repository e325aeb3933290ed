"""The Shapes VAE: 64x64 images <-> 4x16x16 latents, shared by ``shapes-sd`` and ``shapes-mmdit``."""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..dataset import SceneStream
from ..models import make_vae
from .common import cosine_lr, training_device

__all__ = ["load_vae", "train_vae"]


def _edges(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def train_vae(work_dir: Path, steps: int = 4000, batch_size: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    device = training_device()
    vae = make_vae()
    with torch.no_grad():
        # Start with a narrow posterior (std e^-4): from the default (std 1) the tiny KL weight lets
        # the reconstruction loss shrink it only slowly, and decoding wide samples teaches blur.
        channels = vae.config.latent_channels
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(-8.0)
    vae = vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    scheduler = cosine_lr(optimizer, steps)
    stream = SceneStream(seed=seed + 1)
    bar = tqdm(range(steps), desc="vae")
    for _ in bar:
        images, _ = stream.next_batch(batch_size)
        images = images.to(device)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        # L1 + L2 on pixels, plus L1 on pixel differences: sharp edges keep star points and corners
        edge_loss = sum((a - b).abs().mean() for a, b in zip(_edges(recon), _edges(images), strict=True))
        loss = (recon - images).abs().mean() + (recon - images).pow(2).mean() + edge_loss + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval()
    with torch.no_grad():
        images, _ = SceneStream(seed=seed + 2).next_batch(512)
        latents = torch.cat([vae.encode(chunk.to(device)).latent_dist.mean for chunk in images.split(128)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()), shift_factor=float(latents.mean()))
    out = work_dir / "vae"
    vae.save_pretrained(out)
    print(f"vae: scaling_factor={vae.config.scaling_factor:.4f} shift_factor={vae.config.shift_factor:.4f} -> {out}")
    return out


def load_vae(work_dir: Path, device: torch.device, seed: int, init_from: Path | None = None):
    """The work folder's VAE (trained first if missing), or, for a stage that continues the
    pipeline saved at ``init_from``, that pipeline's own VAE: a later stage then depends only
    on the folder it starts from."""
    from diffusers import AutoencoderKL

    if init_from is not None:
        path = Path(init_from) / "vae"
    else:
        path = work_dir / "vae"
        if not (path / "config.json").is_file():
            train_vae(work_dir, seed=seed)
    return AutoencoderKL.from_pretrained(path, dtype=torch.float32).to(device).eval().requires_grad_(False)
