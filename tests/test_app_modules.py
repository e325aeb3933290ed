"""The app package's modules without a server: validation messages, example steerings,
locking, the model cache, gate overlays."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from dsas_diffusion import Steerer
from dsas_diffusion.app.actions import resolve_steering, strength_sweep
from dsas_diffusion.app.batching import RequestBatcher
from dsas_diffusion.app.images import gate_overlays, upscale
from dsas_diffusion.app.serving import ModelCache, ReadWriteLock, request_pipeline
from dsas_diffusion.app.validation import LIMITS, GenerateSettings, InputError, parse_prompt_list, validate_settings
from dsas_diffusion.shapes import concept_prompts, example_steerings

GOOD = GenerateSettings("a red star on a white background", seed=1, steps=10, guidance=7.5, strength=2.0, size=0)


def with_(**changes) -> GenerateSettings:
    return GenerateSettings(**{**GOOD.__dict__, **changes})


def test_valid_settings_are_coerced():
    settings = validate_settings(with_(prompt="  a red star on a white background ", seed=3.0, steps=12.0, size=128))
    assert settings == GenerateSettings("a red star on a white background", 3, 12, 7.5, 2.0, 128)
    assert isinstance(settings.steps, int) and isinstance(settings.seed, int)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": ""}, "The prompt is empty"),
        ({"prompt": None}, "The prompt is empty"),
        ({"prompt": "x" * (LIMITS.max_prompt_chars + 1)}, f"at most {LIMITS.max_prompt_chars}"),
        ({"steps": 0}, "Steps must be between 1 and 50, got 0"),
        ({"steps": 2.5}, "Steps must be a whole number"),
        ({"steps": "many"}, "Steps must be a number"),
        ({"seed": 2**32}, "The seed must be between 0 and 4294967295"),
        ({"guidance": 25}, "Guidance must be between 0.0 and 20.0"),
        ({"strength": -1}, "The strength λ must be between 0.0 and 10.0, got -1.0"),
        ({"strength": float("nan")}, "must be a finite number"),
        ({"size": 32}, "The image size must be between 64 and 1024"),
        ({"size": 100}, "multiple of 8"),
    ],
)
def test_invalid_settings_name_the_field_and_its_bounds(changes, message):
    with pytest.raises(InputError, match=message):
        validate_settings(with_(**changes))


def test_prompt_lists_skip_comments_and_refuse_empty_or_long_lists():
    assert parse_prompt_list(
        "# a comment\n\na red star on a white background\n  a blue circle on a black background  ", "source"
    ) == [
        "a red star on a white background",
        "a blue circle on a black background",
    ]
    with pytest.raises(InputError, match="The control prompt list is empty"):
        parse_prompt_list("\n# nothing\n", "control")
    with pytest.raises(InputError, match="has 201 prompts; at most 200"):
        parse_prompt_list("\n".join(["a red star on a white background"] * 201), "target")
    with pytest.raises(InputError, match="Line 2 of the source prompts is 301 characters"):
        parse_prompt_list("ok\n" + "x" * 301, "source")


def test_shipped_examples_were_fitted_on_shapes_sd_with_the_shipped_prompt_sets():
    from dsas_diffusion.shapes import EXAMPLE_FITS

    examples = example_steerings()
    assert set(examples) == set(EXAMPLE_FITS)
    for name, path in examples.items():
        steerer = Steerer.from_pretrained(path)
        assert steerer.provenance["base_model"] == "shapes-sd" and steerer.has_gates
        # fitted with the recipe's current settings (`dsas examples` refits them when those change)
        concept, config = EXAMPLE_FITS[name]
        assert steerer.fit_config.replace(hook_points=None, preset=config.preset) == config
        assert steerer.provenance["preset"] == config.preset
        source, target, control = concept_prompts(concept)
        assert steerer.provenance["prompts"] == {"source": source, "target": target, "control": control}
        assert any(row["enabled"] for row in steerer.gate_report())
        assert len(source) == len(target) == len(control) == 30


def test_steering_choices_are_checked(tmp_path):
    with pytest.raises(InputError, match="Unknown steering 'pears'"):
        resolve_steering("pears")
    with pytest.raises(InputError, match="No steering has been fitted"):
        resolve_steering("fitted")
    roots = [tmp_path / "allowed"]
    (tmp_path / "allowed").mkdir()
    with pytest.raises(InputError, match=r"No steering directory .*missing' under the folders"):
        resolve_steering("directory", str(tmp_path / "allowed" / "missing"), roots=roots)
    (tmp_path / "allowed" / "steering_config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"Could not read the steering .*steering_config\.json is corrupt"):
        resolve_steering("directory", str(tmp_path / "allowed"), roots=roots)
    # a real steering directory outside the roots: the same answer as a missing one
    Steerer.from_pretrained(example_steerings()["banana"]).save_pretrained(tmp_path / "outside")
    with pytest.raises(InputError, match=r"No steering directory .*outside' under the folders"):
        resolve_steering("directory", str(tmp_path / "outside"), roots=roots)
    with pytest.raises(InputError, match=r"No steering directory .*outside' under the folders"):
        resolve_steering("directory", str(tmp_path / "allowed" / ".." / "outside"), roots=roots)
    assert isinstance(resolve_steering("directory", str(tmp_path / "outside"), roots=[tmp_path]), Steerer)
    assert isinstance(resolve_steering("banana"), Steerer)


def test_image_sides_are_bounded_by_the_model_and_concurrency_by_one():
    import argparse

    from dsas_diffusion.app.actions import size_bound
    from dsas_diffusion.app.options import add_server_arguments
    from dsas_diffusion.app.ui import build_demo
    from dsas_diffusion.diffusion.loading import load_pipeline

    assert size_bound(load_pipeline("shapes-sd")) == 128  # trained at 64 px
    with pytest.raises(InputError, match="between 64 and 128"):
        validate_settings(with_(size=256), max_size=128)
    parser = argparse.ArgumentParser()
    add_server_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--concurrency", "0"])
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        build_demo(concurrency=0)


def test_sweep_points_are_bounded():
    with pytest.raises(InputError, match="between 2 and 9 points"):
        strength_sweep(None, None, GOOD, points=12)  # refused before any model is touched


def test_write_lock_excludes_readers_and_readers_share():
    lock, events = ReadWriteLock(), []

    def reader(name):
        with lock.reading():
            events.append(f"{name} in")
            time.sleep(0.05)
            events.append(f"{name} out")

    def writer():
        with lock.writing():
            events.append("writer in")
            time.sleep(0.05)
            events.append("writer out")

    readers = [threading.Thread(target=reader, args=(f"r{i}",)) for i in range(2)]
    for thread in readers:
        thread.start()
    time.sleep(0.01)
    writing = threading.Thread(target=writer)
    writing.start()
    for thread in [*readers, writing]:
        thread.join()
    assert events[:2] == ["r0 in", "r1 in"] or events[:2] == ["r1 in", "r0 in"]  # readers overlap
    start = events.index("writer in")
    assert events[start + 1] == "writer out" and start == 4  # the writer waited for both readers


def test_gate_overlays_mean_and_single_steps():
    image = Image.new("RGB", (64, 64), "gray")
    maps = {"down": np.zeros((4, 64, 64), np.float32), "up": np.ones((4, 64, 64), np.float32)}
    maps["up"][0] = 0.0
    mean = gate_overlays(image, maps, 0)
    assert [caption.split(":")[0] for _, caption in mean] == ["all layers", "down", "up"]
    assert "up: mean gate 0.75 (mean over steps)" == mean[2][1]
    first = gate_overlays(image, maps, 1)
    assert first[2][1] == "up: mean gate 0.00 (steered step 1/4)" and first[0][0].size == (256, 256)
    with pytest.raises(InputError, match="between 0 \\(mean over steps\\) and 4"):
        gate_overlays(image, maps, 5)


def test_the_image_gate_example_shows_the_gates_of_the_steps_it_steers():
    """``banana-image`` decides per image from the first 12 of 25 steps and steers the other 13:
    the page's step slider and heatmaps cover those, and an image it does not decide for is
    steered nowhere."""
    from dsas_diffusion.app.actions import generate

    entry = ModelCache().get("shapes-sd")
    steerer = resolve_steering("banana-image", model=entry)
    named = generate(entry, steerer, with_(prompt="a blue banana on a black background", steps=25), score=False)
    assert named.gate_steps == 13 and all(maps.shape[0] == 13 for maps in named.gate_maps.values())
    assert len(gate_overlays(named.dsas, named.gate_maps, 13)) == 1 + len(steerer.layers)
    if max(float(maps.max()) for maps in named.gate_maps.values()) == 0.0:  # not decided: steered nowhere
        assert np.array_equal(np.asarray(named.dsas), np.asarray(named.unsteered))
    else:
        assert not np.array_equal(np.asarray(named.dsas), np.asarray(named.unsteered))


def test_upscale_is_by_a_whole_factor():
    assert upscale(Image.new("RGB", (64, 64))).size == (256, 256)
    assert upscale(Image.new("RGB", (100, 50)), 256).size == (600, 300)
    big = Image.new("RGB", (512, 512))
    assert upscale(big) is big


def test_one_base_pipeline_per_model_and_light_request_pipelines():
    cache = ModelCache()
    entry = cache.get("shapes-sd")
    assert cache.get(" shapes-sd ") is entry and cache.loaded() == ["shapes-sd"]
    steerer = resolve_steering("banana", model=entry)
    with request_pipeline(entry, steerer) as first, request_pipeline(entry) as second:
        for pipe in (first, second):  # the weights are shared, the per-call state is not
            assert pipe.unet is entry.pipeline.unet and pipe.vae is entry.pipeline.vae
            assert pipe.text_encoder is entry.pipeline.text_encoder
            assert pipe.scheduler is not entry.pipeline.scheduler and pipe.tokenizer is not entry.pipeline.tokenizer
        assert first.tokenizer is not second.tokenizer
        assert first.steerers == {"demo": steerer} and second.steerers == {} and entry.pipeline.steerers == {}
    with pytest.raises(InputError, match="Could not load the model '/no/such/model'"):
        cache.get("/no/such/model")


def test_model_cache_evicts_the_least_recently_used_model():
    cache = ModelCache(max_models=1)
    first = cache.get("shapes-sd")
    cache.get("shapes-mmdit")
    assert cache.loaded() == ["shapes-mmdit"]  # shapes-sd went to make room
    again = cache.get("shapes-sd")
    assert again is not first and cache.loaded() == ["shapes-sd"]  # loaded anew
    two = ModelCache(max_models=2)
    kept = two.get("shapes-sd")
    two.get("shapes-mmdit")
    assert two.get("shapes-sd") is kept  # a hit makes it the most recently used ...
    assert two.loaded() == ["shapes-mmdit", "shapes-sd"]  # ... so shapes-mmdit would go first


def test_the_batcher_gathers_concurrent_requests_by_key_and_returns_each_its_own_result():
    seen = []

    def run_batch(key, items):
        seen.append((key, list(items)))
        return [ValueError(f"bad {item}") if item == 13 else (key, item * 2) for item in items]

    batcher = RequestBatcher(run_batch, max_batch_size=4, wait=0.5)
    results, start = {}, threading.Barrier(10)

    def request(key, item):
        start.wait()
        try:
            results[item] = batcher.submit(key, item)
        except ValueError as error:
            results[item] = str(error)

    threads = [threading.Thread(target=request, args=("a" if i < 6 else "b", 10 + i)) for i in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results[13] == "bad 13"  # only the failed request gets its error
    assert all(results[10 + i] == ("a" if i < 6 else "b", 2 * (10 + i)) for i in range(10) if i != 3)
    assert all(len(items) <= 4 and {key} == {"a" if i < 16 else "b" for i in items} for key, items in seen)
    assert sorted(batcher.batch_sizes) == sorted(len(items) for _, items in seen) and max(batcher.batch_sizes) > 1
    assert sum(batcher.batch_sizes) == 10


def test_a_batch_that_fails_fails_every_request_in_it():
    def run_batch(key, items):
        raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        RequestBatcher(run_batch, wait=0.0).submit("k", 1)
    with pytest.raises(ValueError, match="max_batch_size"):
        RequestBatcher(run_batch, max_batch_size=0)
