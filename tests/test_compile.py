"""Steering under torch.compile: an attached session is traced into the graph without breaks,
gives the eager result, reads λ from a tensor (no recompile when it changes), is the compiled
stock model at λ = 0, stays scoped to its thread and lets activations through once detached."""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from dsas_diffusion.shapes import text_example_steerings
from dsas_diffusion.steering import Steerer, fit_steerer


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


@pytest.mark.parametrize("gate", [True, False])
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


@pytest.mark.slow
@torch.no_grad()
def test_a_compiled_language_model_forward_is_steered_without_recompiling():
    from dsas_diffusion.text import DSASLanguageModel

    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    lm.load_steering(Steerer.from_pretrained(text_example_steerings()[("banana", "linear-act")]))
    batch = lm.tokenizer(["a yellow banana lies on the left.", "a red square."], return_tensors="pt", padding=True)
    # dynamo traces the hooks; aot_eager keeps the test short (inductor is the toy test's)
    stock = torch.compile(copy.deepcopy(lm.model), backend="aot_eager")(**batch).logits
    torch._dynamo.reset()
    counters.clear()
    # a session attached once and kept (lm.steering(...) attaches per block; at λ = 0 it attaches nothing)
    with lm.steerers["default"].apply(lm.model, strength=0.0, gate=True) as session:
        assert torch._dynamo.explain(lm.model)(**batch).graph_break_count == 0
        torch._dynamo.reset()
        compiled = torch.compile(lm.model, backend="aot_eager")
        assert torch.equal(compiled(**batch).logits, stock)
        before = graphs()
        for strength in (0.5, 1.0):
            session.strength = strength
            torch.testing.assert_close(compiled(**batch).logits, lm.model(**batch).logits, atol=1e-4, rtol=1e-4)
        assert graphs() == before
