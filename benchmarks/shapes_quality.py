"""Quality bars of the embedded Shapes models (issue: the Shapes world).

    python benchmarks/shapes_quality.py [--models clip vae sd mmdit] [--out docs/images] [--models-dir DIR]
        [--guidance 4.0] [--scheduler DDIMScheduler] [--scheduler-option solver_order=3 ...]

- shapes-clip: zero-shot accuracy (shape, colour, background) on 500 held-out single-object
  test-split images, classifying among all 75 single-object captions.
- shapes-sd / shapes-mmdit: 200 single-object prompts and (sd) 100 two-object prompts with
  fixed seeds; colour and background judged by palette pixel masses, shapes by shapes-clip
  (each prompted object isolated by its colour first).
- the VAE's ceiling: the shape judge on 200 held-out images as drawn and after encoding and
  decoding with shapes-sd's VAE.
- sampling speed: a batch of 8 images, 25 steps, classifier-free guidance.
Prints a markdown table and writes sample grids.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import time
from pathlib import Path

import torch
from PIL import Image

from dsas_diffusion.diffusion.visual import image_grid, rows_of
from dsas_diffusion.shapes.data import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    parse_caption,
    render_scene,
    sample_spec,
    scene_seed,
)
from dsas_diffusion.shapes.detect import ShapeJudge, isolate_colour, read_scenes
from dsas_diffusion.shapes.hub import load_shapes_pipeline, resolve_model_path

SINGLE = [f"a {c} {s} on a {b} background" for c, s, b in itertools.product(COLOURS, SHAPES, BACKGROUNDS)]


def single_prompts(count: int = 200) -> list[str]:
    return [SINGLE[i % len(SINGLE)] for i in range(count)]


def two_object_prompts(count: int = 100, seed: int = 1234) -> list[str]:
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < count:
        c1, c2 = rng.sample(list(COLOURS), 2)  # distinct colours: each object is found by its colour
        s1, s2 = rng.choice(SHAPES), rng.choice(SHAPES)
        prompts.append(f"a {c1} {s1} and a {c2} {s2} on a {rng.choice(list(BACKGROUNDS))} background")
    return prompts


def clip_accuracy(judge: ShapeJudge, count: int = 500, grid_path: Path | None = None) -> dict[str, float]:
    scenes = [render_scene(sample_spec(scene_seed(i, "eval"), 1)) for i in range(count)]
    guesses: list[str] = []
    with torch.no_grad():
        text = judge.model.encode_text(judge.tokenizer(SINGLE), normalize=True)
        correct = {"shape": 0, "colour": 0, "background": 0}
        for start in range(0, count, 100):
            chunk = scenes[start : start + 100]
            images = torch.stack([judge.preprocess(s.image) for s in chunk])
            predictions = (judge.model.encode_image(images, normalize=True) @ text.T).argmax(1)
            for scene, index in zip(chunk, predictions.tolist(), strict=True):
                guesses.append(SINGLE[index])
                guess = parse_caption(SINGLE[index])
                truth = scene.spec
                correct["shape"] += guess.objects[0].shape == truth.objects[0].shape
                correct["colour"] += guess.objects[0].colour == truth.objects[0].colour
                correct["background"] += guess.background == truth.background
    if grid_path is not None:
        labelled_grid([s.image for s in scenes[:16]], guesses[:16]).save(grid_path)
    return {k: v / count for k, v in correct.items()}


MODELS_DIR: Path | None = None  # --models-dir


def model_path(name: str) -> str | Path:
    """``name`` in ``--models-dir`` when it is there, else the shipped model."""
    if MODELS_DIR is not None and (MODELS_DIR / name).is_dir():
        return MODELS_DIR / name
    return name


def vae_ceiling(judge: ShapeJudge, count: int = 200) -> dict[str, float]:
    """Shape accuracy of the judge on held-out images passed through shapes-sd's VAE
    (encode, decode): the most any generated image can reach through this VAE."""
    from dsas_diffusion.shapes.dataset import images_to_tensor

    vae = load_shapes_pipeline(model_path("shapes-sd")).vae
    scenes = [render_scene(sample_spec(scene_seed(i, "eval"), 1)) for i in range(count)]
    with torch.no_grad():
        pixels = images_to_tensor([s.image for s in scenes])
        decoded = torch.cat([vae.decode(vae.encode(chunk).latent_dist.mean).sample for chunk in pixels.split(50)])
    images = [Image.fromarray(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for x in decoded]
    result = {}
    for name, shown in (("original", [s.image for s in scenes]), ("reconstructed", images)):
        isolated = [
            isolate_colour(image, s.spec.objects[0].colour, s.spec.background)
            for image, s in zip(shown, scenes, strict=True)
        ]
        shapes = judge.shapes(isolated, [s.spec.objects[0].colour for s in scenes], [s.spec.background for s in scenes])
        hits = sum(shape == s.spec.objects[0].shape for shape, s in zip(shapes, scenes, strict=True))
        result[f"shape_{name}"] = hits / count
    return result


def labelled_grid(images: list[Image.Image], captions: list[str], columns: int = 4, scale: int = 2) -> Image.Image:
    """Images with the zero-shot caption beside each (colour, shape / background)."""
    notes = []
    for caption in captions:
        spec = parse_caption(caption)
        notes.append("\n".join([spec.objects[0].colour, spec.objects[0].shape, f"on {spec.background}"]))
    return image_grid(rows_of(images, columns), scale=scale, cell_notes=rows_of(notes, columns), note_width=90)


def generate(pipe, prompts: list[str], steps: int, guidance: float, batch: int = 8, **kwargs) -> list[Image.Image]:
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        images += pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators, **kwargs).images
    return images


def judge_images(judge: ShapeJudge, prompts: list[str], images: list[Image.Image]) -> dict[str, float]:
    """Fractions of images with every prompted object found (its colour present, and for
    single-object prompts dominant, and its shape as prompted) and with the right background."""
    readings = read_scenes(judge, images, prompts)
    return {
        "objects_as_prompted": sum(r.objects_as_prompted for r in readings) / len(prompts),
        "background": sum(r.background_as_prompted for r in readings) / len(prompts),
    }


def sampling_seconds(pipe, prompt: str, steps: int, guidance: float, **kwargs) -> float:
    generate(pipe, [prompt] * 8, 2, guidance, **kwargs)  # warm-up
    start = time.perf_counter()
    generate(pipe, [prompt] * 8, steps, guidance, **kwargs)
    return time.perf_counter() - start


def scheduler_from(shipped, class_name: str | None, options: list[str]):
    """``class_name`` (default: the shipped scheduler's class) built from the shipped config
    with ``KEY=VALUE`` overrides (values read as JSON when they parse, else as strings)."""
    import diffusers

    cls = type(shipped) if class_name is None else getattr(diffusers, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SystemExit(f"--scheduler {class_name!r} is not a diffusers scheduler class (e.g. DDIMScheduler)")
    overrides = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or not key:
            raise SystemExit(f"--scheduler-option {option!r}: write KEY=VALUE, e.g. solver_order=3")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return cls.from_config(shipped.config, **overrides)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["clip", "vae", "sd", "mmdit"], choices=["clip", "vae", "sd", "mmdit"]
    )
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument(
        "--scheduler",
        default=None,
        help="sample with this diffusers scheduler class instead of the model's own, built from the model's "
        "scheduler config (e.g. DDIMScheduler, UniPCMultistepScheduler)",
    )
    parser.add_argument(
        "--scheduler-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one scheduler config entry (repeatable; e.g. solver_order=3, timestep_spacing=trailing)",
    )
    parser.add_argument("--single", type=int, default=200)
    parser.add_argument("--double", type=int, default=100)
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--models-dir",
        type=Path,
        default=None,
        help="measure the models in this folder (a training run's --out) where it has them, the shipped ones otherwise",
    )
    args = parser.parse_args()
    global MODELS_DIR
    MODELS_DIR = args.models_dir
    torch.manual_seed(0)
    args.out.mkdir(parents=True, exist_ok=True)
    from dsas_diffusion.shapes.clip import load_shapes_clip

    judge = ShapeJudge(*load_shapes_clip(path=resolve_model_path(model_path("shapes-clip"))))
    print("models:", {name: str(model_path(name)) for name in ("shapes-clip", "shapes-sd", "shapes-mmdit")})
    results: dict[str, dict[str, float]] = {}
    if "clip" in args.models:
        results["shapes-clip"] = clip_accuracy(judge, grid_path=args.out / "shapes-clip_zero_shot.png")
        print("shapes-clip zero-shot accuracy (500 held-out images):", results["shapes-clip"])
    if "vae" in args.models:
        results["shapes-sd VAE"] = vae_ceiling(judge)
        print("judge's shape accuracy on 200 held-out images, as drawn and through the VAE:", results["shapes-sd VAE"])
    for key in ("sd", "mmdit"):
        if key not in args.models:
            continue
        name = f"shapes-{key}"
        pipe = load_shapes_pipeline(model_path(name))
        if args.scheduler or args.scheduler_option:
            pipe.scheduler = scheduler_from(pipe.scheduler, args.scheduler, args.scheduler_option)
            print(f"{name} samples with {type(pipe.scheduler).__name__} {dict(pipe.scheduler.config)}")
        extra = {"max_sequence_length": 16} if key == "mmdit" else {}
        single = single_prompts(args.single)
        images = generate(pipe, single, args.steps, args.guidance, **extra)
        row = {f"single_{k}": v for k, v in judge_images(judge, single, images).items()}
        image_grid(rows_of(images[:32], 8), scale=2).save(args.out / f"{name}_samples.png")
        if key == "sd" and args.double:
            double = two_object_prompts(args.double)
            double_images = generate(pipe, double, args.steps, args.guidance, **extra)
            row["two_objects_both_present"] = judge_images(judge, double, double_images)["objects_as_prompted"]
            image_grid(rows_of(double_images[:16], 8), scale=2).save(args.out / f"{name}_two_objects.png")
        row["seconds_batch8_25steps_cfg"] = sampling_seconds(pipe, single[0], 25, args.guidance, **extra)
        results[name] = row
        print(name, row)
    print()
    print("| model | metric | value |")
    print("|---|---|---|")
    for model, row in results.items():
        for metric, value in row.items():
            print(f"| {model} | {metric} | {value:.3f} |" if value <= 1.5 else f"| {model} | {metric} | {value:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
