"""Steering under torch.compile: an attached session is traced into the graph without breaks,
gives the eager result, reads λ from a tensor (no recompile when it changes), is the compiled
stock model at λ = 0, stays scoped to its thread and lets activations through once detached."""

from __future__ import annotations

import copy
import threading
import warnings

import pytest
import torch
from kernels import needs_inductor
from torch import nn
from torch._dynamo.utils import counters

from dsas_diffusion.shapes import text_example_steerings
from dsas_diffusion.steering import Steerer, SteeringError, active_hook_names, fit_steerer
from dsas_diffusion.steering.compiled import compiled_kind, unwrap_compiled
from dsas_diffusion.steering.resident import ResidentSteering, drop_resident, resident_for


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture
def toy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16)).eval()
    batches = [[torch.randn(4, 6, 16) + shift for _ in range(8)] for shift in (1.0, 0.0, -1.0)]
    steerer = fit_steerer(model, ["0", "2"], *batches, map="linear-act", progress=False)
    torch._dynamo.reset()
    counters.clear()
    return model, steerer, torch.randn(3, 6, 16)


@needs_inductor
@pytest.mark.parametrize("gate", ["dsas", "none"])
@torch.no_grad()
def test_a_compiled_steered_model_matches_eager_and_never_recompiles_for_a_new_strength(toy, gate):
    model, steerer, x = toy
    stock = torch.compile(copy.deepcopy(model))(x)
    with steerer.apply(model, strength=0.0, gate=gate) as session:
        explained = torch._dynamo.explain(model)(x)
        assert explained.graph_break_count == 0 and explained.graph_count == 1
        torch._dynamo.reset()
        compiled = torch.compile(model)
        assert torch.equal(compiled(x), stock)  # λ = 0: the compiled stock model, bit for bit
        before = graphs()
        for strength in (1.0, 2.5, 0.5, 0.0, 4.0):
            session.strength = strength
            steered = compiled(x)
            torch.testing.assert_close(steered, model(x), atol=1e-5, rtol=1e-5)  # the eager result
        assert graphs() == before  # five strengths, no recompilation
        assert not torch.allclose(steered, stock)
        other = {}
        thread = threading.Thread(target=lambda: other.setdefault("out", compiled(x)))
        thread.start()
        thread.join()
        torch.testing.assert_close(other["out"], stock)  # the session acts in its own thread only
    torch.testing.assert_close(compiled(x), stock)  # detached: untouched, though the graph was traced with it


@needs_inductor
@pytest.mark.parametrize("gate", ["dsas", "none"])
@torch.no_grad()
def test_one_strength_per_sample_compiles_one_graph_for_every_mix_of_strengths(toy, gate):
    model, steerer, x = toy
    stock = copy.deepcopy(model)(x)
    with steerer.apply(model, strength=[0.0, 1.0, 2.0], gate=gate) as session:
        compiled = torch.compile(model)
        torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)  # the eager result
        before = graphs()
        for strengths in ([2.5, 0.0, 1.0], [0.5, 4.0, 0.0], [0.0, 0.0, 3.0]):
            session.strength = strengths
            steered = compiled(x)
            torch.testing.assert_close(steered, model(x), atol=1e-5, rtol=1e-5)
            for row, strength in enumerate(strengths):  # a sample at λ 0 is the stock model's
                assert torch.allclose(steered[row], stock[row], atol=1e-6, rtol=0) == (strength == 0.0)
        assert graphs() == before  # three mixes of strengths, no recompilation
        assert sum(counters["graph_break"].values()) == 0


@torch.no_grad()
@pytest.mark.parametrize("idiom", ["in-place", "wrapped", "regional"])
def test_resident_steering_is_seen_by_a_graph_traced_before_it_and_never_recompiles(toy, idiom):
    """Dynamo does not guard a hook dictionary that was empty when it traced: attaching the
    resident hooks drops the compiled code, so the graph traced unsteered is not reused."""
    model, steerer, x = toy
    stock = model(x)
    with steerer.apply(model, strength=2.0) as session:
        eager = {2.0: model(x)}
        for strength in (0.5, 1.0):
            session.strength = strength
            eager[strength] = model(x)
    called = model
    if idiom == "in-place":
        model.compile(backend="eager")
    elif idiom == "wrapped":
        called = torch.compile(model, backend="eager")
    else:
        model[2].compile(backend="eager")
    assert compiled_kind(called) == idiom and unwrap_compiled(called) is model
    assert torch.equal(called(x), stock)  # traced without hooks
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the library itself uses no deprecated spelling
        resident = ResidentSteering(called, {"toy": steerer})
    assert torch.equal(called(x), stock)  # attached, not active in this context: untouched
    with resident.steer({"toy": 2.0}):
        torch.testing.assert_close(called(x), eager[2.0], atol=1e-6, rtol=0)
    warm = graphs()
    for strength in (0.5, 1.0, 0.0, 2.0):
        with resident.steer({"toy": strength}):
            out = called(x)
        torch.testing.assert_close(out, eager.get(strength, stock), atol=1e-6, rtol=0)
    assert torch.equal(called(x), stock)
    assert graphs() == warm and sum(counters["graph_break"].values()) == 0
    with pytest.raises(SteeringError, match="beyond any useful value"), resident.steer({"toy": 1e4}):
        pass
    with pytest.raises(KeyError, match="no resident session"), resident.steer({"other": 1.0}):
        pass
    resident.detach()
    assert not active_hook_names(model)
    steerer.check_compatible(called)  # module names looked up through the compiled wrapper


