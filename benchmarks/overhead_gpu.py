"""Steering cost at full size on a GPU: SDXL-UNet-size and PixArt-size denoisers, float16.

    python benchmarks/overhead_gpu.py [--repeats 25] [--json FILE]    # CUDA
    python benchmarks/overhead_gpu.py --small --device cpu            # the same code, tiny, on the CPU

Each model is built from its configuration with random weights (only the cost matters): the
SDXL UNet (2.6B parameters) and PixArt-α's transformer (0.6B, 28 blocks), in float16 on
CUDA, batch 2, 128 x 128 latents (1024 x 1024 images). Steerers (Linear-AcT with the
min-max support, DSAS gates) are fitted on random inputs. Per model: the block and norm
presets eager, the block preset compiled; one denoiser call unsteered, with DSAS and with
the naive hooks of ``overhead.py`` (``sigmoid(a·t + c)`` and the map in separate ops), plus
uniform steering eager; turns alternate, ratios are to the same round's unsteered time
(``overhead.time_variants``). On CUDA DSAS steers with the fused Triton kernel
(``dsas_diffusion/steering/fused.py``); ``--unfused`` measures its PyTorch path instead.
Meant to finish within 4 minutes on one H100-class GPU; each part prints its own time.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from overhead import SDXL_UNET, print_table, time_variants

from dsas_diffusion.diffusion import hook_points
from dsas_diffusion.steering import fit_steerer

PIXART = dict(
    sample_size=128, num_layers=28, patch_size=2, attention_head_dim=72, num_attention_heads=16, in_channels=4,
    out_channels=8, cross_attention_dim=1152, caption_channels=4096, attention_bias=True,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, use_additional_conditions=False,
)  # fmt: skip
SMALL_UNET = dict(
    SDXL_UNET, sample_size=16, block_out_channels=(32, 64, 64), transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4), cross_attention_dim=32, addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)  # fmt: skip
SMALL_PIXART = dict(PIXART, sample_size=16, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                    cross_attention_dim=16, caption_channels=32)  # fmt: skip


def models(small: bool, device: torch.device, dtype: torch.dtype):
    """``(label, denoiser, make_call)`` for the SDXL UNet and the PixArt transformer;
    ``make_call(seed, batch=2)`` returns one call's keyword arguments."""
    from diffusers import PixArtTransformer2DModel, UNet2DConditionModel

    size = 16 if small else 128
    unet_config, pixart_config = (SMALL_UNET, SMALL_PIXART) if small else (SDXL_UNET, PIXART)
    text_width = unet_config["cross_attention_dim"]
    pooled = unet_config["projection_class_embeddings_input_dim"] - 6 * unet_config["addition_time_embed_dim"]

    def randn(generator, *shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def unet_call(seed: int, batch: int = 2) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {
            "sample": randn(g, batch, 4, size, size),
            "timestep": torch.tensor(500, device=device),
            "encoder_hidden_states": randn(g, batch, 77, text_width),
            "added_cond_kwargs": {
                "text_embeds": randn(g, batch, pooled),
                "time_ids": torch.tensor([[8 * size, 8 * size, 0, 0, 8 * size, 8 * size]] * batch, device=device,
                                         dtype=dtype),
            },
            "return_dict": False,
        }  # fmt: skip

    def pixart_call(seed: int, batch: int = 2) -> dict:
        g = torch.Generator().manual_seed(seed)
        return {
            "hidden_states": randn(g, batch, 4, size, size),
            "encoder_hidden_states": randn(g, batch, 120, pixart_config["caption_channels"]),
            "timestep": torch.full((batch,), 500, device=device),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
            "return_dict": False,
        }

    torch.manual_seed(0)
    where = f"{device.type}, {dtype}".replace("torch.", "")
    unet = UNet2DConditionModel(**unet_config).to(device, dtype).eval()
    yield f"SDXL-size UNet ({where}, batch 2, {size}x{size} latents)", unet, unet_call
    pixart = PixArtTransformer2DModel(**pixart_config).to(device, dtype).eval()
    yield f"PixArt-size transformer ({where}, batch 2, {size}x{size} latents)", pixart, pixart_call


def run(small: bool, device: torch.device, repeats: int) -> list[dict]:
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    rows = []
    for label, denoiser, make_call in models(small, device, dtype):
        sets = [[make_call(seed)] * 4 for seed in range(3)]
        for preset, compiled in (("blocks", False), ("norms", False), ("blocks", True)):
            start = time.perf_counter()
            points = hook_points(denoiser, preset)
            steerer = fit_steerer(
                denoiser, points, *sets, map="linear-act", gate_threshold=None, forward=lambda c, model=denoiser: model(**c),
                mask_fn=lambda c: None, max_imbalance=10.0, progress=False,
            )  # fmt: skip
            variants = ("unsteered", "dsas", "naive") if compiled else ("unsteered", "uniform", "dsas", "naive")
            timing = time_variants(denoiser, make_call(99), steerer, repeats, compiled=compiled, variants=variants)
            name = f"{preset}, Linear-AcT" + (", compiled" if compiled else "")
            rows.append({"model": label, "preset": name, "layers": len(points), **timing})
            print(f"{label}, {name}: {time.perf_counter() - start:.0f} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=25, help="calls per variant (in blocks of 5)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny configurations, to check the script on the CPU")
    parser.add_argument("--unfused", action="store_true", help="DSAS without the fused kernel (its PyTorch path)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here; check the script with --small --device cpu")
    if args.unfused:
        os.environ["DSAS_FUSED_KERNEL"] = "0"
    start = time.perf_counter()
    rows = run(args.small, device, args.repeats)
    print_table(rows)
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)
    return rows


if __name__ == "__main__":
    main()
