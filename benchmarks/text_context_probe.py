"""Would a text gate that reads the context, not the token, separate concept text from neutral text?

A probe on ``shapes-lm``, before any such gate exists in the library: per decoder layer, on the
residual stream (the layer's output), on the self-attention's output and on its value
projections (what the KV cache keeps of every earlier token), a logistic regression
is fitted per token on labels a user can derive from paired texts: the tokens of each source
text from the first one where it differs from its paired target (concept) against every token
of the control texts (not the concept). Three features:

* ``token``: the activation at the token itself (what today's gates read);
* ``prefix mean``: the mean of the activations over the prefix up to and including the token
  (a causal summary of the context; ``<bos>`` left out);
* ``both``: the two side by side.

Scored as ``text_gate_diagnostic.py`` scores the gates: ROC-AUC of the probe on the tokens of
sentences that carry the concept against every token of neutral documents, on documents drawn
apart from every fitting and evaluation set.

    python benchmarks/text_context_probe.py --concepts negative banana red
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch
from text_gate_diagnostic import documents, token_labels

from dsas_diffusion.eval.diagnostic import roc_auc
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes.text_sets import TEXT_CONCEPTS, text_concept_files
from dsas_diffusion.steering.linear import fit_logistic
from dsas_diffusion.text import DSASLanguageModel

FEATURES = ("token", "prefix mean", "both")


@torch.no_grad()
def activations(lm: DSASLanguageModel, texts: Sequence[str]) -> list[tuple[list[int], dict]]:
    """Per text: its token ids and, per (stream, layer) and feature, ``(tokens, width)``; ``<bos>``
    dropped."""
    layers = lm.model.model.layers
    out = []
    for text in texts:
        ids = lm.tokenizer(text, return_tensors="pt")
        attention: dict[int, torch.Tensor] = {}
        values: dict[int, torch.Tensor] = {}
        handles = [
            layer.self_attn.register_forward_hook(lambda m, a, o, i=i, store=attention: store.__setitem__(i, o[0][0]))
            for i, layer in enumerate(layers)
        ] + [
            layer.self_attn.v_proj.register_forward_hook(lambda m, a, o, i=i, store=values: store.__setitem__(i, o[0]))
            for i, layer in enumerate(layers)
        ]
        try:
            hidden = lm.model(**ids, output_hidden_states=True).hidden_states
        finally:
            for handle in handles:
                handle.remove()
        features = {}
        for i in range(len(layers)):
            streams = (("residual", hidden[i + 1][0]), ("attention", attention[i]), ("values", values[i]))
            for stream, rows in streams:
                rows = rows[1:].float()
                prefix = rows.cumsum(0) / torch.arange(1, rows.shape[0] + 1).unsqueeze(1)
                features[stream, i] = {"token": rows, "prefix mean": prefix, "both": torch.cat([rows, prefix], 1)}
        out.append((ids["input_ids"][0][1:].tolist(), features))
    return out


def first_difference(a: Sequence[int], b: Sequence[int]) -> int:
    return next((k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", nargs="+", default=list(TEXT_CONCEPTS))
    parser.add_argument("--documents", type=int, default=64, help="documents of each kind")
    parser.add_argument("--l2", type=float, default=10.0)
    parser.add_argument(
        "--fit-documents",
        action="store_true",
        help="banana and red: fit on their document sets, not the image captions",
    )
    args = parser.parse_args(argv)
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    print(f"| concept | stream | layer | {' | '.join(FEATURES)} |\n|---|---|---|{'---|' * len(FEATURES)}")
    for concept in args.concepts:
        files = text_concept_files(concept, documents=args.fit_documents)
        source, target, control = (activations(lm, read_prompts(files[k])) for k in ("source", "target", "control"))
        texts = documents(concept, args.documents)
        scored = {kind: activations(lm, batch) for kind, batch in texts.items()}
        labels = [
            torch.from_numpy(token_labels(text, lm.tokenizer.tokenize(text), concept) == 1) for text in texts["concept"]
        ]
        for key in source[0][1]:
            cells = []
            for feature in FEATURES:
                concept_rows = torch.cat(
                    [
                        f[key][feature][first_difference(ids, t_ids) :]
                        for (ids, f), (t_ids, _) in zip(source, target, strict=True)
                    ]
                )
                control_rows = torch.cat([f[key][feature] for _, f in control])
                weight, bias = fit_logistic(
                    torch.cat([concept_rows, control_rows]),
                    torch.cat([torch.ones(len(concept_rows)), torch.zeros(len(control_rows))]),
                    l2=args.l2,
                )
                logits = {
                    kind: [f[key][feature].double() @ weight + bias for _, f in runs] for kind, runs in scored.items()
                }
                positive = torch.cat([values[mask] for values, mask in zip(logits["concept"], labels, strict=True)])
                cells.append(f"{roc_auc(positive, torch.cat(logits['neutral'])):.2f}")
            print(f"| {concept} | {key[0]} | {key[1]} | {' | '.join(cells)} |", flush=True)


if __name__ == "__main__":
    main()
