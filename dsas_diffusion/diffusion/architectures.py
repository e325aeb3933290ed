"""Where to hook each denoiser family, as data.

One :class:`Architecture` per denoiser class names its presets. A preset is a tuple of
:class:`HookGroup` patterns matched against ``named_modules()`` one dotted segment at a
time (``*`` matches one segment: ``"down_blocks.*"`` matches ``down_blocks.0`` but not
``down_blocks.0.resnets.0``). Each group says which element of the module's output is the
image stream (``output_index``) and its layout. Adding a family is adding one entry to
:data:`ARCHITECTURES`; nothing else changes.

Presets:

* ``"blocks"``: block outputs. UNets: every down block (its hidden states,
  output 0; the skip connections it also returns stay unsteered), the mid block and every
  up block, as ``B x C x H x W`` maps. DiT / MMDiT / FLUX: every transformer block's
  image-token stream (``B x N x C``); joint blocks return ``(text, image)``, so output 1.
* ``"norms"``: the normalisation layers inside the transformer blocks, Linear-AcT's
  layout (``B x N x C``; adaptive norms return a tuple whose element 0 is the normed
  stream). FLUX's single-stream blocks normalise text and image tokens together, so
  only its double-stream blocks' norms are in this preset.
* ``"cross-attention"`` (default): where the prompt enters the image stream, per position
  (``B x N x C``). UNets and PixArt: the output of every cross-attention (``attn2``).
  SD3 / FLUX joint blocks have no cross-attention; their joint attention returns
  ``(image, text)``, and its image part (output 0) is where the text reaches the image
  tokens. FLUX's single-stream blocks attend over text and image tokens together and are
  left out.

Examples:
    >>> from diffusers import UNet2DConditionModel
    >>> unet = UNet2DConditionModel(block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=16,
    ...     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    ...     layers_per_block=1, sample_size=8)
    >>> [p.module.removesuffix(".transformer_blocks.0.attn2") for p in hook_points(unet)]
    ['down_blocks.1.attentions.0', 'up_blocks.0.attentions.0', 'up_blocks.0.attentions.1', 'mid_block.attentions.0']
    >>> [p.module for p in hook_points(unet, "blocks")]
    ['down_blocks.0', 'down_blocks.1', 'up_blocks.0', 'up_blocks.1', 'mid_block']
    >>> [p.module for p in hook_points(unet, "norms")][:3]
    ['down_blocks.1.attentions.0.transformer_blocks.0.norm1', 'down_blocks.1.attentions.0.transformer_blocks.0.norm2', 'down_blocks.1.attentions.0.transformer_blocks.0.norm3']
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from torch import nn

from ..names import DEFAULT_DIFFUSION_PRESET, DIFFUSION_PRESETS
from ..steering import HookPoint, SteeringError
from ..steering.compiled import unwrap_compiled

__all__ = ["ARCHITECTURES", "Architecture", "HookGroup", "architecture_of", "hook_points"]


@dataclass(frozen=True)
class HookGroup:
    """Modules matching ``pattern``; ``output_index`` picks the image stream of their output."""

    pattern: str
    output_index: int | None
    layout: str  # "channels_first" (B, C, H, W) or "channels_last" (B, N, C)

    def matches(self, name: str) -> bool:
        parts, wanted = name.split("."), self.pattern.split(".")
        return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, w) for p, w in zip(parts, wanted, strict=True))


@dataclass(frozen=True)
class Architecture:
    """How one denoiser class is steered: its presets, and the rank of its image stream."""

    denoiser_class: str
    presets: dict[str, tuple[HookGroup, ...]]
    image_ndim: int  # 4 for (B, C, H, W) feature maps, 3 for (B, N, C) image tokens
    patch_size_attr: str | None = None  # config key of the patch size, for token grids

    def __post_init__(self) -> None:
        unknown = sorted(set(self.presets) - set(DIFFUSION_PRESETS))
        if unknown:
            raise ValueError(f"{self.denoiser_class}: presets {unknown} are not in names.DIFFUSION_PRESETS")


_UNET_CROSS_ATTENTION = tuple(
    HookGroup(f"{prefix}.attentions.*.transformer_blocks.*.attn2", None, "channels_last")
    for prefix in ("down_blocks.*", "mid_block", "up_blocks.*")
)
_UNET_NORMS = tuple(
    HookGroup(f"{prefix}.attentions.*.transformer_blocks.*.norm{k}", None, "channels_last")
    for prefix in ("down_blocks.*", "mid_block", "up_blocks.*")
    for k in (1, 2, 3)
)
_UNET = Architecture(
    "UNet2DConditionModel",
    {
        "blocks": (
            HookGroup("down_blocks.*", 0, "channels_first"),
            HookGroup("mid_block", None, "channels_first"),
            HookGroup("up_blocks.*", None, "channels_first"),
        ),
        "norms": _UNET_NORMS,
        "cross-attention": _UNET_CROSS_ATTENTION,
    },
    image_ndim=4,
)

ARCHITECTURES: dict[str, Architecture] = {
    "UNet2DConditionModel": _UNET,
    "SD3Transformer2DModel": Architecture(
        "SD3Transformer2DModel",
        {
            "blocks": (HookGroup("transformer_blocks.*", 1, "channels_last"),),
            "norms": (
                HookGroup("transformer_blocks.*.norm1", 0, "channels_last"),
                HookGroup("transformer_blocks.*.norm2", None, "channels_last"),
            ),
            "cross-attention": (HookGroup("transformer_blocks.*.attn", 0, "channels_last"),),
        },
        image_ndim=3,
        patch_size_attr="patch_size",
    ),
    "FluxTransformer2DModel": Architecture(
        "FluxTransformer2DModel",
        {
            "blocks": (
                HookGroup("transformer_blocks.*", 1, "channels_last"),
                HookGroup("single_transformer_blocks.*", 1, "channels_last"),
            ),
            "norms": (
                HookGroup("transformer_blocks.*.norm1", 0, "channels_last"),
                HookGroup("transformer_blocks.*.norm2", None, "channels_last"),
            ),
            "cross-attention": (HookGroup("transformer_blocks.*.attn", 0, "channels_last"),),
        },
        image_ndim=3,
        patch_size_attr="patch_size",
    ),
    "PixArtTransformer2DModel": Architecture(
        "PixArtTransformer2DModel",
        {
            "blocks": (HookGroup("transformer_blocks.*", None, "channels_last"),),
            "norms": (
                HookGroup("transformer_blocks.*.norm1", None, "channels_last"),
                HookGroup("transformer_blocks.*.norm2", None, "channels_last"),
            ),
            "cross-attention": (HookGroup("transformer_blocks.*.attn2", None, "channels_last"),),
        },
        image_ndim=3,
        patch_size_attr="patch_size",
    ),
}


def architecture_of(denoiser: nn.Module) -> Architecture:
    """The mapping for ``denoiser``'s class (or the nearest base class that has one; of the
    module ``torch.compile`` wrapped, for a compiled one)."""
    denoiser = unwrap_compiled(denoiser)
    for cls in type(denoiser).__mro__:
        if cls.__name__ in ARCHITECTURES:
            return ARCHITECTURES[cls.__name__]
    raise SteeringError(
        f"no hook mapping for {type(denoiser).__name__}; known denoisers: {', '.join(ARCHITECTURES)}. "
        "Pass hook_points=[...] (module names from denoiser.named_modules()) or add an Architecture "
        "entry to dsas_diffusion.diffusion.ARCHITECTURES."
    )


def hook_points(denoiser: nn.Module, preset: str = DEFAULT_DIFFUSION_PRESET) -> list[HookPoint]:
    """The hook points of ``preset`` on ``denoiser``, in ``named_modules()`` order (the fit
    reorders them into forward order)."""
    architecture = architecture_of(denoiser)
    denoiser = unwrap_compiled(denoiser)
    if preset not in architecture.presets:
        raise SteeringError(
            f"unknown preset {preset!r} for {architecture.denoiser_class}; choose one of {sorted(architecture.presets)}"
        )
    groups = architecture.presets[preset]
    points = []
    for name, _ in denoiser.named_modules():
        for group in groups:
            if group.matches(name):
                points.append(HookPoint(name, group.output_index, group.layout))
                break
    if not points:
        raise SteeringError(f"preset {preset!r} matched no module of this {architecture.denoiser_class}")
    return points
