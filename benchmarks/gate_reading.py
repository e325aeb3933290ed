"""What should a gate read, and how can it be taught where the concept is? Ground truth on shapes-sd.

For each concept, renders the fitting sets (source, target, control; seed 0), development
prompts (``make_concept_sets(concept, seed=7)``, never the evaluation sets; seeds 0 and 1) and
the empty prompt (``--empty-seeds`` images), keeping at every cross-attention and every step its
query input, its output and the cross-attention probability mass of the concept's tokens.
Then, per layer, it fits a per-position gate (PCA + logistic, ``fit_gate``) on each feature
(``in``: the query input, ``out``: the output) from each labelling of the source positions:

* ``mask``: the Shapes detector's mask of the concept object (an oracle, for diagnosis only);
* ``attention``: positions whose cross-attention mass on the concept's tokens is at least one
  standard deviation above the image's mean (label 0: at most the mean);
* ``contrast``: positions where the query input differs most from the paired target run (at
  least half the image's largest difference; label 0: at most a tenth);
* ``contrast-out``: the same on the outputs.

Negatives add every control position. Reported: how each labelling agrees with the masks
(ROC-AUC), and per gate the ROC-AUC of mask positions against the rest of the image
(*spatial*), against control positions, and on the empty prompt's images against images
without the concept (*unasked*, also per step); and the share of mask positions above the
99% quantile of control positions (*open*).

    python benchmarks/gate_reading.py --concepts banana red star
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from dsas_diffusion.diffusion.architectures import hook_points
from dsas_diffusion.diffusion.loading import load_pipeline
from dsas_diffusion.eval.diagnostic import mask_coverage, roc_auc
from dsas_diffusion.shapes import TUNING_CONCEPTS, concept_prompts, make_concept_sets
from dsas_diffusion.shapes.detect import ShapeJudge, colour_mask, concept_mask, read_objects, unprompted_concept
from dsas_diffusion.steering.gate import fit_gate

LABELS = ("mask", "attention", "contrast", "contrast-out")
DEV_SEED = 7


def concept_tokens(tokenizer, prompt: str, concept: str) -> torch.Tensor:
    """1 at the prompt's tokens that spell ``concept``, over the padded sequence."""
    ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    word = tokenizer(concept).input_ids[1:-1]
    found = torch.zeros(len(ids))
    for start in range(len(ids) - len(word) + 1):
        if ids[start : start + len(word)] == word:
            found[start : start + len(word)] = 1
    return found


def capture(pipe, names, prompts, seeds, concept, steps):
    """Images, and per layer ``{"in", "out": (images, steps, positions, C), "attention":
    (images, steps, positions)}`` float16, conditional rows. Image ``i`` of a batch uses the
    batch's seed, as the evaluation does; the empty prompt's images use ``seed + i`` instead
    (one prompt: the seed is what makes its images differ)."""
    store = {name: {"in": [], "out": [], "attention": []} for name in names}
    tokens = {}
    handles = []
    for name in names:

        def hook(module, args, kwargs, output, name=name):
            query = args[0] if args else kwargs["hidden_states"]
            text = kwargs["encoder_hidden_states"]
            half = query.shape[0] // 2  # [unconditional; conditional]
            query, text, output = query[half:], text[half:], output[half:]
            q = module.to_q(query)
            k = module.to_k(text)
            batch, positions, _ = q.shape
            q = q.view(batch, positions, module.heads, -1).transpose(1, 2)
            k = k.view(batch, k.shape[1], module.heads, -1).transpose(1, 2)
            probabilities = (q @ k.transpose(-1, -2) * module.scale).softmax(-1).mean(1)
            store[name]["in"].append(query.half())
            store[name]["out"].append(output.half())
            store[name]["attention"].append((probabilities * tokens["mask"][:, None, :]).sum(-1).half())

        handles.append(pipe.unet.get_submodule(name).register_forward_hook(hook, with_kwargs=True))
    images, kept = [], {name: {key: [] for key in ("in", "out", "attention")} for name in names}
    try:
        for seed in seeds:
            for start in range(0, len(prompts), 16):
                chunk = prompts[start : start + 16]
                tokens["mask"] = torch.stack([concept_tokens(pipe.tokenizer, p, concept) for p in chunk])
                for parts in store.values():
                    for values in parts.values():
                        values.clear()
                one_prompt = len(set(prompts)) == 1
                generators = [
                    torch.Generator().manual_seed(seed + (start + i if one_prompt else 0)) for i in range(len(chunk))
                ]
                with torch.no_grad():
                    images += pipe(chunk, generator=generators, num_inference_steps=steps).images
                for name in names:
                    for key, values in store[name].items():
                        kept[name][key].append(torch.stack(values, 1))
    finally:
        for handle in handles:
            handle.remove()
    return images, {name: {key: torch.cat(v) for key, v in parts.items()} for name, parts in kept.items()}


