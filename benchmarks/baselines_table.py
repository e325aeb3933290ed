"""The side-by-side tables of docs/baselines.md, from finished `dsas eval` runs.

    python benchmarks/baselines_table.py outputs/baselines-banana [outputs/baselines-red ...]
        [--similarity 0.98 0.95] [--pictures docs/images]

Per run and control similarity: every method at its best setting within it (steering: the
strongest λ or the best one, as in `operating.csv`'s rule 'best'; the baselines: their best
grid setting and their default), with 95% bootstrap intervals. With ``--pictures``, per run
``baselines_<model>_<concept>_empty.png``: empty-prompt images (half of them showing the
concept unsteered) under each steering method at its rendered strength nearest to its best
point within the first similarity, and each baseline at its default setting.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

COLUMNS = {  # operating.csv column -> table heading
    "concept_drawn": "named",
    "unasked_drawn": "unasked",
    "unasked_similarity": "unasked sim.",
    "unasked_change": "unasked Δ",
    "spatial_removed": "removed",
    "spatial_kept": "kept",
    "outside_change": "outside Δ",
    "inside_change": "inside Δ",
}


def cell(line: dict[str, str], key: str, interval: bool = True) -> str:
    value = line.get(key, "")
    if value in ("", "None"):
        return "-"
    low, high = line.get(f"{key}_low", ""), line.get(f"{key}_high", "")
    digits = 1 if key.endswith("change") else 2
    text = f"{float(value):.{digits}f}"
    if interval and low not in ("", "nan") and high not in ("", "nan"):
        text += f" [{float(low):.{digits}f}, {float(high):.{digits}f}]"
    return text


def header(out: Path) -> str:
    run = json.loads((out / "run.json").read_text())
    rows = json.loads((out / "rows.json").read_text())
    unsteered = [r for r in rows if r["method"] == "unsteered"]
    concept = [r["concept_drawn"] for r in unsteered if r["group"] == "concept" and r.get("concept_drawn") is not None]
    empty = [r["concept_drawn"] for r in unsteered if r["group"] == "empty"]
    config = run["config"]
    return (
        f"**{config['model']}, {config['concept']}**: unsteered, the concept is drawn on "
        f"{sum(concept) / max(len(concept), 1):.2f} of the named images and on {int(sum(empty))} of "
        f"{len(empty)} empty-prompt images; {len(run.get('pair_units') or [])} two-object units; "
        f"{run['images']} images ({run['generated']} rendered by the last run)."
    )


def table(out: Path, similarity: float) -> str:
    with (out / "operating.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    chosen = [
        line
        for line in lines
        if (line["rule"] == "best" and float(line["similarity"]) == similarity) or line["rule"] == "default"
    ]
    heads = ["method", "setting", "control sim.", *COLUMNS.values()]
    text = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for line in chosen:
        name = line["method"] + (" (default)" if line["rule"] == "default" else "")
        setting = float(line["strength"])
        shown = f"{setting:g}" if setting else "none within (unsteered)"
        cells = [name, shown, cell(line, "control_similarity", interval=False)]
        cells += [cell(line, key) for key in COLUMNS]
        text.append("| " + " | ".join(cells) + " |")
    return "\n".join(text)


def empty_picture(out: Path, similarity: float, path: Path, per_side: int = 6) -> None:
    from PIL import Image

    from dsas_diffusion.diffusion.visual import image_grid

    rows = json.loads((out / "rows.json").read_text())
    with (out / "operating.csv").open() as handle:
        lines = list(csv.DictReader(handle))
    # steering at its best point, a baseline at its default setting
    best = {line["method"]: float(line["strength"]) for line in lines
            if line["rule"] == "best" and float(line["similarity"]) == similarity}  # fmt: skip
    best.update({line["method"]: float(line["strength"]) for line in lines if line["rule"] == "default"})
    empty = [r for r in rows if r["group"] == "empty"]
    shown = sorted(r["seed"] for r in empty if r["method"] == "unsteered" and r["concept_drawn"] == 1.0)
    others = sorted(r["seed"] for r in empty if r["method"] == "unsteered" and r["concept_drawn"] != 1.0)
    seeds = shown[:per_side] + others[:per_side]
    cells = {(r["method"], r["strength"], r["seed"]): out / r["image"] for r in empty}
    grid, labels = [], []
    for method, strength in [("unsteered", 0.0), *best.items()]:
        rendered = sorted({s for m, s, _ in cells if m == method}, key=lambda s: abs(s - strength))
        if not rendered:
            continue
        chosen = 0.0 if strength == 0.0 else rendered[0]
        grid.append([Image.open(cells[(method if chosen else "unsteered", chosen, seed)]) for seed in seeds])
        labels.append(f"{method} {chosen:g}" if method != "unsteered" else "unsteered")
    config = json.loads((out / "run.json").read_text())["config"]
    title = (f"{config['model']}, {config['concept']}: the empty prompt; left {len(shown[:per_side])} seeds show it "
             f"unsteered, right {len(others[:per_side])} do not (steering at its best point within similarity {similarity:g}, baselines at their default)")  # fmt: skip
    image_grid(grid, scale=2, title=title, row_labels=labels, label_width=130, gap=2).save(path)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--similarity", nargs="+", type=float, default=[0.98, 0.95])
    parser.add_argument("--pictures", type=Path, help="a folder for each image run's empty-prompt picture")
    args = parser.parse_args()
    for out in args.runs:
        if args.pictures is not None and (out / "rows.json").is_file():
            config = json.loads((out / "run.json").read_text())["config"]
            if config.get("empty_seeds"):
                name = f"baselines_{config['model']}_{config['concept']}_empty.png"
                empty_picture(out, args.similarity[0], args.pictures / name)
        print(header(out) + "\n")
        for similarity in args.similarity:
            print(f"Control similarity ≥ {similarity:g}:\n\n{table(out, similarity)}\n")


if __name__ == "__main__":
    main()
