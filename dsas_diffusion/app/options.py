"""The options of ``python app.py``, ``python -m dsas_diffusion.app`` and ``dsas demo``
(argparse only: building them loads neither torch nor gradio)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_MODEL", "add_server_arguments"]

DEFAULT_MODEL = "shapes-sd"


def add_server_arguments(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    """The options of ``python app.py`` and ``dsas demo``."""
    parser.add_argument("--model", default=default_model, help="model shown when the page opens")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=int, default=4, help="requests served at once")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads per request (default: cores / concurrency)"
    )
