"""Throughput of batched requests with per-request steering against one call per request.

    python benchmarks/batching.py [--concurrent 1 4 16] [--rounds 5]          # the app, shapes-sd, CPU
    python benchmarks/batching.py --denoisers --device cuda                     # full-size denoisers, GPU
    python benchmarks/batching.py --denoisers --small --device cpu              # the same code, tiny

The app part serves ``N`` concurrent generate requests of mixed steering (the banana and red
example steerings at strengths from 0 to 8, each request its own seed; 8 steps, guidance 7.5,
64 x 64) through the app's own code, both ways, turns alternating, for ``--rounds`` rounds:

- *per request*: ``N`` threads each make their request's pipeline call (``actions.generate``:
  its unsteered, uniform and DSAS images in one call), with torch's threads split among them
  as the app does (``configure_torch_threads(N)``);
- *batched*: the same ``N`` threads submit to one :class:`RequestBatcher` (as the app with
  ``--max-batch-size 16``), whose worker thread runs the requests gathered together as one
  call (``actions.generate_many``), with all the cores.

Printed: requests per second both ways (median over rounds) and the median over rounds of the
ratio batched / per request, with its quartiles.

``--denoisers`` times one denoiser call instead, on the random-weight SDXL-size UNet and
PixArt-size transformer of ``overhead_gpu.py`` (float16 on CUDA), DSAS (Linear-AcT) on the
block outputs: ``N`` requests (each a batch of 2, its guidance halves) at strengths from 0 to 2
as one call of batch ``2N`` with one λ per request, against ``N`` calls of batch 2.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import torch
from overhead import alternate, ratio_quartiles

STRENGTHS = (0.0, 1.0, 2.0, 4.0, 8.0, 0.5, 3.0, 6.0)
PROMPTS = ("a yellow banana on a gray background", "a red square on a white background", "a green banana on a black "
           "background", "a red circle on a gray background")  # fmt: skip


def concurrently(jobs: list[Callable[[], object]]) -> float:
    """Start every job in its own thread at once; the seconds until the last is done."""
    barrier = threading.Barrier(len(jobs) + 1)
    errors: list[BaseException] = []

    def work(job: Callable[[], object]) -> None:
        barrier.wait()
        try:
            job()
        except BaseException as error:  # (re-raised below)
            errors.append(error)

    threads = [threading.Thread(target=work, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def row(model: str, count: int, times: dict[str, list[float]]) -> dict:
    """One printed row: ``count`` requests served per request and batched, ``times`` per turn."""
    return {"model": model, "concurrent": count,
            "per_request_rps": count / statistics.median(times["per request"]),
            "batched_rps": count / statistics.median(times["batched"]),
            "speedup": ratio_quartiles(times["per request"], times["batched"])}  # fmt: skip


def app_rows(concurrent: list[int], rounds: int) -> list[dict]:
    from dsas_diffusion.app import actions
    from dsas_diffusion.app.batching import RequestBatcher
    from dsas_diffusion.app.serving import ModelCache, configure_torch_threads
    from dsas_diffusion.app.validation import GenerateSettings
    from dsas_diffusion.shapes import example_steerings
    from dsas_diffusion.steering import Steerer

    entry = ModelCache().get("shapes-sd")
    steerers = {name: Steerer.from_pretrained(path) for name, path in example_steerings().items()}
    cores = torch.get_num_threads()

    def requests(count: int) -> list[tuple[Steerer, GenerateSettings]]:
        chosen = []
        for i in range(count):
            settings = GenerateSettings(PROMPTS[i % len(PROMPTS)], seed=i, steps=8, guidance=7.5,
                                        strength=STRENGTHS[i % len(STRENGTHS)], size=0)  # fmt: skip
            steerer = steerers["banana" if i % 2 == 0 else "red"]
            chosen.append((steerer, actions.checked_settings(entry, settings)))
        return chosen

    def per_request(chosen) -> float:
        configure_torch_threads(len(chosen))
        try:
            return concurrently([lambda r=r: actions.generate(entry, *r, score=False) for r in chosen])
        finally:
            torch.set_num_threads(cores)

    # one batcher for the whole run, as the app has one (its worker thread keeps torch's threads)
    batcher = RequestBatcher(lambda key, items: actions.generate_many(entry, items, score=False))

    def batched(chosen) -> float:
        return concurrently([lambda r=r: batcher.submit(actions.batch_key(entry, r[1]), r) for r in chosen])

    actions.generate_many(entry, requests(2), score=False)  # warm-up
    batched(requests(2))
    # what batching does to the stock pipeline itself: a prompt's image in a batch against alone
    pipe, prompt = entry.pipeline, PROMPTS[0]

    def stock(rows: int):
        generators = [torch.Generator().manual_seed(0) for _ in range(rows)]
        return pipe([prompt] * rows, generator=generators, num_inference_steps=8, guidance_scale=7.5,
                    output_type="np").images  # fmt: skip

    alone = stock(1)[0]
    for rows in (3, 3 * max(concurrent)):
        together = stock(rows)
        difference = abs(together - alone).max()
        levels = abs((together * 255).round() - (alone * 255).round()).max()
        print(f"stock pipeline, {rows} rows against alone: at most {difference:.1e} (float), {levels:.0f} of 255")
    rows = []
    for count in concurrent:
        chosen = requests(count)
        turns = {"per request": lambda c=chosen: per_request(c), "batched": lambda c=chosen: batched(c)}
        rows.append(row(f"shapes-sd app (CPU, {cores} threads)", count, alternate(turns, rounds)))
        print(f"{count} concurrent: done", flush=True)
    return rows


def denoiser_rows(concurrent: list[int], rounds: int, small: bool, device: torch.device) -> list[dict]:
    from overhead_gpu import models

    from dsas_diffusion.diffusion import hook_points
    from dsas_diffusion.steering import fit_steerer

    dtype = torch.float16 if device.type == "cuda" else torch.float32

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rows = []
    for label, denoiser, make_call in models(small, device, dtype):
        sets = [[make_call(seed)] * 4 for seed in range(3)]
        steerer = fit_steerer(
            denoiser, hook_points(denoiser, "blocks"), *sets, map="linear-act", gate_threshold=None,
            forward=lambda c, model=denoiser: model(**c), mask_fn=lambda c: None, max_imbalance=10.0, progress=False,
        )  # fmt: skip
        for count in concurrent:
            strengths = [STRENGTHS[i % len(STRENGTHS)] / 4 for i in range(count)]
            together, alone = make_call(99, 2 * count), make_call(99)

            @torch.no_grad()
            def per_request(strengths=strengths, alone=alone, steerer=steerer, denoiser=denoiser) -> float:
                sync()
                start = time.perf_counter()
                for strength in strengths:
                    with steerer.apply(denoiser, strength=strength):
                        denoiser(**alone)
                sync()
                return time.perf_counter() - start

            @torch.no_grad()
            def batched(strengths=strengths, together=together, steerer=steerer, denoiser=denoiser) -> float:
                sync()
                start = time.perf_counter()
                with steerer.apply(denoiser, strength=strengths):  # one λ per request, over both halves
                    denoiser(**together)
                sync()
                return time.perf_counter() - start

            per_request(), batched()  # warm-up
            times = alternate({"per request": per_request, "batched": batched}, rounds)
            rows.append(row(label.replace("batch 2", "batch 2 per request"), count, times))
            print(f"{label}, {count} requests: done", flush=True)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrent", type=int, nargs="+", default=[1, 4, 16], help="requests at once")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--denoisers", action="store_true", help="full-size random-weight denoisers, one call")
    parser.add_argument("--small", action="store_true", help="with --denoisers: tiny configurations (CPU check)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA device here")
    start = time.perf_counter()
    if args.denoisers:
        rows = denoiser_rows(args.concurrent, args.rounds, args.small, device)
    else:
        if device.type != "cpu":
            parser.error("the app part runs on the CPU; use --denoisers for a GPU")
        rows = app_rows(args.concurrent, args.rounds)
    print("\n| model | concurrent requests | per request, requests/s | batched, requests/s | batched / per request |")
    print("|---|---|---|---|---|")
    for row in rows:
        median, low, high = row["speedup"]
        print(f"| {row['model']} | {row['concurrent']} | {row['per_request_rps']:.2f} | {row['batched_rps']:.2f} | "
              f"**{median:.2f}** [{low:.2f}, {high:.2f}] |")  # fmt: skip
    print(f"\n{time.perf_counter() - start:.0f} s in all")
    return rows


if __name__ == "__main__":
    main()
