"""``shapes-lm``: a small Llama causal language model trained on the Shapes text world.

The corpus is :func:`~dsas_diffusion.shapes.text.sample_document` over training seeds (an
endless stream, never repeated); held-out documents come from seeds the training never
draws. The tokenizer is word-level over the grammar's vocabulary (every word, the comma and
the full stop are one token each), so the model's cross-entropy per token and the
generator's exact entropy per token are counted over the same tokens.
"""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..data import BACKGROUNDS, COLOURS, SHAPES
from ..text import COUNTS, NEGATIVE_WORDS, POSITIONS, SIZES, TEMPLATES, sample_document
from .common import cosine_lr, training_device

__all__ = ["HELD_OUT_SEED", "LM_CONFIG", "build_lm_tokenizer", "heldout_cross_entropy", "token_losses", "train_lm"]

#: held-out documents are ``sample_document(HELD_OUT_SEED + i)``; training draws seeds below it
HELD_OUT_SEED = 10**9
SPECIAL = {"pad": "<pad>", "bos": "<bos>", "eos": "<eos>"}
LM_CONFIG = dict(
    hidden_size=192,
    intermediate_size=576,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def _vocabulary() -> list[str]:
    words: set[str] = {"a", "an", "the", *COLOURS, *SHAPES, *BACKGROUNDS, *NEGATIVE_WORDS, *COUNTS.values()}
    words |= {w for size in SIZES for w in size.split()} | {w for p in POSITIONS for w in p.split()}
    for templates in TEMPLATES.values():
        for template in templates:
            words |= set(re.sub(r"\{\w+\}", " ", template).split())
    return sorted(words)


def build_lm_tokenizer():
    """The word-level tokenizer of ``shapes-lm`` (a ``PreTrainedTokenizerFast``): ``<bos>`` is
    prepended to every text, words become ``▁word`` tokens and punctuation its own tokens, and
    decoding restores the text exactly.

    Examples:
        >>> tokenizer = build_lm_tokenizer()
        >>> ids = tokenizer("an ugly red square.")["input_ids"]
        >>> tokenizer.convert_ids_to_tokens(ids)
        ['<bos>', '▁an', '▁ugly', '▁red', '▁square', '.']
        >>> tokenizer.decode(ids, skip_special_tokens=True)
        'an ugly red square.'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tokens = [*SPECIAL.values(), "<unk>", ",", ".", *(f"▁{w}" for w in _vocabulary())]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(prepend_scheme="always"), pre_tokenizers.Punctuation()]
    )
    backend.decoder = decoders.Metaspace(prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A", special_tokens=[(SPECIAL["bos"], tokens.index(SPECIAL["bos"]))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=SPECIAL["pad"],
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token="<unk>",
        padding_side="left",
    )


def _batch(tokenizer, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``<bos> text <eos>`` rows with labels (-100 on padding)."""
    rows = [[*ids, tokenizer.eos_token_id] for ids in tokenizer(texts)["input_ids"]]
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


@torch.no_grad()
def token_losses(model, tokenizer, texts: list[str], batch_size: int = 100) -> list[tuple[list[int], torch.Tensor]]:
    """For each text, its predicted token ids (every word and punctuation mark, then ``<eos>``)
    and the model's nats on each."""
    device = next(model.parameters()).device
    rows = []
    for start in range(0, len(texts), batch_size):
        batch = _batch(tokenizer, texts[start : start + batch_size], device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels, reduction="none")
        for row, loss in zip(labels, losses, strict=True):
            kept = row != -100
            rows.append((row[kept].tolist(), loss[kept].cpu()))
    return rows


def heldout_cross_entropy(model, tokenizer, count: int = 2000, batch_size: int = 100) -> dict[str, float]:
    """Nats per predicted token on ``count`` held-out documents: the model's cross-entropy and
    the generator's own entropy (its exact ``-log p`` of the same documents), counted over the
    same tokens (every word and punctuation mark, and ``<eos>``)."""
    documents = [sample_document(HELD_OUT_SEED + i) for i in range(count)]
    rows = token_losses(model, tokenizer, [d.text for d in documents], batch_size)
    tokens = sum(len(ids) for ids, _ in rows)
    model_nats = sum(float(losses.sum()) for _, losses in rows)
    generator_nats = -sum(d.log_prob for d in documents)
    return {"model": model_nats / tokens, "generator": generator_nats / tokens, "tokens": tokens}


def train_lm(
    out: Path, steps: int = 6000, batch_size: int = 64, lr: float = 5e-4, seed: int = 0, heldout: int = 2000
) -> Path:
    """Train ``shapes-lm``, print its held-out cross-entropy beside the generator's entropy
    (``heldout`` documents) and save it (float16) with its tokenizer to ``out/shapes-lm``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    device = training_device()
    torch.manual_seed(seed)
    tokenizer = build_lm_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **LM_CONFIG,
    )
    model = LlamaForCausalLM(config).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    scheduler = cosine_lr(optimizer, steps, warmup=100)
    start = time.time()
    bar = tqdm(range(steps), desc="shapes-lm")
    for step in bar:
        first = seed * 10**8 + step * batch_size
        texts = [sample_document(first + i).text for i in range(batch_size)]
        loss = model(**_batch(tokenizer, texts, device)).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    entropy = heldout_cross_entropy(model, tokenizer, count=heldout)
    gap = entropy["model"] - entropy["generator"]
    print(
        f"shapes-lm: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, {steps} steps in "
        f"{(time.time() - start) / 60:.1f} min; held-out nats per token: model {entropy['model']:.4f}, "
        f"generator {entropy['generator']:.4f} (gap {gap:.4f}, perplexity ratio {math.exp(gap):.3f})"
    )
    target = Path(out) / "shapes-lm"
    model.to(torch.float16).save_pretrained(target)
    model.generation_config.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target
