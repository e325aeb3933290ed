"""Architecture-faithful tiny pipelines of every supported family, built from configs.

Random weights, nothing downloaded: the tokenizer is the real CLIP BPE built from the
vocabulary file open-clip-torch ships (used also where a pipeline expects T5's tokenizer:
the T5 encoders here are tiny and take the same ids). Images are 32x32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import T5Config, T5EncoderModel

import dsas_diffusion
from dsas_diffusion.shapes.models import make_text_encoder
from dsas_diffusion.shapes.tokenizer import build_clip_tokenizer

SIZE = 32
FAMILIES = ("sd", "sdxl", "sd3", "flux", "pixart")


@dataclass
class Tiny:
    family: str
    stock_class: type
    dsas_class: type
    components: dict[str, Any]
    call_kwargs: dict[str, Any] = field(default_factory=dict)

    def stock(self):
        return self.stock_class(**self.components)

    def dsas(self):
        return self.dsas_class(**self.components)


def _clip(hidden: int = 32, projection: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return make_text_encoder(hidden, with_projection=projection).eval()


def _t5(d_model: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = T5Config(vocab_size=49408, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    return T5EncoderModel(config).eval()


def _vae(seed: int = 0, **extra: Any):
    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=SIZE,
        **extra,
    ).eval()


def _unet(**extra: Any):
    """A two-level UNet2DConditionModel on 16x16 latents; ``extra`` adds SD or SDXL specifics."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(16, 32),
        layers_per_block=1,
        sample_size=SIZE // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        **extra,
    ).eval()


def _ddim():
    return DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)


def build(family: str, tokenizer_dir) -> Tiny:
    tokenizer = build_clip_tokenizer(tokenizer_dir)
    common = {"height": SIZE, "width": SIZE, "num_inference_steps": 4}
    if family == "sd":
        unet = _unet(cross_attention_dim=32)
        components = dict(
            unet=unet,
            vae=_vae(),
            text_encoder=_clip(),
            tokenizer=tokenizer,
            scheduler=_ddim(),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        return Tiny(family, StableDiffusionPipeline, dsas_diffusion.DSASStableDiffusionPipeline, components, common)
    if family == "sdxl":
        unet = _unet(
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + 32 pooled text
            cross_attention_dim=64,
        )
        components = dict(
            unet=unet,
            vae=_vae(),
            text_encoder=_clip(),
            tokenizer=tokenizer,
            text_encoder_2=_clip(projection=True, seed=1),
            tokenizer_2=tokenizer,
            scheduler=_ddim(),
            force_zeros_for_empty_prompt=True,
        )
        return Tiny(family, StableDiffusionXLPipeline, dsas_diffusion.DSASStableDiffusionXLPipeline, components, common)
    if family == "sd3":
        torch.manual_seed(0)
        transformer = SD3Transformer2DModel(
            sample_size=SIZE // 2,
            patch_size=2,
            in_channels=4,
            out_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=64,
            caption_projection_dim=32,
            pooled_projection_dim=64,
            pos_embed_max_size=16,
        ).eval()
        components = dict(
            transformer=transformer,
            vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip(projection=True),
            tokenizer=tokenizer,
            text_encoder_2=_clip(projection=True, seed=1),
            tokenizer_2=tokenizer,
            text_encoder_3=None,
            tokenizer_3=None,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0),
        )
        kwargs = {**common, "max_sequence_length": 16}
        return Tiny(family, StableDiffusion3Pipeline, dsas_diffusion.DSASStableDiffusion3Pipeline, components, kwargs)
    if family == "flux":
        torch.manual_seed(0)
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,  # 4 latent channels packed 2x2
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=(4, 4, 8),
        ).eval()
        components = dict(
            transformer=transformer,
            vae=_vae(shift_factor=0.0609, scaling_factor=1.5035),
            text_encoder=_clip(),
            tokenizer=tokenizer,
            text_encoder_2=_t5(),
            tokenizer_2=tokenizer,
            scheduler=FlowMatchEulerDiscreteScheduler(),
        )
        kwargs = {**common, "max_sequence_length": 16, "guidance_scale": 0.0}
        return Tiny(family, FluxPipeline, dsas_diffusion.DSASFluxPipeline, components, kwargs)
    if family == "pixart":
        torch.manual_seed(0)
        transformer = PixArtTransformer2DModel(
            sample_size=SIZE // 2,
            num_layers=2,
            patch_size=2,
            attention_head_dim=8,
            num_attention_heads=3,
            caption_channels=32,
            in_channels=4,
            cross_attention_dim=24,
            out_channels=8,
            attention_bias=True,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
        ).eval()
        components = dict(
            transformer=transformer, vae=_vae(), text_encoder=_t5(), tokenizer=tokenizer, scheduler=_ddim()
        )
        kwargs = {**common, "max_sequence_length": 16, "use_resolution_binning": False, "clean_caption": False}
        return Tiny(family, PixArtAlphaPipeline, dsas_diffusion.DSASPixArtAlphaPipeline, components, kwargs)
    raise ValueError(family)


SOURCE = [f"a {c} banana on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]
TARGET = [f"a {c} circle on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]
CONTROL = [f"a {c} square on a {b} background" for c in ("red", "yellow", "green") for b in ("white", "black")]


def fit(tiny: Tiny):
    """A DSAS pipeline of the family with a Linear-AcT + DSAS steerer fitted through pipeline
    runs: ``(pipe, steerer)``."""
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    extra = {k: v for k, v in tiny.call_kwargs.items() if k not in ("height", "width", "num_inference_steps")}
    steerer = pipe.fit_steering(
        SOURCE,
        TARGET,
        CONTROL,
        map="linear-act",
        gate="dsas",
        num_inference_steps=4,
        collect_steps=(0, 2),
        batch_size=3,
        gate_threshold=None,  # random weights: keep every layer whatever its gate accuracy
        progress=False,
        pipeline_kwargs={"height": 32, "width": 32, **extra},
    )
    return pipe, steerer


def fit_reading_input(tiny: Tiny, window: tuple[float, float] | None = (0.5, 1.0), **settings: Any):
    """A DSAS pipeline of the family with a CAA steerer whose gates read each cross-attention's
    (joint attention's) input, with sample gates and the saved step ``window``, fitted cheaply
    (2 steps, one collected; ``settings`` override the fit's): ``(pipe, steerer)``."""
    pipe = tiny.dsas()
    pipe.set_progress_bar_config(disable=True)
    extra = {k: v for k, v in tiny.call_kwargs.items() if k not in ("height", "width", "num_inference_steps")}
    steerer = pipe.fit_steering(
        SOURCE, TARGET, CONTROL, gate_reads="input", sample_gate=True, steering_steps=window,
        num_inference_steps=2, collect_steps=(0,), batch_size=6, n_components=4, gate_threshold=None, gate_floor=0.0,
        progress=False, pipeline_kwargs={"height": 32, "width": 32, **extra}, **settings,
    )  # fmt: skip
    return pipe, steerer
