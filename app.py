"""Gradio demo of DSAS steering: ``python app.py`` (http://127.0.0.1:7860; ``--help`` for options).

The app lives in :mod:`dsas_diffusion.app`; ``dsas demo`` and ``python -m dsas_diffusion.app``
serve the same page from an installed package.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dsas_diffusion.app import build_demo, main

__all__ = ["build_demo", "main"]

if __name__ == "__main__":
    main()
