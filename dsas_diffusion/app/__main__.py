"""``python -m dsas_diffusion.app``: serve the demo (see ``--help``)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from .ui import main

main()