def labelling(kind, acts, target_acts, mask_cover):
    """(positive, negative) boolean masks over the source positions (images, steps, positions)."""
    if kind == "mask":
        return mask_cover >= 0.5, mask_cover == 0
    if kind == "attention":
        mass = acts["attention"].float()
        z = (mass - mass.mean(-1, keepdim=True)) / mass.std(-1, keepdim=True).clamp_min(1e-6)
        return z >= 1.0, z <= 0.0
    feature = "in" if kind == "contrast" else "out"
    difference = (acts[feature].float() - target_acts[feature].float()).norm(dim=-1)
    top = difference.amax(-1, keepdim=True).clamp_min(1e-6)
    return difference >= 0.5 * top, difference <= 0.1 * top


def study(pipe, concept, args):
    names = [point.module for point in hook_points(pipe.unet, "cross-attention")]
    source, target, control = concept_prompts(concept)
    dev = make_concept_sets(concept, seed=DEV_SEED)
    render = {
        "source": (list(source), [0]),
        "target": (list(target), [0]),
        "control": (list(control), [0]),
        "concept": (dev["eval_concept"][: args.count], [0, 1]),
        "dev-control": (dev["eval_control"][: args.count], [0, 1]),
        "empty": ([""] * args.empty_seeds, [0]),  # seeds 0, 1, ..., empty_seeds - 1
    }
    runs = {group: capture(pipe, names, *sets, concept, args.steps) for group, sets in render.items()}
    judge = ShapeJudge()
    drawn = {"source": render["source"][0], "concept": render["concept"][0] * 2}  # seed-major
    masks = {
        group: torch.from_numpy(
            np.stack([concept_mask(im, p, concept) for im, p in zip(runs[group][0], prompts, strict=True)])
        )
        for group, prompts in drawn.items()
    }
    objects = read_objects(judge, runs["empty"][0])
    found = [colour_mask(im, unprompted_concept(o, concept)) for im, o in zip(runs["empty"][0], objects, strict=True)]
    masks["empty"] = torch.from_numpy(np.stack(found))
    shows = masks["empty"].flatten(1).any(1)
    rows = []
    for name in names:
        acts = {group: run[1][name] for group, run in runs.items()}
        positions = acts["source"]["in"].shape[2]
        cover = {
            g: mask_coverage(m, (round(positions**0.5),) * 2).unsqueeze(1).expand(acts[g]["in"].shape[:3])
            for g, m in masks.items()
        }
        clean = (~shows).view(-1, 1, 1).expand(cover["empty"].shape)
        row = {"concept": concept, "layer": name, "positions": positions, "unasked_images": int(shows.sum())}
        for kind in LABELS:
            positive, negative = labelling(kind, acts["source"], acts["target"], cover["source"])
            agreement = positive.float() - negative.float()
            row[f"label/{kind}"] = roc_auc(agreement[cover["source"] >= 0.5], agreement[cover["source"] == 0])
            for feature in ("in", "out"):
                x = acts["source"][feature].float()
                generator = torch.Generator().manual_seed(0)
                ones = x[positive]
                if len(ones) < 20:  # too few labelled positions to fit on (e.g. small objects on a coarse grid)
                    row[f"{feature}/{kind}"] = None
                    continue
                zeros = torch.cat([x[negative], acts["control"][feature].float().flatten(0, 2)])
                ones = ones[torch.randperm(len(ones), generator=generator)[:5000]]
                zeros = zeros[torch.randperm(len(zeros), generator=generator)[:5000]]
                gate = fit_gate(ones, zeros, n_components=min(16, x.shape[-1]), cv_folds=2)
                score = {
                    g: acts[g][feature].float() @ gate.weight + gate.bias for g in ("concept", "dev-control", "empty")
                }
                inside, away = cover["concept"] >= 0.5, cover["concept"] == 0
                unasked = cover["empty"] >= 0.5
                shut = torch.quantile(score["dev-control"].flatten()[::7], 0.99)
                row[f"{feature}/{kind}"] = {
                    "spatial": roc_auc(score["concept"][inside], score["concept"][away]),
                    "vs_control": roc_auc(score["concept"][inside], score["dev-control"]),
                    "unasked": roc_auc(score["empty"][unasked], score["empty"][clean]),
                    "open": round(float((score["concept"][inside] > shut).float().mean()), 3),
                    "open_unasked": round(float((score["empty"][unasked] > shut).float().mean()), 3)
                    if bool(unasked.any())
                    else None,
                    "unasked_by_step": [
                        roc_auc(score["empty"][:, s][unasked[:, s]], score["empty"][:, s][clean[:, s]])
                        for s in range(0, args.steps, 4)
                    ],
                }
        rows.append(row)
    rows.append(image_level(runs, names, shows, concept))
    return rows


