"""One behaviour suite of DSASLanguageModel over every language model family with a preset,
on tiny models built from configs (random weights: "steers" is checked with uniform
steering; the gated path by the gates it records)."""

from __future__ import annotations

import contextvars
import threading

import numpy as np
import pytest
import torch
from lm_rounding import assert_greedy_agrees
from tiny_lms import FAMILIES, build
from transformers import TextIteratorStreamer

from dsas_diffusion import DSASLanguageModel, Steerer
from dsas_diffusion.steering import IncompatibleSteeringError, SteeringError, active_hook_names
from dsas_diffusion.text import hook_points

COLOURS = ("red", "green", "blue", "purple", "white", "gray")
SOURCE = [f"a {c} banana lies on a {b} background" for c in COLOURS for b in ("black", "white")]
TARGET = [f"a {c} circle lies on a {b} background" for c in COLOURS for b in ("black", "white")]
CONTROL = [f"the {c} square is next to a {b} star" for c in COLOURS for b in ("small", "large")]
PROMPTS = ["a yellow banana", "the small red square lies on the left of a"]  # different lengths: left padding
GREEDY = {"max_new_tokens": 6, "do_sample": False}


@pytest.fixture(scope="module", params=FAMILIES)
def lm(request):
    model, tokenizer = build(request.param)
    lm = DSASLanguageModel(model, tokenizer)
    lm.family = request.param
    lm.fit_steering(SOURCE, TARGET, CONTROL, gate_threshold=None, batch_size=6, progress=False)
    return lm


def _stock(lm, prompts, **kwargs):
    tokenizer = lm.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(list(prompts), return_tensors="pt", padding=True)
    with torch.no_grad():
        return lm.model.generate(**batch, pad_token_id=tokenizer.pad_token_id, **kwargs)


def test_presets_name_existing_modules_in_forward_order(lm):
    names = dict(lm.model.named_modules())
    for preset in ("residual", "attention", "mlp", "norms"):
        points = hook_points(lm.model, preset)
        assert points and all(p.module in names for p in points), preset
    assert [p.module.rsplit(".", 1)[0] for p in hook_points(lm.model, "residual", layers=[-1])] == [
        hook_points(lm.model)[-1].module.rsplit(".", 1)[0]
    ]
    with pytest.raises(SteeringError, match="does not exist"):
        hook_points(lm.model, layers=[7])


def test_strength_zero_and_no_steering_are_token_identical_to_stock_generate(lm):
    stock = _stock(lm, PROMPTS, **GREEDY)
    assert torch.equal(lm.generate(PROMPTS, steering_strength=0.0, **GREEDY).sequences, stock)
    bare = DSASLanguageModel(lm.model, lm.tokenizer)
    assert torch.equal(bare.generate(PROMPTS, **GREEDY).sequences, stock)
    for asked in ({"steering_strength": 1.0}, {"return_gate_maps": True}):
        with pytest.raises(SteeringError, match="no steering is loaded"):
            bare.generate(PROMPTS, **asked, **GREEDY)
    steered = lm.generate(PROMPTS, steering_strength=8.0, steering_gate="none", **GREEDY).sequences
    assert not torch.equal(steered, stock)  # and the steering acts


def continuations(result) -> list[list[int]]:
    """Each row's new tokens."""
    return result.sequences[:, result.prompt_length :].tolist()


def assert_same_greedy(lm, one, other, strength: float, gate: str) -> None:
    """Two ``generate`` results over ``PROMPTS`` (or one prompt each, in order) agree token for
    token, up to a tie that rounding decides (:func:`lm_rounding.assert_greedy_agrees`)."""
    prompts = PROMPTS[: len(one.texts)]
    for prompt, first, second in zip(prompts, continuations(one), continuations(other), strict=True):
        assert_greedy_agrees(lm, prompt, first, second, strength, gate=gate)


@pytest.mark.numerics
def test_cached_and_uncached_steered_generation_agree(lm):
    for gate in ("dsas", "none"):
        cached = lm.generate(PROMPTS, steering_strength=4.0, steering_gate=gate, **GREEDY)
        uncached = lm.generate(PROMPTS, steering_strength=4.0, steering_gate=gate, use_cache=False, **GREEDY)
        assert_same_greedy(lm, cached, uncached, 4.0, gate)


