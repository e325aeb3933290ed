"""The real CLIP BPE tokenizer, built offline from the vocabulary open-clip-torch ships."""

from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

__all__ = ["build_clip_tokenizer", "clip_bpe_path", "slim_tokenizer_folder", "write_clip_tokenizer_files"]

MERGE_COUNT = 49152 - 256 - 2  # as in CLIP: 48894 merges, 49408 tokens in all


def clip_bpe_path() -> Path:
    import open_clip

    return Path(os.path.dirname(open_clip.__file__)) / "bpe_simple_vocab_16e6.txt.gz"


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def write_clip_tokenizer_files(directory: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write CLIP's ``vocab.json`` and ``merges.txt`` into ``directory`` (49408 tokens)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGE_COUNT + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [token + "</w>" for token in vocab]
    vocab += ["".join(merge) for merge in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({token: index for index, token in enumerate(vocab)}, ensure_ascii=False))
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(merge) for merge in merges) + "\n")
    return vocab_path, merges_path


def build_clip_tokenizer(directory: str | os.PathLike[str], model_max_length: int = 24):
    """A ``transformers.CLIPTokenizer`` over the real CLIP vocabulary, saved in ``directory``."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(directory)
    # loading from the folder reads vocab.json and merges.txt under any transformers version
    tokenizer = CLIPTokenizer.from_pretrained(str(directory), model_max_length=model_max_length)
    tokenizer.save_pretrained(str(directory))
    slim_tokenizer_folder(directory)
    return tokenizer


def slim_tokenizer_folder(directory: str | os.PathLike[str]) -> None:
    """Ship a CLIP tokenizer folder as vocab.json + merges.txt (1.5 MB): tokenizer.json (3.6 MB)
    is rebuilt from them at load time, so it is removed."""
    write_clip_tokenizer_files(directory)
    (Path(directory) / "tokenizer.json").unlink(missing_ok=True)
