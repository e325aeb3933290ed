"""How well ``shapes-lm`` has learnt the Shapes text world: the three quality bars, measured.

    python benchmarks/shapes_lm_quality.py [--model shapes-lm] [--samples 1000]

1. Grammar: documents sampled at temperature 1 from ``<bos>`` alone, and continuations of the
   first sentences of held-out documents (ended by ``<eos>``): the share whose every sentence
   is a sentence of the grammar (``sentence_error``; bar: at least 95%), and, stricter, the
   share that are whole consistent documents (``parse_document``: references name objects
   that are there, one background, the right count).
2. Register: after a neutral first sentence, the share of continuations with a negative
   sentence, beside the generator's own share after the same prompts (the held-out documents'
   later sentences). Bar: the model's share at most the generator's.
3. Cross-entropy: nats per token on held-out documents, beside the generator's exact entropy
   on the same documents. Bar: within 0.05 nats per token. Then where the gap lies: the
   model's nats on each sentence (its words and full stop) and on ``<eos>``, beside the
   generator's (the sentence's own choices and the plan read up to it,
   ``Document.sentence_log_probs`` and ``kind_log_probs``), by kind of sentence.

Shares come with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from dsas_diffusion.shapes.text import (
    InvalidText,
    kind_log_probs,
    negative_sentences,
    parse_document,
    sample_document,
    sentence_error,
    split_sentences,
)
from dsas_diffusion.shapes.training.lm import HELD_OUT_SEED, heldout_cross_entropy, token_losses
from dsas_diffusion.text import DSASLanguageModel


def wilson(hits: int, total: int, z: float = 1.96) -> tuple[float, float, float]:
    """The share ``hits / total`` and its 95% Wilson interval."""
    share = hits / total
    centre = (share + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return share, max(0.0, centre - half), min(1.0, centre + half)


def _share(hits: int, total: int) -> str:
    share, low, high = wilson(hits, total)
    return f"{100 * share:.1f}% [{100 * low:.1f}, {100 * high:.1f}] ({hits}/{total})"


@torch.no_grad()
def sample(lm: DSASLanguageModel, prompts: list[str], batch_size: int = 100, seed: int = 0) -> list[str | None]:
    """Prompt plus continuation, sampled at temperature 1; ``None`` where no ``<eos>`` came."""
    tokenizer, model = lm.tokenizer, lm.model
    torch.manual_seed(seed)
    texts: list[str | None] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = tokenizer(chunk, return_tensors="pt", padding=True)
        out = model.generate(**batch, do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=96,
                             pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        for row in out:
            ended = bool((row[batch["input_ids"].shape[1] :] == tokenizer.eos_token_id).any())
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip() if ended else None)
    return texts


def sentences_valid(text: str | None) -> bool:
    """Every sentence of ``text`` is a sentence of the grammar (and ``<eos>`` came)."""
    if text is None:
        return False
    try:
        return all(sentence_error(sentence) is None for sentence in split_sentences(text))
    except InvalidText:
        return False


def consistent(text: str | None) -> bool:
    """``text`` is a whole document of the grammar (and ``<eos>`` came)."""
    if text is None:
        return False
    try:
        parse_document(text)
    except InvalidText:
        return False
    return True


def gap_by_kind(lm: DSASLanguageModel, documents: list) -> dict[str, list[float]]:
    """``{kind: [model nats, generator nats, sentences]}`` over ``documents``; the kind "end" is
    the ``<eos>`` after the last full stop."""
    full_stop = lm.tokenizer.convert_tokens_to_ids(".")
    table: dict[str, list[float]] = {}
    for document, (ids, losses) in zip(
        documents, token_losses(lm.model, lm.tokenizer, [d.text for d in documents]), strict=True
    ):
        ends = [i + 1 for i, token in enumerate(ids) if token == full_stop]
        model = [float(losses[a:b].sum()) for a, b in zip([0, *ends], [*ends, len(ids)], strict=True)]
        plan = kind_log_probs(document.kinds)
        generator = [-(p + q) for p, q in zip(plan, document.sentence_log_probs, strict=False)] + [-plan[-1]]
        for kind, m, g in zip([*document.kinds, "end"], model, generator, strict=True):
            row = table.setdefault(kind, [0.0, 0.0, 0])
            row[0], row[1], row[2] = row[0] + m, row[1] + g, row[2] + 1
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-lm")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    start = time.time()
    lm = DSASLanguageModel.from_pretrained(args.model)
    n = args.samples
    held_out = [sample_document(HELD_OUT_SEED + i) for i in range(n)]

    free = sample(lm, [""] * n, seed=1)
    prompted = sample(lm, [d.sentences[0] + "." for d in held_out], seed=2)
    neutral = [i for i, d in enumerate(held_out) if not d.negative[0]]
    model_negative = sum(
        negative_sentences(prompted[i]) > 0 for i in neutral if prompted[i] is not None
    )  # the prompt is neutral, so any negative sentence is in the continuation
    generator_negative = sum(any(held_out[i].negative[1:]) for i in neutral)
    entropy = heldout_cross_entropy(lm.model, lm.tokenizer, count=n)
    gap = entropy["model"] - entropy["generator"]

    print(f"| measure ({args.model}, {n} documents per row) | value | bar |")
    print("|---|---|---|")
    for label, texts in (("sampled from `<bos>`", free), ("held-out first sentence + continuation", prompted)):
        print(f"| every sentence valid, {label} | {_share(sum(map(sentences_valid, texts)), n)} | ≥ 95% |")
        print(f"| consistent document, {label} | {_share(sum(map(consistent, texts)), n)} | |")
    print(
        f"| negative sentence after a neutral first sentence: model | {_share(model_negative, len(neutral))} | "
        "≤ generator |"
    )
    print(
        f"| negative sentence after a neutral first sentence: generator | {_share(generator_negative, len(neutral))} | |"
    )
    print(
        f"| nats per token on held-out documents: model / generator | {entropy['model']:.4f} / "
        f"{entropy['generator']:.4f} (gap {gap:+.4f}, {entropy['tokens']} tokens) | gap ≤ 0.05 |"
    )
    table = gap_by_kind(lm, held_out)
    gap_nats = sum(m - g for m, g, _ in table.values())
    print("\n| sentence kind | sentences | model − generator, nats per sentence | share of the gap |")
    print("|---|---|---|---|")
    for kind, (m, g, count) in sorted(table.items(), key=lambda item: item[1][1] - item[1][0]):
        print(f"| {kind} | {count} | {(m - g) / count:+.3f} | {(m - g) / gap_nats:.2f} |")
    print(f"\n{(time.time() - start) / 60:.1f} min")


if __name__ == "__main__":
    main()
