"""The text evaluation: `dsas eval` on the embedded shapes-lm, its prompt sets and measures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsas_diffusion.eval import ConfigError, load_config, run_evaluation
from dsas_diffusion.eval.text import continuation_logprob, prefix_match
from dsas_diffusion.prompts import read_prompts
from dsas_diffusion.shapes.concepts import PROMPTS_DIR
from dsas_diffusion.shapes.text import parse_document, sentence_error, split_sentences
from dsas_diffusion.shapes.text_sets import (
    HELD_OUT_TEXT_CONCEPTS,
    TEXT_CONCEPTS,
    grammar_checks,
    make_text_sets,
    mentions,
    neutral_version,
    text_concept_files,
    without_concept,
)
from dsas_diffusion.text import DSASLanguageModel

BANANA = PROMPTS_DIR / "banana"
TINY = {
    "model": "shapes-lm",
    "concept": "banana",
    "source": str(BANANA / "source.txt"),
    "target": str(BANANA / "target.txt"),
    "control": str(BANANA / "control.txt"),
    "concept_prompts": ["a yellow banana lies on the left.", "we see a small red banana at the top."],
    "control_prompts": ["a green star on a black background. the", "a red square lies on the right. look at"],
    "seeds": [0, 1],
    "strengths": [2],
    "methods": ["caa/none", "caa/dsas"],
    "fit": {"n_components": 20, "gate_threshold": None},
    "max_new_tokens": 12,
    "bootstrap": 20,
    "batch_size": 8,
}


# -- the prompt sets --------------------------------------------------------------------------
@pytest.mark.parametrize("concept", TEXT_CONCEPTS + HELD_OUT_TEXT_CONCEPTS)
def test_shipped_text_sets_are_what_the_generator_draws_and_keep_their_promises(concept):
    sets = make_text_sets(concept)
    files = text_concept_files(concept, documents=True)
    for name, prompts in sets.items():
        assert read_prompts(files[name]) == prompts, f"{files[name]} differs from make_text_sets({concept!r})"
    captions = text_concept_files(concept, documents=False)  # banana, red, star: the image prompt files too
    fitting = [
        p.rstrip(".") + "."
        for paths in (files, captions)
        for name in ("source", "target", "control")
        for p in read_prompts(paths[name])
    ]
    for prompt in sets["eval_concept"]:
        assert prompt.endswith(".") and not any(text.startswith(prompt) for text in fitting)
        assert sentence_error(prompt[:-1]) is None and mentions(prompt, concept)
    for prompt in sets["eval_control"]:
        assert not mentions(prompt, concept) and not any(text.startswith(prompt) for text in fitting)
    if concept == "negative":
        for source, target in zip(sets["source"], sets["target"], strict=True):
            assert all(mentions(s, "negative") for s in split_sentences(source))
            assert not mentions(target, "negative") and target == neutral_version(source)
            assert all(sentence_error(s) is None for s in split_sentences(target))
    else:  # the same documents with the concept swapped for what they do not have
        for source, target in zip(sets["source"], sets["target"], strict=True):
            assert mentions(source, concept) and not mentions(target, concept)
            assert target == without_concept(parse_document(source), concept)
            assert len(parse_document(target).objects) == len(parse_document(source).objects)
        assert text_concept_files(concept, documents=False)["source"] == PROMPTS_DIR / concept / "source.txt"
    for text in sets["control"]:
        parse_document(text)
        assert not mentions(text, concept)


def test_mentions_reads_object_words_and_the_register_only():
    assert mentions("the red square is on the left.", "red")
    with pytest.raises(ValueError, match="not a text concept"):
        mentions("a blue star on a white background.", "white")  # a background, never an object
    assert not mentions("a blue star on a black background.", "red")
    assert mentions("a gross blue star lies on the left.", "negative")
    with pytest.raises(ValueError, match="not a text concept"):
        mentions("a blue star.", "toxicity")


def test_prefix_match_and_grammar_checks():
    assert prefix_match([1, 2, 3], [1, 2, 3]) == 1.0 and prefix_match([1, 2, 3], [1, 2, 3, 4]) == 0.75
    assert prefix_match([7], [8, 9]) == 0.0
    assert grammar_checks("a red star lies on the left. the star is easy to see.") == (1.0, 1.0)
    assert grammar_checks("a red star lies on the left. the square is easy to see.") == (1.0, 0.0)
    assert grammar_checks("a red star lies on the left. the star is easy") == (1.0, 1.0)  # the cut sentence is left out
    assert grammar_checks("a red star lies lies on the left.") == (0.0, 0.0)
    assert all(math.isnan(v) for v in grammar_checks("a red star"))


def test_continuation_logprob_of_a_padded_batch_equals_each_sequence_alone():
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    ids = lm.tokenizer(["a red star lies on the left. the star is easy to see.", "a blue circle."])["input_ids"]
    batched = continuation_logprob(lm, ids, [3, 2])
    for sequence, start, value in zip(ids, [3, 2], batched, strict=True):
        with torch.no_grad():
            logp = lm.model(torch.tensor([sequence])).logits[0].log_softmax(-1)
        alone = float(torch.stack([logp[t - 1, sequence[t]] for t in range(start, len(sequence))]).mean())
        assert value == pytest.approx(alone, abs=1e-5)


# -- a run ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("text-eval")
    config = load_config(None, {**TINY, "out": str(out)})
    return out, run_evaluation(config, progress=False)


def test_a_text_run_generates_scores_and_reports(text_run):
    out, result = text_run
    rows = result.rows
    # concept: 2 prompts x 2 seeds, control: 2 prompts greedy (first seed): 6 per setting, 3 settings
    assert (result.generated, result.reused, len(rows)) == (18, 0, 18)
    for name in ("summary.md", "summary.csv", "operating.csv", "methods.csv", "pareto.png", "samples.md", "rows.csv"):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.json"))) == 18
    for row in rows:
        assert row["concept_drawn"] == float(mentions(row["continuation"], "banana"))
        if row["method"] == "unsteered" and row["group"] == "control":
            assert (row["exact_match"], row["prefix_match"], row["loglik_change"]) == (1.0, 1.0, 0.0)
        if row["group"] == "control":
            assert (row["exact_match"] == 1.0) == (row["prefix_match"] == 1.0)
    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    greedy = lm.generate(TINY["control_prompts"], max_new_tokens=12, do_sample=False).texts
    unsteered = [r for r in rows if r["method"] == "unsteered" and r["group"] == "control"]
    assert [r["continuation"] for r in unsteered] == greedy


def test_a_text_rerun_generates_nothing(text_run, tmp_path):
    import shutil

    out = tmp_path / "again"
    shutil.copytree(text_run[0], out)
    again = run_evaluation(load_config(None, {**TINY, "out": str(out)}), progress=False)
    assert (again.generated, again.reused) == (0, 18)
    assert again.rows == text_run[1].rows


def test_a_classifier_scores_continuations(text_run, tmp_path):
    """Any local AutoModelForSequenceClassification (here a tiny random RoBERTa with the
    shapes-lm tokenizer) scores each continuation: the probability of its chosen label."""
    from transformers import AutoTokenizer, RobertaConfig, RobertaForSequenceClassification

    from dsas_diffusion.shapes import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("shapes-lm"))
    torch.manual_seed(0)
    classifier = RobertaForSequenceClassification(
        RobertaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=80,
            pad_token_id=tokenizer.pad_token_id,
            id2label={0: "neutral", 1: "toxic"},
            label2id={"neutral": 0, "toxic": 1},
        )
    ).eval()
    folder = tmp_path / "toxicity"
    classifier.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    import shutil

    out = tmp_path / "classified"
    shutil.copytree(text_run[0], out)
    fields = {**TINY, "out": str(out), "classifier": str(folder), "classifier_label": "toxic"}
    result = run_evaluation(load_config(None, fields), progress=False)
    assert result.generated == 0
    row = result.rows[0]
    encoded = tokenizer([row["continuation"]], return_tensors="pt")
    with torch.no_grad():
        expected = classifier(**encoded).logits.softmax(-1)[0, 1].item()
    assert row["classifier_score"] == pytest.approx(expected, abs=1e-4)
    with pytest.raises(ConfigError, match="not one of the classifier's labels"):
        run_evaluation(load_config(None, {**fields, "classifier_label": "hateful"}), progress=False)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"pairs_prompts": ["a yellow banana and a red square on a black background"]}, "spatial test"),
        ({"similarity": "clip_similarity"}, "similarity must be one of"),
        ({"concept": "toxicity"}, "detector: none"),
        ({"concept_words": "banana"}, "concept_words"),
        ({"classifier": "/no/such/folder"}, "is not a folder"),
    ],
)
def test_text_configs_that_cannot_run_are_refused(fields, message, tmp_path):
    config = load_config(None, {**TINY, "out": str(tmp_path), **fields})
    with pytest.raises(ConfigError, match=message):
        run_evaluation(config, progress=False)


@pytest.mark.slow
def test_two_accelerate_processes_give_the_one_process_text_rows(text_run, tmp_path):
    """Three batches (one per setting) dealt to two processes: the same continuations and,
    up to the threads' summation order, the same measures as the one-process run."""
    fitted = {key: value for key, value in TINY.items() if key not in ("source", "target", "control", "fit")}
    fitted["steering"] = str(text_run[0] / "steering" / "caa-dsas")  # no fitting in the subprocesses
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(fitted))
    accelerate = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    command = [*accelerate, "-m", "dsas_diffusion.eval", "--config", str(config_path)]
    command += ["--out", str(tmp_path / "sharded"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "sharded" / "run.json").read_text())["processes"] == 2
    sharded = json.loads((tmp_path / "sharded" / "rows.json").read_text())
    single = text_run[1].rows
    assert [r["continuation"] for r in sharded] == [r["continuation"] for r in single]
    for a, b in zip(sharded, single, strict=True):
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, abs=1e-4), key
