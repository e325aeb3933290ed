"""What ``DSASLanguageModel`` predicts, to compare vLLM's log-probabilities with."""

from __future__ import annotations

import torch

from dsas_diffusion import DSASLanguageModel


def log_probs(lm: DSASLanguageModel, ids: list[int], prompt: int, strength: float, cached: bool) -> torch.Tensor:
    """``DSASLanguageModel``'s log-probabilities of each token of ``ids`` after the first
    ``prompt``, at ``strength``: in one pass over ``ids``, or (``cached``) the prompt and then one
    token at a time with the KV cache, as ``generate`` runs."""
    with lm.steering(strength), torch.no_grad():
        if not cached:
            logits = lm.model(torch.tensor([ids])).logits[0, prompt - 1 : -1]
        else:
            out = lm.model(torch.tensor([ids[:prompt]]), use_cache=True)
            rows = [out.logits[0, -1]]
            for token in ids[prompt:-1]:
                out = lm.model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
                rows.append(out.logits[0, -1])
            logits = torch.stack(rows)
    return torch.log_softmax(logits.float(), dim=-1)
