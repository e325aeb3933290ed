"""The evaluation's baselines against the stock diffusers calls they stand for (a negative
prompt, Safe Latent Diffusion), the prompt-level gate, the empty-prompt test and the pixel
change outside the concept's mask, and a whole run with all of them on shapes-sd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_eval import PROMPTS, TINY, _run
from test_eval import _config as banana_config

from dsas_diffusion.eval import ConfigError, load_config, parse_method
from dsas_diffusion.eval.baselines import PromptGate, baseline_defaults, safe_latent_diffusion
from dsas_diffusion.eval.cache import UNSTEERED, ImageCache, Job
from dsas_diffusion.eval.operating import empty_rows, method_figures
from dsas_diffusion.eval.render import render

TWO = ["a yellow banana on a white background", ""]
TABLES = Path(__file__).resolve().parents[1] / "benchmarks" / "baselines_table.py"


def _tables(out: Path, *args: str) -> str:
    """What ``benchmarks/baselines_table.py`` (docs/baselines.md's tables) prints for a run."""
    done = subprocess.run([sys.executable, str(TABLES), str(out), *args], capture_output=True, text=True, check=True)
    return done.stdout


@pytest.fixture(scope="module")
def pipe():
    from dsas_diffusion.diffusion import load_pipeline

    pipe = load_pipeline("shapes-sd")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _config(**fields):
    """test_eval's banana config with the two image baselines, each at one setting."""
    baselines = {
        "strengths": "auto",
        "sweep": {"grids": {"negative-prompt": [7.5], "sld": [1000]}},
        "methods": ["negative-prompt", "sld"],
    }
    return banana_config(**{**baselines, **fields})


def _rendered(pipe, config, method: str, setting: float, tmp_path: Path) -> list[np.ndarray]:
    """The images the evaluation renders for ``method`` at ``setting`` on ``TWO``, as arrays."""
    cache = ImageCache(tmp_path, {}, {}, baselines={method: {"concept": "banana"}})
    jobs = [Job(method, setting, "concept", prompt, seed) for seed, prompt in enumerate(TWO)]
    render(pipe, config, [jobs], cache, {}, progress=False)
    return [np.asarray(Image.open(cache.path(job)).convert("RGB")) for job in jobs]


def _stock(images) -> list[np.ndarray]:
    return [np.asarray(image.convert("RGB")) for image in images]


def _generators():
    return [torch.Generator().manual_seed(seed) for seed in range(len(TWO))]


def test_the_negative_prompt_method_is_the_stock_call_with_the_concept_as_negative_prompt(pipe, tmp_path):
    from diffusers import StableDiffusionPipeline

    config = load_config(None, _config(num_inference_steps=6))
    ours = _rendered(pipe, config, "negative-prompt", 5.0, tmp_path)
    stock = StableDiffusionPipeline(**pipe.components)
    stock.set_progress_bar_config(disable=True)
    expected = stock(TWO, negative_prompt=["banana"] * 2, guidance_scale=5.0, generator=_generators(),
                     num_inference_steps=6).images  # fmt: skip
    plain = stock(TWO, guidance_scale=5.0, generator=_generators(), num_inference_steps=6).images
    for mine, theirs, without in zip(ours, _stock(expected), _stock(plain), strict=True):
        assert np.array_equal(mine, theirs)
        assert not np.array_equal(mine, without)  # the negative prompt changed the image


def test_sld_is_stable_diffusion_pipeline_safe_with_the_concept_as_safety_concept(pipe, tmp_path):
    from diffusers import StableDiffusionPipelineSafe

    steps = 14  # past SLD's 10 warm-up steps, so safety guidance acts
    config = load_config(None, _config(num_inference_steps=steps))
    ours = _rendered(pipe, config, "sld", 2000.0, tmp_path)
    components = {k: v for k, v in pipe.components.items() if k not in ("safety_checker", "feature_extractor")}
    safe = StableDiffusionPipelineSafe(**components, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)  # fmt: skip
    safe.set_progress_bar_config(disable=True)
    safe.safety_concept = "banana"
    expected = safe(TWO, generator=_generators(), num_inference_steps=steps, sld_guidance_scale=2000.0).images
    off = safe(TWO, generator=_generators(), num_inference_steps=steps, sld_guidance_scale=0.0).images
    for mine, theirs in zip(ours, _stock(expected), strict=True):
        assert np.array_equal(mine, theirs)
    assert any(not np.array_equal(m, w) for m, w in zip(ours, _stock(off), strict=True))  # SLD acted


def test_sld_exists_for_unet_pipelines_only():
    from dsas_diffusion.diffusion import load_pipeline

    with pytest.raises(ConfigError, match=r"Stable Diffusion \(UNet\) pipelines only.*remove 'sld'"):
        safe_latent_diffusion(load_pipeline("shapes-mmdit"), "banana")
    defaults = baseline_defaults("shapes-mmdit", None, [parse_method("negative-prompt")])
    assert defaults == {"negative-prompt": 7.0}  # StableDiffusion3Pipeline's guidance scale
    assert baseline_defaults("shapes-sd", 4.0, [parse_method("negative-prompt"), parse_method("sld")]) == {
        "negative-prompt": 4.0,
        "sld": 1000.0,
    }


def test_the_prompt_gate_reads_the_prompt_and_stands_for_uniform_steering_or_the_stock_call(pipe, tmp_path):
    from dsas_diffusion.prompts import read_prompts

    gate = PromptGate.fit(pipe, read_prompts(PROMPTS / "source.txt"), read_prompts(PROMPTS / "control.txt"))
    assert gate.accuracy > 0.9
    concept = read_prompts(PROMPTS / "eval_concept.txt")
    control = read_prompts(PROMPTS / "eval_control.txt")
    # held-out prompts: named bananas open it, other objects and the empty prompt mostly do not
    assert sum(gate.opens(pipe, concept)) >= 0.85 * len(concept)
    assert sum(gate.opens(pipe, control)) <= 0.15 * len(control)
    assert gate.opens(pipe, [""]) == [False]
    gate.save_pretrained(tmp_path / "gate")
    again = PromptGate.from_pretrained(tmp_path / "gate")
    assert again.openings(pipe, concept[:2]) == gate.openings(pipe, concept[:2])
    cache = ImageCache(tmp_path, {}, {"caa-dsas": "x"}, prompt_gates={concept[0]: True, "": False})
    assert cache.resolve(Job("caa/prompt", 2.0, "concept", concept[0], 1)) == Job(
        "caa/none", 2.0, "concept", concept[0], 1
    )
    assert cache.resolve(Job("caa/prompt", 2.0, "empty", "", 3)) == Job(UNSTEERED, 0.0, "empty", "", 3)
    with pytest.raises(KeyError, match="not read"):
        cache.resolve(Job("caa/prompt", 2.0, "concept", "a red star on a white background", 0))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"sweep": {}}, "give sweep.grids.negative-prompt"),
        ({"strengths": [1.0, 2.0]}, "use strengths: auto"),
        ({"sweep": {"grids": {"negative-prompt": [], "sld": [1]}}}, "non-empty list of numbers"),
        ({"sweep": {"grids": {"negative-prompt": ["x"], "sld": [1]}}}, "non-empty list of numbers"),
        ({"empty_seeds": 0}, "empty_seeds needs a number >= 1"),
        ({"methods": ["caa/sometimes"]}, "'prompt': a prompt-level gate"),
    ],
)
def test_bad_baseline_settings_fail_with_a_message(fields, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, _config(**fields))


