"""What fitting costs: peak memory and time of ``fit_steering`` against generating the same prompts.

    python benchmarks/fit_cost.py [--sizes 64 128] [--model shapes-sd]

For each image side (64 px, and 128 px: four times the latent area) two fresh processes run
on ``shapes-sd``: one generates the 96 prompts of the banana sets (32 source, 32 target, 32
control; ``fit_steering``'s 10 denoising steps, batch 8), the other fits ``fit_steering``'s
defaults on them. ``fit_steering`` has two phases: *record* runs the pipeline on the three
sets and keeps the denoiser's inputs (one generation of the same prompts), then *fit*
(``fit_steerer``) runs the denoiser on the recorded inputs with collecting hooks and fits
maps and gates. A thread samples the resident memory every 5 ms and keeps each phase's peak.

What fitting keeps beyond running the model (pooled rows, a bounded sample of positions per
prompt, the recorded inputs) should not grow with the image: the table gives the fit phase's
peak above the record phase's, the record phase's above the generation's, and the times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

PAGE_MIB = os.sysconf("SC_PAGE_SIZE") / 2**20


def resident_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * PAGE_MIB


class PhasePeaks:
    """Peak resident memory (MiB) and wall time (s) per named phase, sampled by a thread."""

    def __init__(self) -> None:
        self.phase = "load"
        self.peaks: dict[str, float] = {}
        self.started: dict[str, float] = {"load": time.perf_counter()}
        self.seconds: dict[str, float] = {}
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident_mib())
            time.sleep(0.005)

    def enter(self, phase: str) -> None:
        now = time.perf_counter()
        self.seconds[self.phase] = now - self.started[self.phase]
        self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), resident_mib())
        self.phase, self.started[phase] = phase, now


def child(task: str, model: str, size: int) -> dict:
    import torch

    import dsas_diffusion.diffusion.pipelines as pipelines
    from dsas_diffusion.diffusion.loading import load_pipeline
    from dsas_diffusion.shapes import concept_prompts

    peaks = PhasePeaks()
    torch.manual_seed(0)
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    source, target, control = concept_prompts("banana")
    if task == "generate":
        peaks.enter("generate")
        prompts = source + target + control
        with torch.no_grad():
            for first in range(0, len(prompts), 8):
                pipe(prompts[first : first + 8], num_inference_steps=10, height=size, width=size, output_type="latent")
    else:
        fit_steerer = pipelines.fit_steerer

        def timed_fit(*args, **kwargs):  # marks where fit_steering's record phase ends
            peaks.enter("fit")
            return fit_steerer(*args, **kwargs)

        pipelines.fit_steerer = timed_fit
        peaks.enter("record")
        pipe.fit_steering(source, target, control, progress=False, pipeline_kwargs={"height": size, "width": size})
    peaks.enter("done")
    return {"task": task, "size": size, "peaks": peaks.peaks, "seconds": peaks.seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--model", default="shapes-sd")
    parser.add_argument("--child", nargs=2, metavar=("TASK", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.model, int(args.child[1]))))
        return
    rows = {}
    for size in args.sizes:
        for task in ("generate", "fit"):
            command = [sys.executable, __file__, "--model", args.model, "--child", task, str(size)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            rows[(task, size)] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        "| image side | generate s | record s | fit s | (record + fit) / generate | generate peak MiB | "
        "record peak − generate MiB | fit peak − record peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        generate, fitting = rows[("generate", size)], rows[("fit", size)]
        g, r, f = generate["seconds"]["generate"], fitting["seconds"]["record"], fitting["seconds"]["fit"]
        gp, rp, fp = generate["peaks"]["generate"], fitting["peaks"]["record"], fitting["peaks"]["fit"]
        print(
            f"| {size} px | {g:.1f} | {r:.1f} | {f:.1f} | {(r + f) / g:.2f} | {gp:.0f} | {rp - gp:+.0f} | "
            f"{fp - rp:+.0f} |"
        )


if __name__ == "__main__":
    main()
