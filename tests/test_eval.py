"""The evaluation: CLIP metrics on known images, the trade-off summary, config errors, and
whole runs on shapes-sd (cache reuse, sharding over two accelerate processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsas_diffusion.eval import ClipScorer, ConfigError, hypervolume, load_config, parse_method
from dsas_diffusion.shapes.data import render_scene, sample_spec, scene_seed

PROMPTS = Path(__file__).resolve().parents[1] / "dsas_diffusion" / "shapes" / "prompts" / "banana"


@pytest.fixture(scope="module")
def scorer() -> ClipScorer:
    return ClipScorer("shapes-clip")


@pytest.fixture(scope="module")
def scenes():
    return [render_scene(sample_spec(scene_seed(i, "eval"))) for i in range(60)]


def test_clip_score_prefers_the_images_own_caption(scorer, scenes):
    images = [s.image for s in scenes]
    own = scorer.clip_score(images, [s.caption for s in scenes])
    # each image against the next scene's caption (a different scene)
    wrong = scorer.clip_score(images, [s.caption for s in scenes[1:] + scenes[:1]])
    assert (own > wrong).float().mean() >= 0.95
    assert own.mean() > wrong.mean() + 10


def test_concept_presence_is_higher_on_images_that_show_the_concept(scorer, scenes):
    shows = torch.tensor([any(o.shape == "banana" for o in s.spec.objects) for s in scenes])
    assert 0 < int(shows.sum()) < len(scenes)
    presence = scorer.concept_presence([s.image for s in scenes], "banana")
    assert presence.min() >= 0 and presence.max() <= 1
    assert presence[shows].mean() > presence[~shows].mean() + 0.3


def test_image_similarity_is_one_to_itself_and_lower_to_another_scene(scorer, scenes):
    images = [s.image for s in scenes[:10]]
    same = scorer.image_similarity(images, images)
    other = scorer.image_similarity(images, [s.image for s in scenes[10:20]])
    assert torch.allclose(same, torch.ones(10), atol=1e-5)
    assert (other < 0.99).all()
    with pytest.raises(ValueError, match="one reference per image"):
        scorer.image_similarity(images, images[:3])


def test_hypervolume_is_the_area_of_the_dominated_region():
    assert hypervolume([(1.0, 0.0)]) == 0.0
    assert hypervolume([(0.5, 0.5)]) == 0.25
    # a dominated point adds nothing; an extra non-dominated one adds its own rectangle
    assert hypervolume([(0.5, 0.5), (0.4, 0.4)]) == 0.25
    assert hypervolume([(0.5, 0.5), (1.0, 0.2)]) == pytest.approx(0.25 + 0.5 * 0.2)
    assert hypervolume([(1.0, 1.0), (0.3, 0.9)]) == 1.0


def _config(**fields):
    base = {
        "concept": "banana",
        "source": str(PROMPTS / "source.txt"),
        "target": str(PROMPTS / "target.txt"),
        "control": str(PROMPTS / "control.txt"),
        "concept_prompts": ["a yellow banana on a white background"],
        "control_prompts": ["a green star on a black background"],
    }
    base.update(fields)
    return base


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"methods": ["caa/sometimes"]}, "unknown method 'caa/sometimes'"),
        ({"methods": ["iti/e2e"]}, "use 'lineas/e2e'"),
        ({"methods": []}, "methods is empty"),
        ({"concept_prompts": []}, "concept_prompts is empty"),
        ({"source": None}, "source prompts are missing"),
        ({"control": "/nonexistent/control.txt"}, "does not exist"),
        ({"strengths": ["strong"]}, "strengths must be .auto. or numbers"),
        ({"strengths": [0]}, "at least one strength above 0"),
        ({"strengths": [1, float("nan")]}, "finite numbers"),
        ({"seeds": [0.5]}, "seeds must be a non-empty list of integers"),
        ({"concept": ""}, "concept is empty"),
        ({"steering": "/nonexistent"}, "not a steering directory"),
        ({"concept_template": "a picture"}, "must contain '{concept}'"),
        ({"steering_cfg": "half"}, "steering_cfg must be"),
        ({"height": "big"}, "height must be int or null, got 'big'"),
        ({"width": 30}, "width must be a multiple of 8"),
        ({"num_inference_steps": "ten"}, "num_inference_steps must be int"),
        ({"guidance_scale": True}, "guidance_scale must be int or float or null"),
    ],
)
def test_bad_configs_fail_with_a_message_naming_the_field(fields, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, _config(**fields))


def test_config_files_unknown_fields_and_parse_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("concept: banana\nstrenghts: [1, 2]\n")
    with pytest.raises(ConfigError, match=r"unknown config fields \['strenghts'\]"):
        load_config(bad)
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid json"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "empty.txt").write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="has no prompts"):
        load_config(None, _config(control=str(tmp_path / "empty.txt")))
    # prompt files in a config are read relative to the config file
    (tmp_path / "concept.txt").write_text("a yellow banana on a white background\n\n")
    good = tmp_path / "good.yaml"
    good.write_text(
        f"concept: banana\nsource: {PROMPTS / 'source.txt'}\ntarget: {PROMPTS / 'target.txt'}\n"
        f"control: {PROMPTS / 'control.txt'}\nconcept_prompts: concept.txt\ncontrol_prompts: [a red square on a gray background]\n"
        "methods: [linear-act/dsas, lineas/e2e]\nstrengths: [2, 1]\n"
    )
    config = load_config(good)
    assert config.concept_prompts == ["a yellow banana on a white background"]
    assert [m.name for m in config.method_list] == ["linear-act/dsas", "lineas/e2e"]
    assert config.strength_list == [0.0, 1.0, 2.0]
    assert parse_method("lineas/e2e").fit_gate == "e2e"


def test_cli_reports_config_errors_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dsas_diffusion.cli", "eval", "--concept", "banana", "--methods", "caa/never"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "dsas eval:" in result.stderr and "Traceback" not in result.stderr


TINY = {
    "model": "shapes-sd",
    "concept": "banana",
    "source": str(PROMPTS / "source.txt"),
    "target": str(PROMPTS / "target.txt"),
    "control": str(PROMPTS / "control.txt"),
    "concept_prompts": ["a yellow banana on a white background", "a blue banana on a black background"],
    "control_prompts": ["a green star on a black background", "a red square on a gray background"],
    "seeds": [0],
    "strengths": [0, 3],
    "methods": ["caa/none", "caa/dsas"],
    "num_inference_steps": 4,
    "batch_size": 4,
    "score_batch_size": 5,  # three chunks of images to score, dealt to two processes
    "fit": {"num_inference_steps": 4},
}


def _run(config_path: Path, out: Path, *launcher: str) -> dict:
    # one thread per process, in the sharded and the unsharded runs alike: float sums then
    # run in the same order, so the two must agree exactly
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [*launcher] if launcher else [sys.executable]
    command += ["-m", "dsas_diffusion.eval", "--config", str(config_path), "--out", str(out), "--no-progress"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """The tiny evaluation run once: its output folder, config file and rows."""
    work = tmp_path_factory.mktemp("eval")
    config_path = work / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    out = work / "single"
    run = _run(config_path, out)
    return out, run, json.loads((out / "rows.json").read_text())


def _copy_of(first_run, tmp_path) -> tuple[Path, Path]:
    """A private copy of the first run's folder (cache included) and a config path beside it."""
    import shutil

    out = tmp_path / "single"
    shutil.copytree(first_run[0], out)
    return out, tmp_path / "tiny.json"


