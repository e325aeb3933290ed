"""Train the Shapes models from a seed: ``python -m dsas_diffusion.shapes.train {vae,clip,sd,mmdit,lm,all}``.

Each target writes its checkpoint with the library's own ``save_pretrained`` layout under
``--out`` (default: the package's ``weights/`` folder, where the shipped models live).
Intermediate full-precision models go to ``--work-dir``. A GPU is used when present. The
recipes live in :mod:`dsas_diffusion.shapes.training`, one module per model.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from .hub import WEIGHTS_DIR
from .training import (
    DEFAULT_WORK_DIR,
    MMDIT_STAGES,
    SD_STAGES,
    train_clip,
    train_mmdit,
    train_sd,
    train_stages,
    train_vae,
)
from .training.common import training_device
from .training.lm import train_lm

__all__ = ["RECIPES", "main"]

#: target name -> ``run(out, work_dir, **kwargs)``, in the order ``all`` trains them
RECIPES: dict[str, Callable[..., Path]] = {
    "vae": lambda out, work_dir, **kwargs: train_vae(work_dir, **kwargs),
    "clip": lambda out, work_dir, **kwargs: train_clip(out, **kwargs),
    "sd": lambda out, work_dir, **kwargs: train_stages(train_sd, SD_STAGES, "shapes-sd", work_dir, out, **kwargs),
    "mmdit": lambda out, work_dir, **kwargs: train_stages(
        train_mmdit, MMDIT_STAGES, "shapes-mmdit", work_dir, out, **kwargs
    ),
    "lm": lambda out, work_dir, **kwargs: train_lm(out, **kwargs),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", choices=[*RECIPES, "all"])
    parser.add_argument("--out", type=Path, default=WEIGHTS_DIR)
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimiser steps (default: the shipped recipe's; for sd and mmdit, of their last stage)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kwargs = {"seed": args.seed}
    if args.steps is not None:
        kwargs["steps"] = args.steps
    start = time.time()
    targets = list(RECIPES) if args.target == "all" else [args.target]
    for target in targets:
        RECIPES[target](args.out, args.work_dir, **kwargs)
    print(f"done in {(time.time() - start) / 60:.1f} min on {training_device()}")


if __name__ == "__main__":
    main()
