"""The shipped ``shapes-lm``: stock loading offline, and text that follows the Shapes grammar."""

import pytest
import torch

from dsas_diffusion.shapes import WEIGHTS_DIR, resolve_model_path
from dsas_diffusion.shapes.text import InvalidText, parse_document, sample_document
from dsas_diffusion.shapes.training.lm import HELD_OUT_SEED, heldout_cross_entropy
from dsas_diffusion.text import DSASLanguageModel


@pytest.fixture(scope="module")
def lm():
    return DSASLanguageModel.from_pretrained("shapes-lm")


def test_shapes_lm_loads_with_the_auto_classes_and_its_tokenizer_round_trips_documents():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model_path("shapes-lm")
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float16  # as stored
    for seed in range(300):
        text = sample_document(HELD_OUT_SEED + seed).text
        ids = tokenizer(text).input_ids
        assert tokenizer.unk_token_id not in ids and tokenizer.decode(ids, skip_special_tokens=True) == text


def test_greedy_continuations_of_held_out_first_sentences_are_documents_of_the_grammar(lm):
    prompts = [sample_document(HELD_OUT_SEED + seed).sentences[0] + "." for seed in range(24)]
    generation = lm.generate(prompts, max_new_tokens=80, do_sample=False)
    assert lm.model.dtype == torch.float32
    invalid = []
    for prompt, continuation in zip(prompts, generation.texts, strict=True):
        try:
            parse_document(prompt + " " + continuation if continuation.strip() else prompt)
        except InvalidText as error:
            invalid.append(str(error))
    assert len(invalid) <= 1, invalid


def test_held_out_cross_entropy_is_close_to_the_generators_entropy(lm):
    entropy = heldout_cross_entropy(lm.model, lm.tokenizer, count=300)
    assert entropy["generator"] <= entropy["model"] + 0.02  # the generator is the best possible model
    assert entropy["model"] - entropy["generator"] < 0.05  # the quality bar


def test_references_name_an_object_the_text_introduced(lm):
    """After two introduced objects, "look at the" goes on with one of their colours or shapes:
    the model reads the context (an n-gram-like model spreads it over every colour and shape)."""
    from dsas_diffusion.shapes.data import COLOURS, SHAPES

    pairs = [(colour, shape) for shape in SHAPES for colour in COLOURS]
    shares = []
    for first, second in zip(pairs, pairs[7:] + pairs[:7], strict=True):
        if first == second:
            continue
        text = f"a {' '.join(first)} lies on the left. a {' '.join(second)} is on the right. look at the"
        batch = lm.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            probs = lm.model(**batch).logits[0, -1].softmax(-1)
        words = {first[0], second[0]} | ({first[1], second[1]} if first[1] != second[1] else set())
        shares.append(sum(float(probs[lm.tokenizer.convert_tokens_to_ids("▁" + w)]) for w in words))
    assert len(shares) >= 10 and sum(shares) / len(shares) > 0.75, shares


def test_every_shipped_weight_file_together_stays_within_50_mb():
    total = sum(path.stat().st_size for path in WEIGHTS_DIR.rglob("*") if path.is_file())
    assert total < 50 * 2**20, f"{total / 2**20:.1f} MiB"


@pytest.mark.numerics
def test_shipped_text_examples_are_what_their_recipe_fits(lm, tmp_path):
    """Every concept and map of the Text tab ships, and refitting one gives its tensors."""
    from safetensors.torch import load_file

    from dsas_diffusion.shapes import TEXT_CONCEPTS, TEXT_EXAMPLE_MAPS, fit_text_example, text_example_steerings

    shipped = text_example_steerings()
    assert set(shipped) == {(c, m) for c in TEXT_CONCEPTS for m in TEXT_EXAMPLE_MAPS}
    wrapper = DSASLanguageModel(lm.model, lm.tokenizer)  # the fit loads its steerer here, not on the fixture
    refitted = load_file(
        fit_text_example(wrapper, "negative", "caa", tmp_path / "negative-caa") / "steering.safetensors"
    )
    original = load_file(shipped[("negative", "caa")] / "steering.safetensors")
    assert refitted.keys() == original.keys()
    for name, tensor in original.items():
        torch.testing.assert_close(refitted[name], tensor, atol=1e-4, rtol=1e-4, msg=name)