@pytest.mark.numerics
def test_a_static_cache_steers_like_the_dynamic_one(lm):
    dynamic = lm.generate(PROMPTS, steering_strength=4.0, steering_gate="none", **GREEDY)
    static = lm.generate(PROMPTS, steering_strength=4.0, steering_gate="none", cache_implementation="static", **GREEDY)
    assert_same_greedy(lm, static, dynamic, 4.0, "none")
    with pytest.raises(SteeringError, match="automatic compilation"):
        lm.generate(PROMPTS, steering_strength=1.0, disable_compile=False, **GREEDY)


@pytest.mark.numerics
def test_continuations_that_differ_beyond_a_tie_fail_the_comparison(lm):
    greedy = continuations(lm.generate(PROMPTS[:1], steering_strength=4.0, steering_gate="none", **GREEDY))[0]
    ids = lm.tokenizer(PROMPTS[0]).input_ids
    with lm.steering(4.0, gate="none"), torch.no_grad():
        unlikely = int(lm.model(torch.tensor([ids])).logits[0, -1].argmin())
    with pytest.raises(AssertionError, match="not a tie"):
        assert_greedy_agrees(lm, PROMPTS[0], greedy, [unlikely, *greedy[1:]], 4.0, gate="none")


@pytest.mark.numerics
def test_a_left_padded_batch_gives_each_prompt_what_it_gives_alone(lm):
    batch = continuations(lm.generate(PROMPTS, steering_strength=4.0, steering_gate="none", **GREEDY))
    for prompt, together in zip(PROMPTS, batch, strict=True):
        alone = continuations(lm.generate([prompt], steering_strength=4.0, steering_gate="none", **GREEDY))[0]
        assert_greedy_agrees(lm, prompt, alone, together, 4.0, gate="none")


@pytest.mark.numerics
def test_one_strength_per_prompt_gives_each_prompt_its_tokens_alone(lm):
    stock = _stock(lm, PROMPTS, **GREEDY)
    for gate in ("none", "dsas"):
        batch = lm.generate(PROMPTS, steering_strength=[8.0, 0.0], steering_gate=gate, **GREEDY)
        assert torch.equal(batch.sequences[1], stock[1])  # λ 0 beside a steered prompt: the stock tokens
        alone = lm.generate(PROMPTS[:1], steering_strength=8.0, steering_gate=gate, **GREEDY)
        assert_greedy_agrees(lm, PROMPTS[0], continuations(alone)[0], continuations(batch)[0], 8.0, gate=gate)
    # each prompt's beams (and returned sequences) follow its λ; gate maps from the replay
    beams = {"num_beams": 2, "num_return_sequences": 2, "max_new_tokens": 4}
    mixed = lm.generate(PROMPTS, steering_strength={"default": [0.0, 8.0]}, return_gate_maps=True, **beams)
    plain = _stock(lm, PROMPTS, do_sample=False, **beams)
    assert torch.equal(mixed.sequences[:2], plain[:2])
    assert all(tuple(g.shape) == tuple(mixed.sequences.shape) for g in mixed.gate_maps["default"].values())
    with pytest.raises(SteeringError, match="3 values for 2 prompts"):
        lm.generate(PROMPTS, steering_strength=[1.0, 2.0, 3.0], **GREEDY)


