"""Train the Shapes models from a seed: ``python -m dsas_diffusion.shapes.train {vae,clip,sd,mmdit,all}``.

Each target writes its checkpoint with the library's own ``save_pretrained`` layout under
``--out`` (default: the package's ``weights/`` folder, where the shipped models live).
Intermediate full-precision models go to ``--work-dir``. A GPU is used when present.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .dataset import SceneStream
from .models import (
    CLIP_MODEL_CONFIG,
    TOKENIZER_MAX_LENGTH,
    make_mmdit_transformer,
    make_sd_unet,
    make_text_encoder,
    make_vae,
)

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
DEFAULT_WORK_DIR = Path("build") / "shapes"
SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _cosine_lr(optimizer, steps: int, warmup: int = 50):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, steps - warmup))))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class EMA:
    """Exponential moving average of parameters with warm-up: decay = min(max_decay, (1+n)/(10+n))."""

    def __init__(self, module: torch.nn.Module, max_decay: float = 0.999) -> None:
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)
        self.max_decay = max_decay
        self.updates = 0

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.max_decay, (1 + self.updates) / (10 + self.updates))
        for shadow, live in zip(self.shadow.parameters(), module.parameters(), strict=True):
            shadow.lerp_(live.detach(), 1 - decay)


# -- VAE ------------------------------------------------------------------------------------
def _edges(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return images[..., 1:, :] - images[..., :-1, :], images[..., :, 1:] - images[..., :, :-1]


def train_vae(work_dir: Path, steps: int = 4000, batch_size: int = 16, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    device = _device()
    vae = make_vae()
    with torch.no_grad():
        # Start with a narrow posterior (std e^-4): from the default (std 1) the tiny KL weight lets
        # the reconstruction loss shrink it only slowly, and decoding wide samples teaches blur.
        channels = vae.config.latent_channels
        vae.quant_conv.weight[channels:].zero_()
        vae.quant_conv.bias[channels:].fill_(-8.0)
    vae = vae.to(device).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    scheduler = _cosine_lr(optimizer, steps)
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


def _load_vae(work_dir: Path, device: torch.device, seed: int, init_from: Path | None = None):
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


def _tokenizer(work_dir: Path):
    from .tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(work_dir / "tokenizer", model_max_length=TOKENIZER_MAX_LENGTH)


class LatentBank:
    """Scenes rendered and encoded once, then drawn at random for denoiser training.

    Encoding a batch costs about a fifth of a denoiser step on the CPU; a bank of 64k scenes
    (posterior means and standard deviations: 8 KB per scene at float32, 512 MB for 64k) is read four times or so
    by a 4000-step run and saves most of that.
    """

    def __init__(self, vae, count: int, seed: int, device: torch.device, chunk: int = 256) -> None:
        stream = SceneStream(seed=seed)
        means, stds, self.captions = [], [], []
        with torch.no_grad():
            for start in tqdm(range(0, count, chunk), desc="encoding scenes"):
                images, captions = stream.next_batch(min(chunk, count - start))
                posterior = vae.encode(images.to(device)).latent_dist
                means.append(posterior.mean)
                stds.append(posterior.std)
                self.captions += captions
        self.means, self.stds = torch.cat(means), torch.cat(stds)
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return len(self.captions)

    def sample(self, size: int) -> tuple[torch.Tensor, list[str]]:
        """Latents drawn from their posteriors, and their captions."""
        index = torch.randint(0, len(self), (size,), generator=self.generator)
        means, stds = self.means[index], self.stds[index]
        noise = torch.randn(means.shape, generator=self.generator).to(means.device)
        return means + stds * noise, [self.captions[i] for i in index.tolist()]


class _Optimisation:
    """AdamW with warm-up + cosine decay, gradient clipping and an EMA of every trained module."""

    def __init__(self, modules: list[torch.nn.Module], lr: float, steps: int) -> None:
        self.modules = modules
        self.params = [p for module in modules for p in module.parameters()]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=0.0)
        self.scheduler = _cosine_lr(self.optimizer, steps)
        self.emas = [EMA(module) for module in modules]

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        for ema, module in zip(self.emas, self.modules, strict=True):
            ema.update(module)

    def averaged(self) -> list[torch.nn.Module]:
        return [ema.shadow for ema in self.emas]


# -- shapes-sd -------------------------------------------------------------------------------
# Cosine cycles, each from the previous one's averaged weights, on fresh scenes (a new bank
# seed); the shipped checkpoint is the last (train_stages reuses earlier cycles already trained).
SD_STAGES: tuple[dict, ...] = (
    {"steps": 4000, "lr": 1e-3, "bank_seed": 3},
    {"steps": 6000, "lr": 5e-4, "bank_seed": 6},
    {"steps": 2500, "lr": 2.5e-4, "bank_seed": 9},
)


def train_stages(
    trainer: Callable[..., Path],
    stages: tuple[dict, ...],
    name: str,
    work_dir: Path,
    out: Path,
    seed: int = 0,
    steps: int | None = None,
) -> Path:
    """A shipped checkpoint trained as ``stages`` in turn, each ``trainer`` call starting from
    the previous stage's saved pipeline; the last writes ``out/name``.

    A stage whose checkpoint is already in ``work_dir`` (``{name}-stage1``, ...) is not trained
    again. ``steps`` overrides the last stage's length (for quick trials).
    """
    init_from = None
    for number, stage in enumerate(stages, start=1):
        last = number == len(stages)
        target = out if last else work_dir
        stage_name = name if last else f"{name}-stage{number}"
        if not last and (work_dir / stage_name / "model_index.json").is_file():
            print(f"{name} stage {number}: reusing {work_dir / stage_name}")
        else:
            trainer(
                work_dir,
                target,
                steps=steps if (last and steps is not None) else stage["steps"],
                lr=stage["lr"],
                seed=seed,
                bank_seed=seed + stage["bank_seed"],
                init_from=init_from,
                name=stage_name,
            )
        init_from = target / stage_name
    return out / name


def sd_scheduler():
    """The sampler shipped with ``shapes-sd``: DPM-Solver++ (2M) on the training schedule, chosen
    by ``benchmarks/shapes_quality.py --scheduler`` (the README's sampler table). "leading"
    spacing starts at t = 961; from t = 999 ("trailing"), where the cosine schedule leaves no
    signal, an epsilon-predicting model cannot recover the image.
    """
    from diffusers import DPMSolverMultistepScheduler

    return DPMSolverMultistepScheduler(
        **SCHEDULE,
        prediction_type="epsilon",
        algorithm_type="dpmsolver++",
        solver_order=2,
        steps_offset=1,
        timestep_spacing="leading",
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
    device = _device()
    vae = _load_vae(work_dir, device, seed, init_from)
    tokenizer = _tokenizer(work_dir)
    if init_from is None:
        text_encoder = make_text_encoder(32)
        unet = make_sd_unet(cross_attention_dim=text_encoder.config.hidden_size)
    else:
        text_encoder = CLIPTextModel.from_pretrained(Path(init_from) / "text_encoder", dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(Path(init_from) / "unet", dtype=torch.float32)
    text_encoder, unet = text_encoder.to(device).train(), unet.to(device).train()
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type="epsilon")
    optimisation = _Optimisation([unet, text_encoder], lr, steps)
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
    _tidy_saved_pipeline(target)
    print(f"{name} -> {target}")
    return target


def _tidy_saved_pipeline(pipeline_dir: Path) -> None:
    """Slim the tokenizer folders and drop what says where this run loaded things from
    (``_name_or_path`` of a continued stage's models, the offline flag of the tokenizers)."""
    from .tokenizer import slim_tokenizer_folder

    for folder in pipeline_dir.glob("tokenizer*"):
        slim_tokenizer_folder(folder)
    for config in pipeline_dir.glob("*/*config.json"):
        data = json.loads(config.read_text())
        if {"_name_or_path", "local_files_only"} & data.keys():
            data.pop("_name_or_path", None)
            data.pop("local_files_only", None)
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- shapes-mmdit ----------------------------------------------------------------------------
MMDIT_T5_LENGTHS = (1, 4, 16, 64, 256)
MMDIT_T5_WEIGHTS = (0.4, 0.25, 0.15, 0.15, 0.05)
# As for shapes-sd: cosine cycles, each from the previous one's averaged weights on fresh scenes.
MMDIT_STAGES: tuple[dict, ...] = (
    {"steps": 3800, "lr": 5e-4, "bank_seed": 4},
    {"steps": 4000, "lr": 2.5e-4, "bank_seed": 7},
)


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
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    device = _device()
    vae = _load_vae(work_dir, device, seed, init_from)
    tokenizer = _tokenizer(work_dir)
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
    text_encoder, text_encoder_2 = text_encoder.to(device).train(), text_encoder_2.to(device).train()
    transformer = transformer.to(device).train()

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
    optimisation = _Optimisation([transformer, text_encoder, text_encoder_2], lr, steps)
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
    _tidy_saved_pipeline(target)
    print(f"{name} -> {target}")
    return target


# -- shapes-clip -----------------------------------------------------------------------------
def train_clip(
    out: Path, steps: int = 2000, batch_size: int = 128, lr: float = 1e-3, seed: int = 0, distorted: float = 0.5
) -> Path:
    """Contrastive training on Shapes scenes and their captions; a ``distorted`` fraction of each
    batch is drawn imperfectly (``dataset.distort``) so that the judge also reads generated images."""
    import open_clip

    from .clip import CLIP_PREPROCESS, register_shapes_clip
    from .dataset import distort

    torch.manual_seed(seed)
    device = _device()
    register_shapes_clip()
    model = open_clip.create_model("shapes-clip").to(device).train()
    tokenizer = open_clip.get_tokenizer("shapes-clip")
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scheduler = _cosine_lr(optimizer, steps)
    stream = SceneStream(seed=seed + 5)
    generator = torch.Generator().manual_seed(seed + 6)
    bar = tqdm(range(steps), desc="shapes-clip")
    for _ in bar:
        images, captions = stream.next_batch(batch_size)
        images = distort(images, generator, fraction=distorted)
        # open_clip's preprocessing (CLIP_PREPROCESS: 64 px, mean = std = 0.5) maps [0, 1] pixels to
        # the [-1, 1] range our images are already in
        image_features = model.encode_image(images.to(device), normalize=True)
        text_features = model.encode_text(tokenizer(captions).to(device), normalize=True)
        logits = model.logit_scale.exp() * image_features @ text_features.T
        # captions repeat within a batch: count every identical caption as a positive
        same = torch.tensor([[a == b for b in captions] for a in captions], device=device, dtype=torch.float32)
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        bar.set_postfix(loss=f"{loss.item():.3f}")
    target = out / "shapes-clip"
    target.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "open_clip_model.safetensors"))
    config = {"model_cfg": CLIP_MODEL_CONFIG, "preprocess_cfg": CLIP_PREPROCESS}
    (target / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"shapes-clip -> {target}")
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=["vae", "clip", "sd", "mmdit", "all"])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps (default: the shipped recipe's; for sd, of its last stage)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kwargs = {"seed": args.seed}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    start = time.time()
    targets = ["vae", "clip", "sd", "mmdit"] if args.target == "all" else [args.target]
    for target in targets:
        if target == "vae":
            train_vae(args.work_dir, **kwargs)
        elif target == "clip":
            train_clip(args.out, **kwargs)
        elif target == "sd":
            train_stages(train_sd, SD_STAGES, "shapes-sd", args.work_dir, args.out, **kwargs)
        else:
            train_stages(train_mmdit, MMDIT_STAGES, "shapes-mmdit", args.work_dir, args.out, **kwargs)
    print(f"done in {(time.time() - start) / 60:.1f} min on {_device()}")


if __name__ == "__main__":
    main()
