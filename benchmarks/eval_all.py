"""The evaluation protocol over the five Shapes concepts: tuning concepts first, held-out last.

    python benchmarks/eval_all.py                       # banana, red, star, then green, triangle
    python benchmarks/eval_all.py --concepts banana     # one concept (resumes through the cache)
    python benchmarks/eval_all.py --set '{"seeds": [0], "bootstrap": 100}' --out-root outputs/try
    python benchmarks/eval_all.py --text                # shapes-lm: banana, red, negative

Each concept runs ``dsas eval --config benchmarks/eval_<concept>.yaml`` (images cached in one
shared folder, so an interrupted run resumes where it stopped), then this prints every
method's operating points with their intervals, one table per concept, and the run's time.
"""

from __future__ import annotations

import argparse
import csv
import json
import time
from pathlib import Path

from dsas_diffusion.eval import load_config, run_evaluation
from dsas_diffusion.shapes import HELD_OUT_CONCEPTS, TEXT_CONCEPTS, TUNING_CONCEPTS

HERE = Path(__file__).resolve().parent


def _cell(row: dict[str, str], key: str) -> str:
    if not row.get(key) or row[key] == "nan":  # nan: no unit counted (e.g. no pair showed both objects)
        return "-"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if not low or low == "nan":
        return f"{float(row[key]):.2f}"
    return f"{float(row[key]):.2f} [{float(low):.2f}, {float(high):.2f}]"


def table(out: Path, text: bool = False) -> str:
    """Markdown: the operating points of one concept's run (``operating.csv``): per
    threshold the strongest setting within it and the best one (least concept presence)."""
    with (out / "operating.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    header = (
        "control prefix match | point | λ | concept rate | word list"
        if text
        else ("control similarity | point | λ | concept drawn | CLIP presence")
    )
    lines = [
        f"| method | {header} | spatial: removed | spatial: kept |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        end = row["rule"] == "strongest" and row["reached"] != "True"
        strength = f"{float(row['strength']):.2f}" + (" (end of sweep)" if end else "")
        cells = [_cell(row, key) for key in ("concept_drawn", "concept_presence", "spatial_removed", "spatial_kept")]
        lines.append(
            f"| {row['method']} | ≥ {row['similarity']} | {row['rule']} | {strength} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=None, help="default: all of the modality's concepts")
    parser.add_argument("--text", action="store_true", help="the text evaluation (eval_text_<concept>.yaml)")
    parser.add_argument("--set", default="{}", help="config fields to override, as JSON (e.g. fewer seeds)")
    parser.add_argument("--out-root", type=Path, default=None, help="write each concept to OUT_ROOT/eval-<concept>")
    args = parser.parse_args(argv)
    overrides = json.loads(args.set)
    concepts = args.concepts or (list(TEXT_CONCEPTS) if args.text else [*TUNING_CONCEPTS, *HELD_OUT_CONCEPTS])
    for concept in concepts:
        fields = dict(overrides)
        if args.out_root is not None:
            fields["out"] = str(args.out_root / f"eval-{concept}")
            fields.setdefault("cache_dir", str(args.out_root / "eval-images"))
        config = load_config(HERE / f"eval_{'text_' if args.text else ''}{concept}.yaml", fields)
        start = time.time()
        result = run_evaluation(config, progress=False)
        held_out = " (held out)" if concept in HELD_OUT_CONCEPTS and not args.text else ""
        outputs = "continuations" if args.text else "images"
        print(
            f"\n### {concept}{held_out}: {result.generated} {outputs} generated, {result.reused} from the cache, "
            f"{(time.time() - start) / 60:.1f} min\n"
        )
        print(table(Path(config.out), text=args.text))


if __name__ == "__main__":
    main()
