"""Throughput of a vLLM engine unsteered, with uniform steering and with DSAS (gates reading the
output, and gates reading the context), in one run.

    .venv-vllm/bin/python benchmarks/vllm_throughput.py [--rounds 5]      # make test-vllm builds .venv-vllm
    python benchmarks/vllm_throughput.py --device cuda    # a GPU, in an environment with vLLM's CUDA build

Two models: ``shapes-lm`` and a Qwen2-0.5B-sized configuration with random weights (hidden
896, 24 layers, ``shapes-lm``'s tokenizer), float32, eager
(``enforce_eager=True``), prefix caching off. Each is steered by a CAA steering on every
decoder layer's output with gates reading the output, fitted with ``DSASLanguageModel`` on
the same configuration (random weights for the Qwen2 one: only its shapes matter here), by
the same steering without its gates (uniform), and by a steering fitted with the language
models' defaults (``FitConfig.for_text()``: CAA, gates reading the context). Per round, in a
rotating order: 16 prompts, 64 new tokens each (``ignore_eos``), every request unsteered, then
every request at λ 4 with each steering. Printed: generated tokens per second per variant
(median over rounds) and each steered variant's median ratio of time to the unsteered time of
the same round, with quartiles.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from overhead import alternate, ratio_quartiles

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

PROMPTS = 16
NEW_TOKENS = 64
#: the steered variants, as the steerings are named in the engine
STEERED = ("uniform", "dsas", "context")


def steerings(model_dir: str, folder: Path) -> dict[str, str]:
    """A DSAS steering of ``model_dir`` (a CAA map and output gates on every decoder layer), the
    same without gates and one with the defaults' gates reading the context, saved under
    ``folder``; ``{"dsas": dir, "uniform": dir, "context": dir}``."""
    import torch

    from dsas_diffusion import DSASLanguageModel
    from dsas_diffusion.config import FitConfig
    from dsas_diffusion.prompts import read_prompts
    from dsas_diffusion.shapes import text_concept_files

    files = text_concept_files("negative")
    sets = [read_prompts(files[key])[:32] for key in ("source", "target", "control")]
    lm = DSASLanguageModel.from_pretrained(model_dir, dtype=torch.float32)
    config = FitConfig(map="caa", gate_threshold=None, n_components=8, support_quantiles=None)
    steerer = lm.fit_steering(*sets, config, progress=False)
    uniform = copy.deepcopy(steerer)
    for layer in uniform.layers:
        layer.gate = None
    context = lm.fit_steering(*sets, FitConfig.for_text(n_components=8), name="context", progress=False)
    paths = {"dsas": folder / "dsas", "uniform": folder / "uniform", "context": folder / "context"}
    steerer.save_pretrained(paths["dsas"])
    uniform.save_pretrained(paths["uniform"])
    context.save_pretrained(paths["context"])
    return {name: str(path) for name, path in paths.items()}


def qwen2_folder(folder: Path) -> str:
    """A Qwen2-0.5B-sized configuration with ``shapes-lm``'s tokenizer, random weights saved."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    from dsas_diffusion.shapes import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("shapes-lm"))
    config = Qwen2Config(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


def measure(model_dir: str, label: str, rounds: int) -> dict:
    from vllm import LLM, SamplingParams

    from dsas_diffusion.prompts import read_prompts
    from dsas_diffusion.shapes import text_concept_files
    from dsas_diffusion.vllm import load_steering

    with tempfile.TemporaryDirectory() as folder:
        paths = steerings(model_dir, Path(folder))
        llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, enable_prefix_caching=False,
                  max_model_len=128, max_num_seqs=PROMPTS)  # fmt: skip
        for name, path in paths.items():
            load_steering(llm, path, name=name)
    prompts = read_prompts(text_concept_files("negative")["eval_concept"])[:PROMPTS]

    def params(extra):
        return SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True, temperature=0.0,
                              extra_args=extra)  # fmt: skip

    variants = {"unsteered": params(None), **{name: params({f"dsas:{name}": 4.0}) for name in STEERED}}
    llm.generate(prompts, variants["dsas"], use_tqdm=False)  # warm-up

    def turn(sampling) -> float:
        start = time.perf_counter()
        outputs = llm.generate(prompts, sampling, use_tqdm=False)
        seconds = time.perf_counter() - start
        assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
        return seconds

    times = alternate({name: lambda s=sampling: turn(s) for name, sampling in variants.items()}, rounds)
    row = {"model": label, **{f"{n}_tps": PROMPTS * NEW_TOKENS / statistics.median(t) for n, t in times.items()}}
    for name in STEERED:
        row[name] = ratio_quartiles(times[name], times["unsteered"])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cpu", help="a label only: vLLM's build decides where it runs")
    parser.add_argument("--models", nargs="+", default=["shapes-lm", "qwen2"], choices=("shapes-lm", "qwen2"))
    args = parser.parse_args(argv)
    from dsas_diffusion.shapes import resolve_model_path

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for model in args.models:
            if model == "shapes-lm":
                rows.append(measure(str(resolve_model_path("shapes-lm")), f"shapes-lm ({args.device})", args.rounds))
            else:
                path = qwen2_folder(Path(folder) / "qwen2")
                rows.append(measure(path, f"Qwen2-0.5B-sized, random weights ({args.device})", args.rounds))
            print(f"{rows[-1]['model']}: done", file=sys.stderr, flush=True)
    print(f"\n{PROMPTS} prompts x {NEW_TOKENS} new tokens, {args.rounds} rounds, float32, eager")
    labels = {"uniform": "uniform", "dsas": "DSAS, output gates", "context": "DSAS, context gates"}
    print("| model | unsteered tok/s | " + " | ".join(f"{labels[n]} tok/s" for n in STEERED) + " | "
          + " | ".join(f"{labels[n]} / unsteered" for n in STEERED) + " |")  # fmt: skip
    print("|---" * (2 + 2 * len(STEERED)) + "|")
    for row in rows:
        speeds = " | ".join(f"{row[f'{n}_tps']:.1f}" for n in STEERED)
        ratios = " | ".join(f"{row[n][0]:.3f} [{row[n][1]:.3f}, {row[n][2]:.3f}]" for n in STEERED)
        print(f"| {row['model']} | {row['unsteered_tps']:.1f} | {speeds} | {ratios} |")
    print(f"\n{time.perf_counter() - start:.0f} s in all")


if __name__ == "__main__":
    main()