def image_level(runs, names, shows, concept) -> dict:
    """Does the image show the concept? Per layer, the published pooled gate (source against
    control images, every step) on the query input averaged over positions, its score averaged
    over steps; and the mean of the layers' standardised scores. ROC-AUC of the concept prompts'
    images against the control prompts', and of the empty prompt's images showing the concept
    against those that do not."""
    row = {"concept": concept, "layer": "image-level", "positions": 0, "layers": {}}
    combined = {}
    for name in names:
        pooled = {
            g: runs[g][1][name]["in"].float().mean(2) for g in ("source", "control", "concept", "dev-control", "empty")
        }
        gate = fit_gate(pooled["source"].flatten(0, 1), pooled["control"].flatten(0, 1), n_components=16, cv_folds=2)
        score = {g: (v @ gate.weight + gate.bias).mean(1) for g, v in pooled.items()}
        spread = score["control"].std().clamp_min(1e-6)
        for g, v in score.items():
            combined.setdefault(g, []).append((v - score["control"].mean()) / spread)
        row["layers"][name] = {
            "named": roc_auc(score["concept"], score["dev-control"]),
            "unasked": roc_auc(score["empty"][shows], score["empty"][~shows]),
        }
    mean = {g: torch.stack(v).mean(0) for g, v in combined.items()}
    row["named"] = roc_auc(mean["concept"], mean["dev-control"])
    row["unasked"] = roc_auc(mean["empty"][shows], mean["empty"][~shows])
    return row