def test_the_unasked_concept_counts_only_where_the_unsteered_image_shows_it():
    def row(method, strength, seed, drawn, similarity):
        return {"method": method, "strength": strength, "group": "empty", "prompt": "", "seed": seed,
                "concept_drawn": drawn, "clip_similarity": similarity, "pixel_change": 1 - similarity}  # fmt: skip

    rows = [row(UNSTEERED, 0.0, 0, 1.0, 1.0), row(UNSTEERED, 0.0, 1, 0.0, 1.0),
            row("caa/dsas", 1.0, 0, 0.0, 0.5), row("caa/dsas", 1.0, 1, 1.0, 0.9)]  # fmt: skip
    out = {(r["method"], r["seed"]): r for r in empty_rows(rows)}
    assert out[("caa/dsas", 0)]["unasked_drawn"] == 0.0 and np.isnan(out[("caa/dsas", 0)]["unasked_similarity"])
    assert np.isnan(out[("caa/dsas", 1)]["unasked_drawn"]) and out[("caa/dsas", 1)]["unasked_similarity"] == 0.9


def test_a_baseline_reports_its_best_grid_setting_and_its_default():
    rows = []
    for method, strength, drawn, similarity in [(UNSTEERED, 0.0, 1.0, 1.0), ("negative-prompt", 2.5, 0.0, 0.9),
                                                ("negative-prompt", 7.5, 0.5, 0.99)]:  # fmt: skip
        for seed in range(2):
            rows.append({"method": method, "strength": strength, "group": "concept", "prompt": "p", "seed": seed,
                         "concept_drawn": drawn if seed else 1.0, "concept_presence": 0.5})  # fmt: skip
            rows.append({"method": method, "strength": strength, "group": "control", "prompt": "q", "seed": seed,
                         "clip_similarity": similarity})  # fmt: skip
    lines = method_figures(rows, "negative-prompt", [0.98, 0.95], replicates=0, default=7.5)
    assert [(line["rule"], line["strength"]) for line in lines] == [("best", 7.5), ("default", 7.5), ("best", 7.5)]
    assert lines[0]["concept_drawn"][0] == 0.75  # 2.5 removes more but leaves control similarity at 0.9
    with pytest.raises(ValueError, match="default setting 5 is not among"):
        method_figures(rows, "negative-prompt", [0.98], replicates=0, default=5.0)


