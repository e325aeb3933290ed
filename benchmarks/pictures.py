"""Every picture the README and docs/ show, made again from what produces it (``make pictures``).

    python benchmarks/pictures.py [--only app demo samples pareto baselines] [--out docs/images]

- ``app``: the Gradio app and its Text tab, screenshots through the real browser (Debian's
  Chromium driven by Playwright, as ``tests/test_browser.py`` drives it; ``make chromium``
  installs it): ``app.png``, ``app_text.png``.
- ``demo``: ``make demo``'s comparison grid: ``banana_comparison.png``.
- ``samples``: the Shapes models' samples and the CLIP judge's zero-shot grid
  (``benchmarks/shapes_quality.py``; 10 minutes).
- ``pareto``: each evaluation's Pareto plot (``dsas eval --config benchmarks/eval_<concept>.yaml``,
  through its image cache: hours on 2 CPU cores the first time, seconds when nothing changed).
- ``baselines``: the comparison with a negative prompt, SLD and a prompt-level gate
  (``dsas eval --config benchmarks/baselines_<concept>.yaml``, hours the first time), and its
  empty-prompt pictures (``benchmarks/baselines_table.py --pictures``).

A change of defaults refreshes them all with one command.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("app", "demo", "samples", "pareto", "baselines")
#: the image runs of docs/baselines.md whose empty-prompt pictures the docs show
BASELINES = ("banana",)
#: evaluation config -> (its output folder's plot, the picture's name)
PARETO = {
    **{f"eval_{c}.yaml": (f"eval-{c}/pareto_detector.png", f"pareto_{c}.png") for c in
       ("banana", "red", "star", "green", "triangle")},
    **{f"eval_text_{c}.yaml": (f"eval-text-{c}/pareto.png", f"pareto_text_{c}.png") for c in
       ("banana", "red", "negative")},
}  # fmt: skip


def run(*command: str | Path) -> None:
    print("$", " ".join(str(part) for part in command), flush=True)
    subprocess.run([str(part) for part in command], cwd=ROOT, check=True)


def copy(source: Path, out: Path, name: str | None = None) -> None:
    target = out / (name or source.name)
    shutil.copyfile(source, target)
    print(f"wrote {target.relative_to(ROOT) if target.is_relative_to(ROOT) else target}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    outputs = ROOT / "outputs"
    if "app" in args.only:
        if shutil.which("chromium") is None:
            sys.exit("the screenshots need Debian's Chromium: run make chromium (or make pictures)")
        for name in ("app.png", "app_text.png"):  # no stale screenshot is copied
            (outputs / "test-artifacts" / name).unlink(missing_ok=True)
        run(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_browser.py", "-rs")
        for name in ("app.png", "app_text.png"):
            copy(outputs / "test-artifacts" / name, out)
    if "demo" in args.only:
        run(sys.executable, "-m", "dsas_diffusion.demo", "--out", outputs)
        copy(outputs / "banana_comparison.png", out)
    if "samples" in args.only:
        run(sys.executable, "benchmarks/shapes_quality.py", "--out", out)
    if "pareto" in args.only:
        for config, (plot, name) in PARETO.items():
            run(sys.executable, "-m", "dsas_diffusion.cli", "eval", "--config", f"benchmarks/{config}")
            copy(outputs / plot, out, name)
    if "baselines" in args.only:
        for concept in BASELINES:
            run(sys.executable, "-m", "dsas_diffusion.cli", "eval", "--config", f"benchmarks/baselines_{concept}.yaml")
        runs = [outputs / f"baselines-{concept}" for concept in BASELINES]
        run(sys.executable, "benchmarks/baselines_table.py", *runs, "--pictures", out)


if __name__ == "__main__":
    main()
