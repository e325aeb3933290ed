"""Per-token gates as coloured text: HTML (the app, notebooks) and ANSI (the terminal).

Each token gets a background whose strength is its gate (0: none, 1: full); tokens without a
gate (padding, after the end of text, the last token) are left plain.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["render_gates"]


def _clean(token: str) -> str:
    """Byte-level BPE and SentencePiece spaces as spaces, newlines as a visible mark."""
    return token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "↵").replace("\n", "↵")


def _level(gate: float) -> float | None:
    return None if gate is None or math.isnan(gate) else min(max(float(gate), 0.0), 1.0)


def render_gates(tokens: Sequence[str], gates: Sequence[float], format: str = "html") -> str:
    """``tokens`` coloured by ``gates`` (one value per token, NaN for none).

    Examples:
        >>> render_gates(["a", "Ġbanana"], [0.0, 1.0], format="html")
        '<span class="dsas-gates"><span title="gate 0.00" style="background: rgba(220, 60, 40, 0.00)">a</span><span title="gate 1.00" style="background: rgba(220, 60, 40, 1.00)"> banana</span></span>'
        >>> render_gates(["a", "Ġbanana"], [0.0, float("nan")], format="ansi")
        '\\x1b[48;2;255;255;255ma\\x1b[0m banana'
    """
    if len(tokens) != len(gates):
        raise ValueError(f"{len(tokens)} tokens but {len(gates)} gate values")
    if format == "html":
        spans = []
        for token, gate in zip(tokens, gates, strict=True):
            level = _level(gate)
            text = html.escape(_clean(token))
            if level is None:
                spans.append(f"<span>{text}</span>")
            else:
                spans.append(
                    f'<span title="gate {level:.2f}" style="background: rgba(220, 60, 40, {level:.2f})">{text}</span>'
                )
        return '<span class="dsas-gates">' + "".join(spans) + "</span>"
    if format == "ansi":
        parts = []
        for token, gate in zip(tokens, gates, strict=True):
            level = _level(gate)
            text = _clean(token)
            if level is None:
                parts.append(text)
            else:  # white (closed) to red (open)
                green_blue = round(255 * (1 - level))
                parts.append(f"\x1b[48;2;255;{green_blue};{green_blue}m{text}\x1b[0m")
        return "".join(parts)
    raise ValueError(f"format must be 'html' or 'ansi', got {format!r}")