def _negative_prompts() -> list[str]:
    from dsas_diffusion.prompts import read_prompts
    from dsas_diffusion.shapes.concepts import PROMPTS_DIR

    return read_prompts(PROMPTS_DIR / "text" / "negative" / "eval_concept.txt")[:8]


@pytest.fixture(scope="module")
def text_references():
    """shapes-lm with the shipped negative-register ITI steering, and eager references: seeded
    sampled continuations at λ 0, 2 and 4 and teacher-forced logits at λ 0 and 4."""
    from dsas_diffusion.text import DSASLanguageModel

    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    lm.load_steering(Steerer.from_pretrained(text_example_steerings()[("negative", "iti")]))
    prompts = _negative_prompts()
    sampled = {strength: _sample(lm, prompts, strength) for strength in (0.0, 2.0, 4.0)}
    assert not torch.equal(sampled[4.0], sampled[0.0])  # the steering changes what is sampled
    logits = {strength: _logits(lm, prompts, strength) for strength in (0.0, 4.0)}
    return lm.steerers["default"], prompts, sampled, logits


def _sample(lm, prompts, strength, **kwargs):
    torch.manual_seed(0)
    return lm.generate(prompts, steering_strength=strength, max_new_tokens=12, do_sample=True, **kwargs).sequences


def _logits(lm, prompts, strength):
    batch = lm._batches(prompts, len(prompts), None)[0]
    with torch.no_grad(), lm.steering(strength):
        return lm.model(**batch).logits


@pytest.mark.slow
@pytest.mark.parametrize("idiom", ["in-place", "wrapped", "generate"])
def test_a_compiled_language_model_steers_as_eager_without_recompiling(text_references, idiom):
    """``lm.model.compile()``, ``lm.model = torch.compile(lm.model)`` and transformers' automatic
    compile in ``generate`` (a static cache): the eager tokens and logits, no graph break, no
    new graph after the first unsteered and the first steered call."""
    from transformers import CompileConfig

    from dsas_diffusion.text import DSASLanguageModel

    steerer, prompts, sampled, logits = text_references
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    lm.load_steering(steerer)
    kwargs = {}
    if idiom == "in-place":
        lm.model.compile(backend="eager")
    elif idiom == "wrapped":
        lm.model = torch.compile(lm.model, backend="eager")
    else:  # on the CPU transformers compiles only when told to compile on every device
        config = CompileConfig(backend="eager")
        config._compile_all_devices = True
        kwargs = {"cache_implementation": "static", "compile_config": config}
    torch._dynamo.reset()
    counters.clear()
    for strength in (0.0, 4.0):  # the first unsteered and the first steered calls compile
        assert torch.equal(_sample(lm, prompts, strength, **kwargs), sampled[strength])
        torch.testing.assert_close(_logits(lm, prompts, strength), logits[strength], atol=1e-4, rtol=0)
    assert graphs() > 0  # something was compiled
    warm = graphs()
    for strength in (2.0, 0.0, 4.0):
        assert torch.equal(_sample(lm, prompts, strength, **kwargs), sampled[strength])
    torch.testing.assert_close(_logits(lm, prompts, 4.0), logits[4.0], atol=1e-4, rtol=0)
    assert graphs() == warm
    assert sum(counters["graph_break"].values()) == 0
    with_maps = lm.generate(prompts, steering_strength=4.0, max_new_tokens=3, return_gate_maps=True, **kwargs)
    assert with_maps.gate_maps["default"]  # recorded eagerly
    assert graphs() == warm
    if idiom != "generate":
        lm.unload_steering()
        assert not active_hook_names(lm.model)
        torch.testing.assert_close(_logits(lm, prompts, 0.0), logits[0.0], atol=1e-4, rtol=0)


def test_an_owner_keeps_one_resident_steering_and_releases_the_ones_it_replaces(toy):
    import gc
    import weakref

    model, steerer, _ = toy

    class Owner:  # a pipeline or a language model
        pass

    owner = Owner()
    first = resident_for(owner, model, {"toy": steerer}, ResidentSteering)
    assert resident_for(owner, model, {"toy": steerer}, ResidentSteering) is first  # same steerers: kept
    other = copy.deepcopy(steerer)
    released = weakref.ref(other)
    second = resident_for(owner, model, {"toy": other}, ResidentSteering)
    assert second is not first and not first.sessions  # other steerers: the old hooks are gone
    assert len(active_hook_names(model)) == len(steerer.layers)
    drop_resident(owner)
    assert not active_hook_names(model)
    del second, other
    gc.collect()
    assert released() is None  # nothing keeps a replaced steerer alive
    resident_for(owner, model, {"toy": steerer}, ResidentSteering)
    del owner
    gc.collect()
    assert not active_hook_names(model)  # the owner's hooks go with it
