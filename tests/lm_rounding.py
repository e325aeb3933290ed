"""What rounding can move in a steered language model, to tell a rounding difference between two
computations (cached or not, batched or alone, vLLM or transformers) from a steering error.

A steered model's log-probabilities are computed again with the token embeddings multiplied by
``1 + size * noise``: how far they move is what another engine's or kernel's rounding can move
them by, steep gates amplifying it as they amplify rounding."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from dsas_diffusion import DSASLanguageModel

#: the relative size of the embeddings' perturbation: a few float32 roundings
SIZE = 1e-6


def perturbed_logits(
    lm: DSASLanguageModel,
    ids: list[int],
    strength: float | Mapping[str, float],
    *,
    gate: str = "dsas",
    log_probs: bool = False,
    draws: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(logits, move)``, both ``(len(ids), vocabulary)``: the steered model's logits (or, with
    ``log_probs``, log-probabilities) in one uncached pass over ``ids``, and the largest move of
    each over ``draws`` seeded perturbations of the embeddings."""

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        logits = lm.model(inputs_embeds=embeddings).logits[0].float()
        return torch.log_softmax(logits, -1) if log_probs else logits

    with lm.steering(strength, gate=gate), torch.no_grad():
        embeddings = lm.model.get_input_embeddings()(torch.tensor([ids]))
        exact = forward(embeddings)
        moves = []
        for draw in range(draws):
            noise = torch.randn(embeddings.shape, generator=torch.Generator().manual_seed(draw))
            moves.append((forward(embeddings * (1 + SIZE * noise)) - exact).abs())
    return exact, torch.stack(moves).amax(0)


def rounding_jitter(lm: DSASLanguageModel, ids: list[int], prompt: int, strength: float) -> torch.Tensor:
    """Per token of ``ids`` after the first ``prompt``: how far rounding can move the steered
    model's log-probability of it (its largest move under :func:`perturbed_logits`)."""
    _, move = perturbed_logits(lm, ids, strength, log_probs=True)
    return move[prompt - 1 : -1].gather(1, torch.tensor(ids[prompt:])[:, None])[:, 0]


def assert_greedy_agrees(
    lm: DSASLanguageModel,
    prompt: str,
    first: list[int],
    second: list[int],
    strength: float | Mapping[str, float],
    *,
    gate: str = "dsas",
) -> None:
    """Two greedy continuations of ``prompt`` (new token ids) from computations that round
    differently are equal, or equal up to a token where the steered model's two candidates lie
    within what rounding can move them by (ten times the largest move under perturbation, at
    least 1e-5): a tie that rounding decides, after which they may differ. Anything else fails."""
    pairs = enumerate(zip(first, second, strict=False))  # one may end earlier, at its end of text
    position = next((index for index, (one, other) in pairs if one != other), None)
    if position is None:
        return
    one, other = first[position], second[position]
    ids = lm.tokenizer(prompt).input_ids + first[:position]
    logits, move = perturbed_logits(lm, ids, strength, gate=gate)
    gap = abs(float(logits[-1, one] - logits[-1, other]))
    allowed = 10 * float(move[-1, one] + move[-1, other]) + 1e-5
    assert gap <= allowed, (
        f"the continuations of {prompt!r} differ at new token {position} ({one} against {other}), whose logits "
        f"lie {gap:.2e} apart: more than rounding can move them ({allowed:.2e}), so not a tie"
    )


def assert_texts_agree(
    lm: DSASLanguageModel, prompt: str, expected: str, served: str, strength: float | Mapping[str, float]
) -> None:
    """:func:`assert_greedy_agrees` for two greedy continuations given as text (a word-level
    tokenizer reads them back into the same tokens)."""
    if expected.strip() != served.strip():
        first, second = (lm.tokenizer(text.strip(), add_special_tokens=False).input_ids for text in (expected, served))
        assert_greedy_agrees(lm, prompt, first, second, strength)