def test_gate_maps_are_per_token_masked_and_equal_the_replay(lm):
    out = lm.generate(PROMPTS, steering_strength=1.0, return_gate_maps=True, **GREEDY)
    maps = out.gate_maps["default"]
    assert set(maps) == set(lm.steerers["default"].module_names)
    width = out.prompt_length
    short = len(lm.tokenizer(PROMPTS[0])["input_ids"])
    middle = list(maps)[len(maps) // 2]
    gated = int((~torch.isnan(maps[middle][1][out.mask[1]])).sum())
    assert out.render(1, format="html").count("<span title=") == gated and gated >= len(out.tokens[1]) - 1
    for gates in maps.values():
        assert tuple(gates.shape) == tuple(out.sequences.shape)
        assert torch.isnan(gates[0, : width - short]).all() and not torch.isnan(gates[0, width - short]).any()
        assert torch.isnan(gates[:, -1]).all()  # the last token is never forwarded
    mask = lm._sequence_mask(out.sequences, width, out.sequences[:, :width] != 0, 1)
    replay = lm._replay(out.sequences, mask, lm._plan(1.0, record_gates=True))
    for layer, gates in maps.items():
        np.testing.assert_allclose(gates.numpy(), replay["default"][layer].numpy(), atol=2e-3)  # NaN where both are


def test_gates_and_texts_stop_at_the_end_of_text(lm):
    plain = lm.generate(PROMPTS, steering_strength=1.0, **GREEDY)
    special = set(lm.tokenizer.all_special_ids)
    ended, stop = next(  # an end-of-text token that a row reaches early: its second new token
        (row, int(token))
        for row in range(len(PROMPTS))
        for token in plain.sequences[row, plain.prompt_length + 1 : plain.prompt_length + 2]
        if int(token) not in special
    )
    out = lm.generate(PROMPTS, steering_strength=1.0, return_gate_maps=True, eos_token_id=stop, **GREEDY)
    width = out.prompt_length
    for row in range(len(PROMPTS)):
        new = out.sequences[row, width:].tolist()
        end = width + new.index(stop) if stop in new else None
        for gates in out.gate_maps["default"].values():
            if end is not None:
                assert torch.isnan(gates[row, end + 1 :]).all()  # after the end: masked
                assert not torch.isnan(gates[row, width:end]).any()  # up to it: gated
        kept = new[: new.index(stop) + 1] if stop in new else [t for t in new if t != 0]
        assert lm.tokenizer(out.texts[row])["input_ids"] == [t for t in kept if t not in special]  # nothing after
    assert stop in out.sequences[ended, width:].tolist()  # that row did end


def test_beam_search_gates_come_from_a_replay(lm):
    out = lm.generate(PROMPTS, steering_strength=1.0, return_gate_maps=True, num_beams=2, num_return_sequences=2,
                      max_new_tokens=4)  # fmt: skip
    assert out.sequences.shape[0] == 4 and len(out.texts) == 4
    for gates in out.gate_maps["default"].values():
        assert tuple(gates.shape) == tuple(out.sequences.shape) and not torch.isnan(gates[:, -2]).all()


def test_fit_save_load_generate_round_trip_and_two_steerers(lm, tmp_path):
    lm.steerers["default"].save_pretrained(tmp_path / "steering")
    expected = lm.generate(PROMPTS, steering_strength=4.0, steering_gate="none", **GREEDY).sequences
    other = DSASLanguageModel(lm.model, lm.tokenizer)
    other.load_steering(tmp_path / "steering")
    assert torch.equal(
        other.generate(PROMPTS, steering_strength=4.0, steering_gate="none", **GREEDY).sequences, expected
    )
    other.load_steering(tmp_path / "steering", name="again")
    both = other.generate(PROMPTS, steering_strength={"default": 2.0, "again": 2.0}, return_gate_maps=True, **GREEDY)
    assert set(both.gate_maps) == {"default", "again"}
    with pytest.raises(SteeringError, match="not loaded"):
        other.generate(PROMPTS, steering_strength={"nope": 1.0}, **GREEDY)


def test_hooks_are_removed_after_a_call_and_after_an_exception(lm):
    lm.generate(PROMPTS, steering_strength=1.0, **GREEDY)
    assert active_hook_names(lm.model) == []

    def explode(module, args):
        raise RuntimeError("boom inside the model")

    handle = lm.model.register_forward_pre_hook(explode)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            lm.generate(PROMPTS, steering_strength=1.0, **GREEDY)
    finally:
        handle.remove()
    assert active_hook_names(lm.model) == []


def test_a_streamer_thread_started_in_a_copied_context_is_steered(lm):
    expected = lm.generate(PROMPTS[:1], steering_strength=8.0, steering_gate="none", **GREEDY).texts[0]
    unsteered = lm.generate(PROMPTS[:1], steering_strength=0.0, **GREEDY).texts[0]
    batch = lm.tokenizer(PROMPTS[:1], return_tensors="pt")

    def stream(copied: bool) -> str:
        streamer = TextIteratorStreamer(lm.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**batch, **GREEDY, "streamer": streamer, "pad_token_id": 0}
        with lm.steering(8.0, gate="none"):
            target = contextvars.copy_context().run if copied else (lambda f, **k: f(**k))
            thread = threading.Thread(target=target, args=(lm.model.generate,), kwargs=kwargs)
            thread.start()
            text = "".join(streamer)
            thread.join()
        return " ".join(text.split())

    assert stream(copied=True) == " ".join(expected.split())
    if expected != unsteered:  # a thread outside the context is not steered (context-scoped hooks)
        assert stream(copied=False) == " ".join(unsteered.split())


def test_perplexity_is_the_models_own_loss_and_padding_does_not_change_it(lm):
    alone = [lm.perplexity([text], steering_strength=0.0)[0] for text in CONTROL[:3]]
    batched = lm.perplexity(CONTROL[:3], steering_strength=0.0, batch_size=3)
    np.testing.assert_allclose(batched, alone, rtol=1e-4)
    ids = lm.tokenizer(CONTROL[:1], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = lm.model(input_ids=ids, labels=ids).loss
    assert alone[0] == pytest.approx(float(torch.exp(loss)), rel=1e-4)
    assert lm.perplexity(CONTROL[:1], steering_strength=8.0, steering_gate="none")[0] != pytest.approx(alone[0])


def test_gates_of_finished_texts(lm):
    (first,) = lm.gates(SOURCE[:1], steering_strength=1.0)
    tokens = lm.tokenizer.tokenize(SOURCE[0])
    assert first["tokens"] == tokens
    assert all(len(g) == len(tokens) for g in first["gate_maps"]["default"].values())


def test_a_module_that_is_not_the_token_stream_is_refused(lm):
    width_changes = next(
        n for n, m in lm.model.named_modules() if n.endswith(("mlp.c_fc", "mlp.up_proj", "gate_up_proj"))
    )
    with pytest.raises(SteeringError, match="not the token stream"):
        lm.fit_steering(SOURCE, TARGET, CONTROL, hook_points=[width_changes], progress=False, name="x")
    with pytest.raises(SteeringError, match="does not have; use sample_decision='per-layer'"):
        lm.fit_steering(SOURCE, TARGET, CONTROL, sample_gate=True, steering_steps=(0.5, 1), name="x",
                        sample_decision="accumulated")  # fmt: skip
    assert "x" not in lm.steerers


def test_text_and_image_steerers_refuse_each_other(lm, tmp_path):
    steerer = lm.steerers["default"]
    assert steerer.provenance["modality"] == "text"
    image = Steerer(list(steerer.layers), provenance={"modality": "image", "pipeline_class": "X"})
    with pytest.raises(IncompatibleSteeringError, match="image pipeline"):
        DSASLanguageModel(lm.model, lm.tokenizer).load_steering(image)


def test_a_diffusion_pipeline_refuses_a_text_steerer(lm, tmp_path):
    from tiny_pipelines import build as build_pipeline

    pipe = build_pipeline("sd", tmp_path).dsas()
    with pytest.raises(IncompatibleSteeringError, match="language model"):
        pipe.load_steering(lm.steerers["default"])


def test_fitting_keeps_as_many_numbers_for_long_texts_as_for_short_ones():
    """The collector behind fit_steering keeps pooled rows and a fixed number of positions per
    text, never whole activations: its memory does not grow with the length of the texts."""
    from dsas_diffusion.steering import ActivationCollector

    model, tokenizer = build("qwen2")
    points = hook_points(model, "residual")
    kept = []
    for words in (3, 60):
        texts = [" ".join(["red banana"] * words)] * 4
        batch = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad(), ActivationCollector(model, points, positions_per_sample=2) as collector:
            with collector.masked(batch["attention_mask"]):
                model(**batch)
        kept.append(sum(t.numel() for t in [*collector.pooled().values(), *collector.positions().values()]))
    assert kept[0] == kept[1] > 0


def test_contrast_gates_fit_on_paired_texts_of_different_lengths():
    """gate_fit_on='contrast' pairs source and target batches position by position: they are
    padded to one length even when a target text is shorter than its source."""
    model, tokenizer = build("qwen2")
    lm = DSASLanguageModel(model, tokenizer)
    source = [f"a {c} banana lies on a {b} background" for c in COLOURS for b in ("black", "white")]
    target = [f"a {c} circle" for c in COLOURS for b in ("black", "white")]
    steerer = lm.fit_steering(source, target, CONTROL, gate_fit_on="contrast", gate_threshold=None, progress=False)
    assert all(np.isfinite(layer.gate.accuracy) for layer in steerer.layers)
