"""Per-denoising-step cost of steering: unsteered vs uniform vs DSAS, ratios measured in one run.

    python benchmarks/overhead.py [--repeats 30] [--models shapes-sd shapes-mmdit] [--compiled] [--json FILE]
    python benchmarks/overhead.py --arithmetic --models shapes-sd shapes-mmdit   # the hooks' work alone

- ``shapes-sd`` (and ``shapes-mmdit``) on the CPU: one denoiser call on a CFG batch of 2 x 8
  latents, with a steerer fitted on the banana prompt sets with ``fit_steering``'s defaults
  (CAA on the ``cross-attention`` preset) and with Linear-AcT on the ``blocks`` and ``norms``
  presets; beside DSAS, the naive hooks (:class:`NaiveHooks`); with ``--compiled`` also the
  block preset with each variant under ``torch.compile``.
- A language model: tokens per second of steered vs unsteered ``DSASLanguageModel.generate``
  on a Qwen2 config of about 20M parameters (hidden 512, 8 layers, random weights), the
  ``residual`` preset on all layers, batch 8, 64 new tokens (greedy, no early stop).
- At full size on a GPU (an SDXL UNet and a PixArt transformer, float16): ``overhead_gpu.py``.
- Through the pipelines and ``DSASLanguageModel`` under each way users compile (in place,
  ``torch.compile`` assigned back, regional), with compile times and graph counts:
  ``compiled.py``.

The variants take turns, the order rotating each round, so that drift in the machine's
speed hits them alike; the table gives each variant's median time and, per steered variant,
the median over rounds of its ratio to the same round's unsteered time with the quartiles
of those ratios in brackets.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import statistics
import time
from collections.abc import Callable

import torch

from dsas_diffusion.config import FitConfig
from dsas_diffusion.steering.hookpoints import feature_dim, get_output, replace_output, resolve_module

SDXL_UNET = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, the order rotating from round to round (so no variant
    always follows the same one); each variant returns its seconds."""
    names = list(variants)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(variants[name]())
    return times


