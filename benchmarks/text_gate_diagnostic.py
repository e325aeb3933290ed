"""Where the text gates open, token by token, on documents of the Shapes grammar (``shapes-lm``).

The grammar knows each sentence: whether it is negative, whether it names the concept. For each
shipped text example steering (``dsas examples --text``: banana, red and the negative register,
each with CAA, ITI and Linear-AcT) or a steering directory, documents drawn from seeds apart from
every fitting and evaluation set are read in one teacher-forced pass (``lm.gates``, at strength
``--strength``) and their tokens labelled:

* *concept*: the tokens of a sentence that carries the concept (names it; for ``negative``, a
  negative sentence), in documents that have one;
* *rest*: the other tokens of those documents;
* *neutral*: every token of documents with no such sentence;
* *after the cue*: the tokens of a concept document from its first concept word on (the word
  itself, ``banana`` or ``red``, or the first negative word): where the concept is in the
  context that a causal gate reads.

Printed per layer: the ROC-AUC of the gate's score (the gate as a plain sigmoid: no floor, no
step, so that a calibration does not tie tokens at 0) on concept tokens against neutral tokens,
and on the tokens after the cue against neutral tokens, the mean gate (as it steers) on each
kind of token, and whether the layer is kept (its gate enabled by the fit).

    python benchmarks/text_gate_diagnostic.py --concepts banana red negative
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dsas_diffusion.eval.diagnostic import roc_auc
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes.examples import TEXT_EXAMPLE_FIT, TEXT_EXAMPLE_MAPS, text_example_steerings
from dsas_diffusion.shapes.text import sample_document, split_sentences
from dsas_diffusion.shapes.text_sets import TEXT_CONCEPTS, concept_words, mentions, text_concept_files
from dsas_diffusion.text import DSASLanguageModel

FIRST_SEED = 7_000_000  # the fitting and evaluation sets draw far below this


def documents(concept: str, count: int, first_seed: int = FIRST_SEED) -> dict[str, list[str]]:
    """``count`` documents with a sentence carrying ``concept`` and ``count`` without."""
    found: dict[str, list[str]] = {"concept": [], "neutral": []}
    seed = first_seed
    while min(len(texts) for texts in found.values()) < count:
        text = sample_document(seed).text
        seed += 1
        kind = "concept" if any(mentions(s + ".", concept) for s in split_sentences(text)) else "neutral"
        if len(found[kind]) < count:
            found[kind].append(text)
    return found


def token_labels(text: str, tokens: list[str], concept: str) -> np.ndarray:
    """Per token: 1 in a sentence carrying ``concept``, 0 elsewhere, -1 for special tokens; a
    sentence's tokens run up to and including its full stop."""
    flags = [mentions(s + ".", concept) for s in split_sentences(text)]
    labels, sentence = [], 0
    for token in tokens:
        if token.startswith("<") and token.endswith(">"):
            labels.append(-1)
            continue
        labels.append(int(flags[min(sentence, len(flags) - 1)]))
        if token == ".":
            sentence += 1
    return np.array(labels)


def after_cue(tokens: list[str], concept: str) -> np.ndarray:
    """Per token: whether a concept word (for ``negative``, a negative word) is among the
    tokens up to and including it."""
    cues = set(concept_words(concept))
    seen = np.cumsum([token.lstrip("▁Ġ").lower() in cues for token in tokens])
    return seen > 0


@contextlib.contextmanager
def scores(steerer: Any) -> Iterator[None]:
    """Inside the block every gate is a plain sigmoid of its score (no floor, no step, scale
    1): it ranks tokens as the score does, so its AUC is the score's, whatever the calibration."""
    saved = [(g, g.activation, g.floor, g.scale) for g in (layer.gate for layer in steerer.layers) if g is not None]
    for gate, *_ in saved:
        gate.activation, gate.floor, gate.scale = "sigmoid", 0.0, 1.0
    try:
        yield
    finally:
        for gate, activation, floor, scale in saved:
            gate.activation, gate.floor, gate.scale = activation, floor, scale