@pytest.mark.slow
def test_a_run_renders_every_image_and_writes_the_report(first_run):
    out, run, rows = first_run
    assert (run["images"], run["generated"], run["reused"]) == (12, 12, 0)
    assert len(rows) == 12 and {r["method"] for r in rows} == {"unsteered", "caa/none", "caa/dsas"}
    for name in (
        "summary.csv",
        "methods.csv",
        "pareto_similarity.png",
        "pareto_clip_score.png",
        "pareto_detector.png",
        "grids/caa_dsas.png",
        "grids/caa_none.png",
    ):
        assert (out / name).is_file(), name
    assert len(list((out / "images").glob("*.png"))) == 12


@pytest.mark.slow
def test_a_rerun_renders_nothing_and_leaves_the_cache_untouched(first_run, tmp_path):
    out, config_path = _copy_of(first_run, tmp_path)
    config_path.write_text(json.dumps(TINY))
    stamps = {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")}
    again = _run(config_path, out)
    assert (again["generated"], again["reused"]) == (0, 12)
    assert {p: p.stat().st_mtime_ns for p in (out / "images").glob("*.png")} == stamps
    assert json.loads((out / "rows.json").read_text()) == first_run[2]


@pytest.mark.slow
def test_an_extended_sweep_renders_only_the_new_strength(first_run, tmp_path):
    out, config_path = _copy_of(first_run, tmp_path)
    config_path.write_text(json.dumps({**TINY, "strengths": [0, 2, 3]}))
    extended = _run(config_path, out)
    assert (extended["generated"], extended["reused"]) == (8, 12)  # 2 methods x 4 prompts
    config_path.write_text(json.dumps(TINY))
    assert _run(config_path, out)["generated"] == 0  # back to the first sweep: all cached


@pytest.mark.slow
def test_two_accelerate_processes_give_exactly_the_one_process_rows(first_run, tmp_path):
    config_path = tmp_path / "tiny.json"
    config_path.write_text(json.dumps(TINY))
    sharded = tmp_path / "sharded"
    accelerate = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    run = _run(config_path, sharded, *accelerate)
    assert run["processes"] == 2 and run["generated"] == 12
    assert json.loads((sharded / "rows.json").read_text()) == first_run[2]
    assert (sharded / "summary.csv").read_text() == (first_run[0] / "summary.csv").read_text()


@pytest.mark.slow
def test_a_fitted_steering_directory_reuses_every_cached_image(first_run, tmp_path):
    out, config_path = _copy_of(first_run, tmp_path)
    config_path.write_text(json.dumps({**TINY, "steering": str(out / "steering" / "caa-dsas"), "methods": "all"}))
    from_dir = _run(config_path, out)
    assert (from_dir["generated"], from_dir["reused"]) == (0, 12)
    assert json.loads((out / "rows.json").read_text()) == first_run[2]


@pytest.mark.slow
def test_the_caches_know_a_model_by_its_files(first_run, tmp_path):
    """A copy of shapes-sd is the same model (all cached); retrained weights in that folder
    refit the steerers and render every image again."""
    import shutil

    from safetensors.torch import load_file, save_file

    from dsas_diffusion.shapes import resolve_model_path

    out, config_path = _copy_of(first_run, tmp_path)
    model = tmp_path / "retrained" / "shapes-sd"  # the folder `shapes.train sd --out retrained` writes
    shutil.copytree(resolve_model_path("shapes-sd"), model)
    config_path.write_text(json.dumps({**TINY, "model": str(model)}))
    assert _run(config_path, out)["generated"] == 0
    fit_key = (out / "steering" / "caa-dsas" / "fit_key.txt").read_text()
    weights_file = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(weights_file))
    weights["conv_out.bias"] = weights["conv_out.bias"] + 0.01
    save_file(weights, str(weights_file))
    retrained = _run(config_path, out)
    assert (retrained["generated"], retrained["reused"]) == (12, 0)
    assert (out / "steering" / "caa-dsas" / "fit_key.txt").read_text() != fit_key