def ratio_quartiles(numerators: list[float], denominators: list[float]) -> tuple[float, float, float]:
    """Median and quartiles over rounds of ``numerators[i] / denominators[i]``."""
    ratios = sorted(n / d for n, d in zip(numerators, denominators, strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return statistics.median(ratios), quartiles[0], quartiles[2]


def summary(times: dict[str, list[float]]) -> dict[str, float]:
    """Median seconds per variant, and per steered variant the median over rounds of its
    ratio to the unsteered time of the same round, with the quartiles of those ratios."""
    result = {name: statistics.median(values) for name, values in times.items()}
    for name in [n for n in ("uniform", "dsas", "naive") if n in times]:
        median, low, high = ratio_quartiles(times[name], times["unsteered"])
        result[f"{name}_ratio"] = median
        result[f"{name}_spread"] = (low, high)
    return result


class NaiveHooks:
    """The obvious implementation, for comparison: per steered module a plain forward hook
    computing the gate ``sigmoid(a·t + c)`` (with the fitted floor and scale), the map and the
    blend in separate operations (features moved last and back, in the activation's dtype);
    it computes what DSAS computes."""

    def __init__(self, model: torch.nn.Module, steerer, strength: float = 1.0) -> None:
        self.handles = []
        for layer in steerer.layers:
            module = resolve_module(model, layer.name)
            self.handles.append(module.register_forward_hook(self._hook(layer, strength)))

    @staticmethod
    def _hook(layer, strength: float):
        index, dim = layer.hook_point.output_index, feature_dim(layer.hook_point.layout)
        weight = None if layer.map.weight is None else layer.map.weight.detach()
        bias, a, c = layer.map.bias.detach(), layer.gate.weight.detach(), layer.gate.bias.detach()
        floor, scale = layer.gate.floor, layer.gate.scale / (1.0 - layer.gate.floor)

        def hook(module, args, output):
            t = get_output(output, index).movedim(dim, -1)
            gate = ((torch.sigmoid(t @ a.to(t) + c.to(t)) - floor).clamp(min=0.0) * scale).unsqueeze(-1)
            mapped = t * weight.to(t) + bias.to(t) if weight is not None else t + bias.to(t)
            return replace_output(output, index, (t + strength * gate * (mapped - t)).movedim(-1, dim))

        return hook

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()


def time_variants(
    denoiser,
    call: dict,
    steerer,
    repeats: int,
    block: int = 5,
    compiled: bool = False,
    variants: tuple[str, ...] = ("unsteered", "uniform", "dsas", "naive"),
) -> dict[str, float]:
    """Seconds of one denoiser call, unsteered, with uniform steering, with DSAS and with the
    naive hooks (:class:`NaiveHooks`, gated like DSAS).

    A pipeline attaches its hooks once and then runs every denoising step with them, so a
    variant's turn is a block of ``block`` consecutive calls (one untimed call first) with its
    hooks attached, timed by the block's median; turns alternate (see :func:`alternate`).
    ``compiled``: each variant runs its own ``torch.compile`` of a copy of the denoiser, its
    hooks attached before compiling (and kept: the compiled graph holds them).
    ``variants``: which of the four to time (``unsteered`` first).
    """
    device = next(denoiser.parameters()).device
    attach = {
        "unsteered": lambda model: None,
        "uniform": lambda model: steerer.apply(model, gate="none"),
        "dsas": lambda model: steerer.apply(model, gate="dsas"),
        "naive": lambda model: NaiveHooks(model, steerer),
    }
    attach = {name: attach[name] for name in variants}
    models = {name: denoiser for name in attach}
    if compiled:
        models = {name: copy.deepcopy(denoiser) for name in attach}
        kept = {name: attach[name](model) for name, model in models.items()}  # noqa: F841 (held while timing)
        models = {name: torch.compile(model) for name, model in models.items()}
        with torch.no_grad():
            for model in models.values():  # compile outside the timing
                model(**call)

    def turn(name: str) -> float:
        # hooks are attached once per pipeline call, outside the timing
        session = None if compiled else attach[name](denoiser)
        try:
            seconds = []
            for index in range(block + 1):
                _sync(device)
                start = time.perf_counter()
                models[name](**call)
                _sync(device)
                if index > 0:
                    seconds.append(time.perf_counter() - start)
            return statistics.median(seconds)
        finally:
            if session is not None:
                session.detach()

    with torch.no_grad():
        return summary(alternate({name: lambda name=name: turn(name) for name in attach}, max(1, repeats // block)))


def steering_arithmetic(denoiser, call: dict, steerer, number: int = 100) -> dict[str, float]:
    """The steering work alone, beside the call it rides on: seconds of one unsteered denoiser
    call, and summed over the steered modules the seconds of their DSAS and uniform hook
    functions (the whole forward hook a session places: checks, ``PreparedLayer``, output
    replacement) applied to each module's output from the same call; each the median of 5
    timings of ``number`` repetitions (5 for the denoiser call)."""

    def seconds(function: Callable[[], object], number: int) -> float:
        function()
        timings = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(number):
                function()
            timings.append((time.perf_counter() - start) / number)
        return statistics.median(timings)

    modules = {layer.name: resolve_module(denoiser, layer.name) for layer in steerer.layers}
    outputs: dict[str, object] = {}
    handles = [
        module.register_forward_hook(lambda module, args, output, name=name: outputs.__setitem__(name, output))
        for name, module in modules.items()
    ]
    with torch.no_grad():
        try:
            result = {"unsteered": seconds(lambda: denoiser(**call), 5)}
        finally:
            for handle in handles:
                handle.remove()
        for variant, gate in (("dsas", "dsas"), ("uniform", "none")):
            result[variant] = 0.0
            with steerer.apply(denoiser, strength=1.0, gate=gate):
                for name, module in modules.items():
                    (hook,) = module._forward_hooks.values()  # the session's hook
                    result[variant] += seconds(functools.partial(hook, module, (), outputs[name]), number)
    return result


def shapes_model(model: str, repeats: int, compiled: bool = False, arithmetic: bool = False) -> list[dict]:
    """Eager rows for the defaults and the block and norm presets of ``model`` (``shapes-sd``
    or ``shapes-mmdit``); with ``compiled``, also the block preset under ``torch.compile``;
    with ``arithmetic``, instead of the alternating runs, :func:`steering_arithmetic`."""
    from dsas_diffusion.diffusion.collect import record_denoiser_calls
    from dsas_diffusion.diffusion.loading import load_pipeline
    from dsas_diffusion.shapes import concept_prompts

    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    denoiser = pipe.denoiser
    source, target, control = concept_prompts()
    prompts = [f"a yellow banana on a {b} background" for b in ("white", "black")] * 4
    calls = record_denoiser_calls(pipe, denoiser, prompts, steps=(0,), num_inference_steps=25, progress=False)
    cond = calls[0]
    # the CFG batch the pipeline runs: [unconditional; conditional], 2 x 8
    call = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.ndim > 0 else v for k, v in cond.items()}
    rows = []
    # fit_steering's defaults (CAA on the cross-attention outputs), Linear-AcT on the block and
    # norm outputs, and with the core's min-max source support (4 more kernels a hook)
    variants = [
        ("cross-attention, CAA (defaults)", {}, False),
        ("blocks, Linear-AcT", {"map": "linear-act", "preset": "blocks"}, False),
        ("norms, Linear-AcT", {"map": "linear-act", "preset": "norms"}, False),
        ("blocks, Linear-AcT with support", {"map": "linear-act", "preset": "blocks", "support_quantiles": (0.0, 1.0)}, False),
    ]  # fmt: skip
    if compiled and not arithmetic:
        variants.append(("blocks, Linear-AcT, compiled", {"map": "linear-act", "preset": "blocks"}, True))
    for label, settings, compile_it in variants:
        steerer = pipe.fit_steering(source, target, control, gate_threshold=None, progress=False, **settings)
        if arithmetic:
            timing = steering_arithmetic(denoiser, call, steerer)
        else:
            timing = time_variants(denoiser, call, steerer, repeats, compiled=compile_it)
        rows.append({"model": f"{model} (CPU, batch 2x8)", "preset": label, "layers": len(steerer.layers), **timing})
    return rows


def text_generate(repeats: int, gates: str = "context") -> list[dict]:
    """Steered vs unsteered ``generate`` of a ~20M-parameter Qwen2 (random weights): the
    language models' defaults (CAA, gates reading the context) or, ``gates="published"``,
    Linear-AcT with pooled gates on each token's own activation (``FitConfig()``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from dsas_diffusion.text import DSASLanguageModel

    vocab = 4096
    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=512, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=vocab, pad_token_id=0, eos_token_id=1)  # fmt: skip
    model = Qwen2ForCausalLM(config).eval()
    words = [f"w{i}" for i in range(vocab - 2)]
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")
    lm = DSASLanguageModel(model, tokenizer)
    generator = torch.Generator().manual_seed(0)

    def texts(count: int, low: int, high: int) -> list[str]:
        ids = torch.randint(low, high, (count, 24), generator=generator)
        return [" ".join(words[i] for i in row) for row in ids.tolist()]

    config = FitConfig() if gates == "published" else FitConfig.for_text()
    lm.fit_steering(texts(32, 0, 2000), texts(32, 2000, 4000), texts(32, 1000, 3000), config, gate_threshold=None,
                    progress=False)  # fmt: skip
    prompts = texts(8, 0, 4000)
    call = {"max_new_tokens": 64, "min_new_tokens": 64, "do_sample": False}
    variants = {"unsteered": {"steering_strength": 0.0}, "uniform": {"steering_gate": "none"}, "dsas": {}}
    lm.generate(prompts, **call)  # warm-up

    def turn(steering: dict) -> float:
        start = time.perf_counter()
        lm.generate(prompts, **steering, **call)
        return time.perf_counter() - start

    timing = summary(alternate({name: lambda s=steering: turn(s) for name, steering in variants.items()}, repeats))
    preset = "residual, Linear-AcT, published gates" if gates == "published" else "residual, defaults (context gates)"
    return [{"model": "Qwen2 ~20M (CPU, generate, batch 8, 64 new tokens)", "preset": preset,
             "layers": len(lm.steerers["default"].layers), **timing}]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--json", default=None)
    parser.add_argument("--only", choices=("images", "text"), default=None, help="run one part only")
    parser.add_argument(
        "--text-gates", nargs="+", default=["published", "context"], choices=("published", "context"),
        help="text steerers, one row each: the published method or the defaults (gates reading the context)",
    )  # fmt: skip
    parser.add_argument("--models", nargs="+", default=["shapes-sd"], help="shapes-sd and / or shapes-mmdit")
    parser.add_argument("--compiled", action="store_true", help="also the block preset under torch.compile")
    parser.add_argument("--arithmetic", action="store_true", help="the steering arithmetic alone, per image model")
    args = parser.parse_args()
    rows = []
    if args.arithmetic:
        for model in args.models:
            rows += shapes_model(model, args.repeats, arithmetic=True)
        print("| model | preset | hooked layers | unsteered call ms | DSAS arithmetic ms | uniform arithmetic ms |"
              " DSAS / call | uniform / call |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|")
        for row in rows:
            ms = [f"{1000 * row[name]:.2f}" for name in ("unsteered", "dsas", "uniform")]
            shares = [f"{row[name] / row['unsteered']:.4f}" for name in ("dsas", "uniform")]
            print(f"| {row['model']} | {row['preset']} | {row['layers']} | " + " | ".join(ms + shares) + " |")
        return
    if args.only != "text":
        for model in args.models:
            rows += shapes_model(model, args.repeats, compiled=args.compiled)
    if args.only != "images":
        for gates in args.text_gates:
            rows += text_generate(max(3, args.repeats // 3), gates)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=2)


def print_table(rows: list[dict]) -> None:
    """The rows as a markdown table: median milliseconds per variant and, per steered
    variant, its median ratio to unsteered with the quartiles of the ratios."""
    print(
        "| model | preset | hooked layers | unsteered ms | uniform ms | DSAS ms | naive hooks ms | uniform / unsteered | "
        "DSAS / unsteered | naive / unsteered |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:

        def ratio(name: str, row=row) -> str:
            if f"{name}_ratio" not in row:
                return "-"
            low, high = row[f"{name}_spread"]
            return f"{row[f'{name}_ratio']:.3f} [{low:.3f}, {high:.3f}]"

        ms = [f"{1000 * row[name]:.1f}" if name in row else "-" for name in ("unsteered", "uniform", "dsas", "naive")]
        ratios = [ratio(name) for name in ("uniform", "dsas", "naive")]
        print(f"| {row['model']} | {row['preset']} | {row['layers']} | " + " | ".join(ms + ratios) + " |")


if __name__ == "__main__":
    main()