def gather(lm: DSASLanguageModel, texts: dict[str, list[str]], concept: str, strength: float) -> dict:
    """Per layer, per kind of token (concept, rest, after the cue, neutral): the gate values."""
    gathered: dict[str, dict[str, list[np.ndarray]]] = {}
    for kind, batch in texts.items():
        for text, read in zip(batch, lm.gates(batch, steering_strength=strength), strict=True):
            labels = token_labels(text, read["tokens"], concept)
            for layer, gates in read["gate_maps"]["default"].items():
                by_kind = gathered.setdefault(layer, {"concept": [], "rest": [], "neutral": [], "cue": []})
                values = gates.numpy()
                if kind == "concept":
                    by_kind["concept"].append(values[labels == 1])
                    by_kind["rest"].append(values[labels == 0])
                    by_kind["cue"].append(values[after_cue(read["tokens"], concept) & (labels >= 0)])
                else:
                    by_kind["neutral"].append(values[labels >= 0])
    return {
        layer: {kind: np.concatenate(parts) for kind, parts in by_kind.items()} for layer, by_kind in gathered.items()
    }


def diagnose(lm: DSASLanguageModel, concept: str, count: int, strength: float) -> list[dict]:
    """Per layer of the loaded steerer ``default``: the AUC of the gates' scores and the mean
    gates on the kinds of token."""
    texts = documents(concept, count)
    gathered = gather(lm, texts, concept, strength)
    with scores(lm.steerers["default"]):
        ranked = gather(lm, texts, concept, strength)
    kept = {layer.name: layer.gate is None or layer.gate.enabled for layer in lm.steerers["default"].layers}
    rows = []
    for layer, values in gathered.items():
        rank = {kind: torch.from_numpy(v) for kind, v in ranked[layer].items()}
        rows.append(
            {
                "layer": layer,
                "kept": kept.get(layer, True),
                "auc": roc_auc(rank["concept"], rank["neutral"]),
                "auc_cue": roc_auc(rank["cue"], rank["neutral"]),
                **{f"mean_{kind}": float(v.mean()) for kind, v in values.items()},
                **{f"tokens_{kind}": int(v.size) for kind, v in values.items()},
            }
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TEXT_CONCEPTS))
    parser.add_argument(
        "--maps",
        nargs="+",
        default=["caa"],
        choices=list(TEXT_EXAMPLE_MAPS),
        help="shipped examples of these maps; their gates are fitted alike, so at λ 0 they read the same",
    )
    parser.add_argument("--steering", type=Path, help="a steering directory instead of the shipped examples")
    parser.add_argument(
        "--fit",
        type=json.loads,
        help="instead, fit each concept's steering (CAA) on its shipped text files with the examples' settings "
        '(TEXT_EXAMPLE_FIT) and these overrides, as JSON, e.g. \'{"gate_fit_on": "contrast"}\'',
    )
    parser.add_argument("--documents", type=int, default=64, help="documents of each kind")
    parser.add_argument("--strength", type=float, default=0.0, help="λ of the pass (0: the unsteered activations)")
    parser.add_argument("--out", type=Path, default=Path("outputs/text-gate-diagnostic.json"))
    parser.add_argument(
        "--fit-documents", action="store_true", help="with --fit, banana and red: fit on their document sets"
    )
    args = parser.parse_args(argv)
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    shipped = text_example_steerings()
    results = []
    print(
        "| concept | map | layer | kept | AUC concept / after the cue vs neutral | mean gate: concept / rest / after the cue / neutral |"
    )
    print("|---|---|---|---|---|---|")
    for concept in args.concepts:
        for map_name in [None] if args.steering or args.fit is not None else args.maps:
            if args.fit is not None:
                files = text_concept_files(concept, documents=args.fit_documents)
                texts = (read_prompts(files[k]) for k in ("source", "target", "control"))
                lm.fit_steering(*texts, TEXT_EXAMPLE_FIT.replace(map="caa"), progress=False, **args.fit)
                map_name = f"caa, {json.dumps(args.fit)}"
            else:
                lm.load_steering(args.steering or shipped[concept, map_name])
            for row in diagnose(lm, concept, args.documents, args.strength):
                results.append({"concept": concept, "map": map_name or str(args.steering), **row})
                print(
                    f"| {concept} | {map_name or args.steering} | {row['layer']} | {'yes' if row['kept'] else 'no'} "
                    f"| {row['auc']:.2f} / {row['auc_cue']:.2f} | {row['mean_concept']:.2f} / {row['mean_rest']:.2f} / "
                    f"{row['mean_cue']:.2f} / {row['mean_neutral']:.2f} |",
                    flush=True,
                )
            lm.unload_steering()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