@pytest.mark.slow
def test_a_run_with_every_baseline_the_empty_prompt_and_the_region_change(tmp_path):
    config = {
        **TINY,
        "pairs_prompts": ["a yellow banana and a red square on a black background"],
        "empty_seeds": 3,
        "strengths": "auto",
        "sweep": {"start": 2, "max": 2, "grids": {"negative-prompt": [7.5], "sld": [1000]}},
        "methods": ["caa/none", "caa/prompt", "negative-prompt", "sld"],
        "bootstrap": 20,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    out = tmp_path / "out"
    run = _run(path, out)
    rows = json.loads((out / "rows.json").read_text())
    by = {(r["method"], r["group"], r["prompt"], r["seed"]): r for r in rows}
    # the prompt-level gate renders nothing of its own: where it opens (the named bananas and
    # the pair) its image is uniform steering's, where it stays shut (controls, "") the stock one
    # unsteered, caa/none and the two baselines, each on 2 + 2 + 1 prompts and 3 empty-prompt seeds
    assert run["generated"] == 4 * (2 + 2 + 1 + 3)
    for r in rows:
        if r["group"] == "pairs":  # the image's change is the two regions' changes, weighted by area
            low, high = sorted((r["inside_change"], r["outside_change"]))
            assert low - 1e-5 <= r["pixel_change"] <= high + 1e-5
            assert r["method"] != UNSTEERED or r["inside_change"] == r["outside_change"] == 0.0
    for (method, group, prompt, seed), row in by.items():
        if method != "caa/prompt":
            continue
        twin = by[("caa/none" if group in ("concept", "pairs") else UNSTEERED, group, prompt, seed)]
        assert row["image"] == twin["image"], (group, prompt)
        if group in ("control", "empty"):
            assert row["pixel_change"] == 0.0 and row["clip_similarity"] == pytest.approx(1.0, abs=1e-4)
    empty = [r for r in rows if r["group"] == "empty"]
    assert {r["method"] for r in empty} == {UNSTEERED, "caa/none", "caa/prompt", "negative-prompt", "sld"}
    assert all(r["concept_drawn"] in (0.0, 1.0) for r in empty)
    operating = (out / "operating.csv").read_text().splitlines()
    header = operating[0].split(",")
    for name in ("unasked_drawn", "unasked_similarity", "unasked_change", "control_similarity"):
        assert name in header
    assert sum(line.startswith("negative-prompt,,default,7.5") for line in operating) == 1
    assert sum(line.startswith("sld,,default,1000.0") for line in operating) == 1
    summary = (out / "summary.md").read_text()
    assert "rule 'default'" in summary and (out / "pareto_detector.png").is_file()
    # docs/baselines.md's tables and picture come from this run's files
    printed = _tables(out, "--similarity", "0.98", "--pictures", str(tmp_path))
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[0] for line in lines[1:]] == [
        "| caa/none", "| caa/prompt", "| negative-prompt", "| negative-prompt (default)", "| sld", "| sld (default)"
    ]  # fmt: skip
    assert "of 3 empty-prompt images" in printed and "on the empty prompt it stays shut" in printed
    assert Image.open(tmp_path / "baselines_shapes-sd_banana_empty.png").height > 0


