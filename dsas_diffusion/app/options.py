"""The options of ``python app.py``, ``python -m dsas_diffusion.app`` and ``dsas demo``
(argparse only: building them loads neither torch nor gradio)."""

from __future__ import annotations

import argparse

__all__ = ["DEFAULT_MODEL", "add_server_arguments", "at_least_one"]

DEFAULT_MODEL = "shapes-sd"


def at_least_one(text: str) -> int:
    """An argparse type: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_server_arguments(parser: argparse.ArgumentParser, default_model: str = DEFAULT_MODEL) -> None:
    """The options of ``python app.py`` and ``dsas demo``."""
    parser.add_argument("--model", default=default_model, help="model shown when the page opens")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also make a public gradio.live link (off by default)")
    parser.add_argument("--concurrency", type=at_least_one, default=4, help="requests served at once (>= 1)")
    parser.add_argument(
        "--max-batch-size",
        type=at_least_one,
        default=16,
        help="generate requests arriving together (same model, size, steps, guidance) share one pipeline call, "
        "at most this many (1: one call per request)",
    )
    parser.add_argument(
        "--threads",
        type=at_least_one,
        default=None,
        help="torch CPU threads per request (default: every core when generate requests are batched, else "
        "cores / concurrency)",
    )
    parser.add_argument(
        "--steering-root",
        action="append",
        default=None,
        dest="steering_roots",
        metavar="DIR",
        help="a folder under which the page may open steering directories (repeatable; default: the "
        "shipped examples and ./outputs)",
    )
