"""What fitting costs: peak memory and time of ``fit_steering`` against generating the same prompts.

    python benchmarks/fit_cost.py [--sizes 64 128] [--model shapes-sd]

For each image side (64 px, and 128 px: four times the latent area) two fresh processes run
on ``shapes-sd``: one generates the 96 prompts of the banana sets (32 source, 32 target, 32
control; ``fit_steering``'s 10 denoising steps, batch 8), the other fits ``fit_steering``'s
defaults on them. Each reports its wall time and its peak resident memory (``ru_maxrss``).
What fitting keeps beyond running the model (pooled rows and a bounded sample of positions
per prompt) should not grow with the image: the table gives the fit's peak minus the
generation's at each size, and the fit's time as a ratio to generating the same prompts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def child(task: str, model: str, size: int) -> dict:
    import torch

    from dsas_diffusion.diffusion.loading import load_pipeline
    from dsas_diffusion.shapes import concept_prompts

    torch.manual_seed(0)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    source, target, control = concept_prompts("banana")
    start = time.perf_counter()
    if task == "generate":
        prompts = source + target + control
        with torch.no_grad():
            for first in range(0, len(prompts), 8):
                pipe(prompts[first : first + 8], num_inference_steps=10, height=size, width=size, output_type="latent")
    else:
        pipe.fit_steering(source, target, control, progress=False, pipeline_kwargs={"height": size, "width": size})
    seconds = time.perf_counter() - start
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"task": task, "size": size, "seconds": seconds, "peak_mib": peak_mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.model, int(args.child[1]))))
        return
    results = {}
    for size in args.sizes:
        for task in ("generate", "fit"):
            command = [sys.executable, __file__, "--model", args.model, "--child", task, str(size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[(task, size)] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "| image side | generate s | fit s | fit / generate | generate peak MiB | fit peak MiB | fit − generate MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        generate, fit = results[("generate", size)], results[("fit", size)]
        print(
            f"| {size} px | {generate['seconds']:.1f} | {fit['seconds']:.1f} | {fit['seconds'] / generate['seconds']:.2f} | "
            f"{generate['peak_mib']:.0f} | {fit['peak_mib']:.0f} | {fit['peak_mib'] - generate['peak_mib']:+.0f} |"
        )


if __name__ == "__main__":
    main()