@pytest.mark.slow
def test_text_baselines_ban_the_concepts_words_and_gate_on_the_prompt(tmp_path):
    from dsas_diffusion.eval import run_evaluation
    from dsas_diffusion.eval.baselines import bad_words_ids
    from dsas_diffusion.text import DSASLanguageModel

    lm = DSASLanguageModel.from_pretrained("shapes-lm")
    assert bad_words_ids(lm.tokenizer, ["banana"]) == [lm.tokenizer("banana", add_special_tokens=False).input_ids]
    with pytest.raises(ConfigError, match=r"none of .* is a word the tokenizer knows"):
        bad_words_ids(lm.tokenizer, ["zzzqqq"])
    config = load_config(None, {
        "model": "shapes-lm", "concept": "banana", "source": str(PROMPTS / "source.txt"),
        "target": str(PROMPTS / "target.txt"), "control": str(PROMPTS / "control.txt"),
        "concept_prompts": ["a yellow banana lies on the left.", "we see a small red banana at the top."],
        "control_prompts": ["a green star on a black background. the"],
        "seeds": [0, 1, 2], "strengths": "auto", "sweep": {"start": 2, "max": 2},
        "methods": ["caa/none", "caa/prompt", "bad-words"], "fit": {"n_components": 20, "gate_threshold": None},
        "max_new_tokens": 24, "bootstrap": 0, "batch_size": 8, "out": str(tmp_path / "out"),
    })  # fmt: skip
    rows = run_evaluation(config, progress=False).rows
    concept = {(r["method"], r["prompt"], r["seed"]): r for r in rows if r["group"] == "concept"}
    assert any(r["concept_drawn"] for (m, _, _), r in concept.items() if m == UNSTEERED)
    assert not any(r["concept_drawn"] for (m, _, _), r in concept.items() if m == "bad-words")
    openings = json.loads((tmp_path / "out" / "steering" / "prompt-gate" / "openings.json").read_text())["openings"]
    for (method, prompt, seed), row in concept.items():
        if method == "caa/prompt":
            twin = concept[("caa/none" if openings[prompt] >= 0.5 else UNSTEERED, prompt, seed)]
            assert row["continuation"] == twin["continuation"]
    printed = _tables(tmp_path / "out", "--similarity", "0.98")
    assert "Control prefix match ≥ 0.98" in printed and "| concept rate | grammatical | perplexity |" in printed
    assert "| bad-words | 1 | 1.00 | 0.00 |" in printed
    with pytest.raises(ConfigError, match="for a language model use 'bad-words'"):
        run_evaluation(load_config(None, {**config.__dict__, "methods": ["negative-prompt"],
                                          "sweep": {"grids": {"negative-prompt": [5]}}}))  # fmt: skip
