"""``make demo``: DSAS on a small diffusers UNet, written to ``outputs/``.

Until the Shapes world (trained text-to-image models shipped in the repo) exists, the demo
runs the steering core on a randomly initialised ``UNet2DConditionModel`` built from a
config, fed with latents in which the "concept" is a bright square on one channel. It fits
every steering map, applies each uniformly and with DSAS gates, prints how much each
changes the concept's positions, the other positions and concept-free inputs, and writes a
comparison image (input | gate heatmap | change with uniform steering | change with DSAS).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch

from .steering import LinEASConfig, Steerer, fit_steerer

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


def block_output(unet, steerer: Steerer | None, latents: torch.Tensor, gate: bool):
    """The first hooked block's output (after steering, if a steerer is given) and, when
    gated, its recorded gate map."""
    outputs = []
    text = torch.zeros(latents.shape[0], 3, 16)
    module = unet.get_submodule(HOOK)
    steering = steerer.apply(unet, gate=gate, record_gates=gate) if steerer is not None else contextlib.nullcontext()
    with torch.no_grad(), steering as session:
        handle = module.register_forward_hook(lambda m, i, o: outputs.append(o))  # after any steering hook
        try:
            unet(latents, 10, encoder_hidden_states=text)
        finally:
            handle.remove()
    gates = session.gate_maps[HOOK][0].float() if steerer is not None and gate else None
    return outputs[0], gates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs", help="output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    unet = build_unet()
    source, target, control = batches(1, True), batches(2, False), batches(3, False)
    test_concept, masks = make_latents(3, 999, True)
    test_plain, _ = make_latents(3, 998, False)
    plain_concept, _ = block_output(unet, None, test_concept, False)
    plain_control, _ = block_output(unet, None, test_plain, False)

    rows, panels = [], {}
    print("Fitting on a random diffusers UNet (stand-in until the Shapes models exist)...")
    for map_name in ("caa", "iti", "linear-act", "lineas"):
        steerer = fit_steerer(
            unet,
            HOOKS,
            source,
            target,
            control,
            map=map_name,
            incremental=map_name != "lineas",
            gate_calibration="control-positions",
            support_quantiles=None,
            lineas=LinEASConfig(steps=100, lr=1e-2, batch_size=8),
            progress=False,
        )
        if map_name == "linear-act":
            steerer.save_pretrained(out / "steering-linear-act")
        for gate in (False, True):
            steered_concept, gates = block_output(unet, steerer, test_concept, gate)
            steered_control, _ = block_output(unet, steerer, test_plain, gate)
            change = (steered_concept - plain_concept).abs().mean(1)
            rows.append(
                (
                    map_name,
                    "DSAS" if gate else "uniform",
                    float(change[masks].mean()),
                    float(change[~masks].mean()),
                    float((steered_control - plain_control).abs().mean()),
                )
            )
            if map_name == "linear-act":
                panels["gate" if gate else "uniform"] = (change, gates)

    header = f"{'map':<11} {'gating':<8} {'concept positions':>18} {'other positions':>16} {'concept-free inputs':>20}"
    lines = ["Mean |change| of the first hooked block's output", header, "-" * len(header)]
    lines += [f"{m:<11} {g:<8} {a:>18.4f} {b:>16.4f} {c:>20.4f}" for m, g, a, b, c in rows]
    table = "\n".join(lines)
    print(table)
    (out / "demo_table.txt").write_text(table + "\n")
    _plot(out / "demo_comparison.png", test_concept, masks, panels)
    print(f"wrote {out / 'demo_comparison.png'}, {out / 'demo_table.txt'} and {out / 'steering-linear-act'}/")


def _plot(path: Path, latents: torch.Tensor, masks: torch.Tensor, panels: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    uniform_change, _ = panels["uniform"]
    gated_change, gates = panels["gate"]
    top = float(max(uniform_change.max(), gated_change.max()))
    fig, axes = plt.subplots(latents.shape[0], 4, figsize=(10, 2.6 * latents.shape[0]))
    titles = ["input (channel 0)", "DSAS gate", "|change| uniform", "|change| DSAS"]
    for row in range(latents.shape[0]):
        images = [latents[row, 0], gates[row], uniform_change[row], gated_change[row]]
        limits = [(None, None), (0, 1), (0, top), (0, top)]
        for col, (image, (low, high)) in enumerate(zip(images, limits, strict=True)):
            axis = axes[row, col]
            axis.imshow(image.numpy(), cmap="magma" if col else "gray", vmin=low, vmax=high)
            axis.contour(masks[row].float().numpy(), levels=[0.5], colors="cyan", linewidths=0.8)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[col])
    fig.suptitle("Linear-AcT on a random UNet: uniform vs DSAS (cyan: concept positions)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
