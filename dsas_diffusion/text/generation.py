"""What :meth:`~.model.DSASLanguageModel.generate` returns, and the position ids of left-padded batches."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..steering import SteeringError

__all__ = ["TextGeneration", "position_ids"]


@dataclass
class TextGeneration:
    """What :meth:`DSASLanguageModel.generate` returns.

    ``sequences``: prompt and continuation ids, ``(batch, length)`` (prompts left-padded);
    ``prompt_length``: the padded prompt width; ``texts``: the decoded continuations;
    ``gate_maps``: with ``return_gate_maps``, ``{steerer: {layer: (batch, length) float}}``,
    the gate of each token as it was forwarded, NaN at padding, after the first end-of-text
    token and at the last token (never forwarded).
    """

    texts: list[str]
    sequences: torch.Tensor
    prompt_length: int
    gate_maps: dict[str, dict[str, torch.Tensor]] | None = None
    tokens: list[list[str]] = field(default_factory=list)
    mask: torch.Tensor | None = None  # (batch, length): real tokens (what ``tokens`` lists)

    def render(self, row: int = 0, layer: str | None = None, steerer: str | None = None, format: str = "ansi") -> str:
        """Row ``row``'s tokens coloured by their gates at ``layer`` (default: the middle
        hooked layer) of ``steerer`` (default: the first), as ANSI or HTML."""
        from .render import render_gates

        if not self.gate_maps or self.mask is None:
            raise SteeringError("no gate maps: generate with return_gate_maps=True")
        maps = self.gate_maps[steerer or next(iter(self.gate_maps))]
        names = list(maps)
        gates = maps[layer or names[len(names) // 2]][row][self.mask[row].cpu()]
        return render_gates(self.tokens[row], gates.tolist(), format=format)


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generation uses with left padding (0 at each row's first real token)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