def summarise(results: list[dict]) -> None:
    """The table of docs/removal.md: per concept, labelling and feature, the mean over the
    layers of the finest grid (on coarser ones an unasked object rarely covers half a position),
    with the range over those layers; the unasked AUC also per step (steps 0, 4, 8, ...)."""
    print("\n| concept | labels | agree with masks | gate reads | spatial | vs control | unasked | open | "
          "open, unasked | unasked by step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for concept in dict.fromkeys(r["concept"] for r in results):
        rows = [r for r in results if r["concept"] == concept and r["layer"] != "image-level"]
        finest = max(r["positions"] for r in rows)
        rows = [r for r in rows if r["positions"] == finest]
        for kind in LABELS:
            agree = np.mean([r[f"label/{kind}"] for r in rows])
            for feature in ("in", "out"):
                found = [r[f"{feature}/{kind}"] for r in rows if r[f"{feature}/{kind}"]]
                if not found:
                    continue

                def cell(key, found=found):
                    values = np.array([np.nan if f[key] is None else f[key] for f in found], dtype=float)
                    if np.isnan(values).all():
                        return "n/a"
                    return f"{np.nanmean(values):.2f} ({np.nanmin(values):.2f}–{np.nanmax(values):.2f})"

                by_step = np.nanmean([f["unasked_by_step"] for f in found], axis=0) if cell("unasked") != "n/a" else []
                steps = " ".join(f"{v:.2f}" for v in by_step) or "n/a"
                print(f"| {concept} | {kind} | {agree:.2f} | {'input' if feature == 'in' else 'output'} | "
                      f"{cell('spatial')} | {cell('vs_control')} | {cell('unasked')} | {cell('open')} | "
                      f"{cell('open_unasked')} | {steps} |")  # fmt: skip
    print("\n| concept | named: best layer / layers together | unasked: best layer / layers together |")
    print("|---|---|---|")
    for row in (r for r in results if r["layer"] == "image-level"):
        best = {key: max(v[key] for v in row["layers"].values()) for key in ("named", "unasked")}
        print(f"| {row['concept']} | {best['named']:.2f} / {row['named']:.2f} | "
              f"{best['unasked']:.2f} / {row['unasked']:.2f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TUNING_CONCEPTS))
    parser.add_argument("--count", type=int, default=16, help="development prompts per group")
    parser.add_argument("--empty-seeds", type=int, default=128, help="empty-prompt images (seeds 0, 1, ...)")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--out", type=Path, default=Path("outputs/gate-reading"))
    parser.add_argument("--summary", type=Path, help="print the summary of an earlier run's gate_reading.json")
    args = parser.parse_args(argv)
    if args.summary is not None:
        summarise(json.loads(args.summary.read_text()))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    results = []
    for concept in args.concepts:
        start = time.time()
        rows = study(pipe, concept, args)
        results += rows
        print(f"\n{concept} ({time.time() - start:.0f} s; unasked images: {rows[0]['unasked_images']})")
        print(f"{'layer':<28} {'pos':>4} {'label':<13} {'agrees':>6}  {'feature':<7} {'spatial':>7} "
              f"{'vs ctl':>6} {'unasked':>7} {'open':>5} {'open unasked':>12}")  # fmt: skip
        for row in rows:
            if row["layer"] == "image-level":
                per_layer = ", ".join(f"{v['named']:.2f} / {v['unasked']:.2f}" for v in row["layers"].values())
                print(f"image-level (named / unasked AUC), per layer: {per_layer}; layers together: "
                      f"{row['named']:.2f} / {row['unasked']:.2f}")  # fmt: skip
                continue
            layer = row["layer"].removesuffix(".transformer_blocks.0.attn2")
            for kind in LABELS:
                for feature in ("in", "out"):
                    r = row[f"{feature}/{kind}"]
                    if r is None:
                        print(f"{layer:<28} {row['positions']:>4} {kind:<13} {'':>6}  {feature:<7} too few positions")
                        continue
                    unasked = "" if r["open_unasked"] is None else f"{r['open_unasked']:.2f}"
                    print(f"{layer:<28} {row['positions']:>4} {kind:<13} {row[f'label/{kind}']:>6.3f}  {feature:<7} "
                          f"{r['spatial']:>7.3f} {r['vs_control']:>6.3f} {r['unasked']:>7.3f} {r['open']:>5.2f} "
                          f"{unasked:>12}")  # fmt: skip
    summarise(results)
    (args.out / "gate_reading.json").write_text(json.dumps(results, indent=1))
    print(f"\nwritten to {args.out / 'gate_reading.json'}")


if __name__ == "__main__":
    main()
