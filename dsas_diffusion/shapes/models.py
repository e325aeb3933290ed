"""Architectures of the Shapes models, as stock diffusers / transformers / open_clip configs."""

from __future__ import annotations

from typing import Any

__all__ = [
    "CLIP_MODEL_CONFIG",
    "SCHEDULE",
    "TOKENIZER_MAX_LENGTH",
    "make_mmdit_transformer",
    "make_sd_unet",
    "make_text_encoder",
    "make_vae",
    "sd_scheduler",
]

TOKENIZER_MAX_LENGTH = 24  # the longest Shapes caption is 13 tokens with BOS/EOS
VOCAB_SIZE = 49408
#: the noise schedule ``shapes-sd`` is trained and sampled on
SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 1000}


def make_vae():
    """A 64x64 -> 4x16x16 ``AutoencoderKL`` (downsampling factor 4)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def make_text_encoder(hidden_size: int = 64, with_projection: bool = False, projection_dim: int | None = None):
    """A small CLIP text transformer over the full CLIP vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


def make_sd_unet(cross_attention_dim: int = 64):
    """The ``shapes-sd`` denoiser on 4x16x16 latents."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 128),
        # attention at 8x8 and 4x4 only (docs/shapes-world.md, Models)
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=32,
        norm_num_groups=16,
    )


def sd_scheduler():
    """The sampler shipped with ``shapes-sd``: DPM-Solver++ (2M) on the training schedule, chosen
    by ``benchmarks/shapes_quality.py --scheduler`` (the sampler table in docs/shapes-world.md). "leading"
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


def make_mmdit_transformer(text_hidden: int = 64, pooled_dim: int = 64):
    """The ``shapes-mmdit`` SD3 transformer on 4x16x16 latents (patch 2: 64 image tokens)."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=6,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=text_hidden,
        caption_projection_dim=128,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=16,
    )


# open_clip custom model: a small ModifiedResNet on 64 px images and a small text transformer
# (why not a ViT: docs/shapes-world.md, Models).
CLIP_MODEL_CONFIG: dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
    "text_cfg": {
        "context_length": TOKENIZER_MAX_LENGTH,
        "vocab_size": VOCAB_SIZE,
        "width": 32,
        "heads": 4,
        "layers": 2,
    },
}