PAIRS = [
    "a yellow banana and a red square on a black background",
    "a purple banana and a blue circle on a white background",
]


@pytest.mark.slow
def test_an_adaptive_sweep_gives_each_method_its_own_range_and_extends_through_the_cache(first_run, tmp_path):
    copy, config_path = _copy_of(first_run, tmp_path)
    adaptive = {**TINY, "strengths": "auto", "sweep": {"start": 1.5, "max": 6}, "pairs_prompts": PAIRS, "bootstrap": 50}
    adaptive["pairs_screen_seeds"] = 4
    # a new output folder that does not exist yet, sharing the first run's image cache
    adaptive["cache_dir"] = str(copy / "images")
    out = tmp_path / "adaptive" / "out"
    config_path.write_text(json.dumps(adaptive))
    run = _run(config_path, out)
    rows = json.loads((out / "rows.json").read_text())
    for method in ("caa/none", "caa/dsas"):
        strengths = sorted({r["strength"] for r in rows if r["method"] == method})
        assert strengths == [1.5, 3.0, 6.0][: len(strengths)] and strengths, (method, strengths)
        assert run["sweep_stopped"][method], method  # every sweep says why it stopped
        # 4-step images rarely draw both objects of a pair: no unit may pass the screening,
        # and then the spatial test is left out rather than counted on ineligible images
        groups = {r["group"] for r in rows if r["method"] == method}
        assert groups == {"concept", "control"} | ({"pairs"} if run["pair_units"] else set())
    # the pairs were screened over four seeds; the test runs on the first seed per prompt
    # whose unsteered image shows both objects, and only there
    from dsas_diffusion.eval.sweep import screen_pairs

    screened = [
        dict(zip(("prompt", "seed", "concept_drawn", "others_drawn"), r, strict=True)) for r in run["pairs_screened"]
    ]
    assert sorted((r["prompt"], r["seed"]) for r in screened) == sorted((p, s) for p in PAIRS for s in range(4))
    units = {tuple(unit) for unit in run["pair_units"]}
    assert units == set(screen_pairs(screened, PAIRS, 1))
    pair_rows = [r for r in rows if r["group"] == "pairs"]
    assert {(r["prompt"], r["seed"]) for r in pair_rows} == units
    assert all(r["concept_drawn"] == r["others_drawn"] == 1.0 for r in pair_rows if r["method"] == "unsteered")
    # the fixed sweep's unsteered images were found in the cache
    assert run["reused"] >= 4 and run["generated"] + run["reused"] == run["images"]
    assert run["images"] == len(rows) + len(screened) - len(units)
    operating = (out / "operating.csv").read_text().splitlines()
    assert operating[0].startswith("method,similarity,rule,strength,reached,concept_drawn,concept_drawn_low")
    assert len(operating) == 1 + 2 * 2 * 2  # two methods x two thresholds x two rules
    assert "spatial_removed" in operating[0] and "Operating points" in (out / "summary.md").read_text()
    # a higher maximum renders only the strengths the first sweep did not reach
    config_path.write_text(json.dumps({**adaptive, "sweep": {"start": 1.5, "max": 12}}))
    extended = _run(config_path, out)
    assert extended["reused"] >= run["images"]
