"""The Shapes generator: deterministic, exact masks, the caption grammar, the pixel detector."""

import numpy as np
import pytest
import torch

from dsas_diffusion.shapes.data import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    caption_for,
    parse_caption,
    render_scene,
    sample_spec,
    scene_seed,
)
from dsas_diffusion.shapes.dataset import SceneStream, distort
from dsas_diffusion.shapes.detect import _PALETTE, isolate_colour, read_colours


def test_generator_is_deterministic():
    for seed in range(20):
        first, second = render_scene(sample_spec(seed)), render_scene(sample_spec(seed))
        assert first.caption == second.caption
        assert np.array_equal(np.asarray(first.image), np.asarray(second.image))
    assert np.array_equal(SceneStream(seed=3).next_batch(4)[0].numpy(), SceneStream(seed=3).next_batch(4)[0].numpy())


def test_masks_are_exactly_the_drawn_pixels():
    for seed in range(200):
        scene = render_scene(sample_spec(seed))
        pixels = np.asarray(scene.image)
        covered = np.zeros(pixels.shape[:2], dtype=bool)
        for obj, mask in zip(scene.spec.objects, scene.masks, strict=True):
            assert mask.sum() > 60, (seed, obj)  # every object is visible
            assert (pixels[mask] == COLOURS[obj.colour]).all()
            assert not (covered & mask).any()  # objects never overlap
            covered |= mask
        assert (pixels[~covered] == BACKGROUNDS[scene.spec.background]).all()


def test_every_attribute_occurs_and_captions_follow_the_grammar():
    specs = [sample_spec(seed) for seed in range(500)]
    assert {o.shape for s in specs for o in s.objects} == set(SHAPES)
    assert {o.colour for s in specs for o in s.objects} == set(COLOURS)
    assert {s.background for s in specs} == set(BACKGROUNDS)
    assert {len(s.objects) for s in specs} == {1, 2}
    for spec in specs:
        caption = caption_for(spec)
        parsed = parse_caption(caption)
        assert [(o.colour, o.shape) for o in parsed.objects] == [(o.colour, o.shape) for o in spec.objects]
        assert parsed.background == spec.background
    assert caption_for(parse_caption("a yellow banana and a red square on a black background")) == (
        "a yellow banana and a red square on a black background"
    )


def test_bad_captions_are_refused_with_the_grammar():
    with pytest.raises(ValueError, match="not a Shapes caption"):
        parse_caption("a photo of a banana")
    with pytest.raises(ValueError, match="unknown colour 'orange'"):
        parse_caption("a orange circle on a white background")


def test_train_and_test_splits_never_share_a_seed():
    train = {scene_seed(i, "train") for i in range(100_000)}
    assert not train & {scene_seed(i, "test") for i in range(100_000)}


def test_pixel_detector_reads_ground_truth():
    for seed in range(100):
        scene = render_scene(sample_spec(seed))
        reading = read_colours(scene.image)
        assert reading.background == scene.spec.background
        for obj, mask in zip(scene.spec.objects, scene.masks, strict=True):
            assert reading.masses[obj.colour] >= mask.sum()
            assert reading.present(obj.colour)
        if len(scene.spec.objects) == 1:
            assert reading.dominant_colour == scene.spec.objects[0].colour
            absent = set(COLOURS) - {scene.spec.objects[0].colour}
            assert not any(reading.present(colour) for colour in absent)


def test_isolating_a_colour_keeps_exactly_that_object():
    scenes = (render_scene(sample_spec(seed, n_objects=2)) for seed in range(100))
    scene = next(s for s in scenes if s.spec.objects[0].colour != s.spec.objects[1].colour)
    first, _ = scene.spec.objects
    alone = np.asarray(isolate_colour(scene.image, first.colour, scene.spec.background))
    assert (alone[scene.masks[0]] == COLOURS[first.colour]).all()
    assert (alone[scene.masks[1]] == BACKGROUNDS[scene.spec.background]).all()


def test_distorted_scenes_stay_close_to_their_drawings():
    images, _ = SceneStream(seed=7).next_batch(64)
    assert torch.equal(distort(images, torch.Generator().manual_seed(0), fraction=0.0), images)
    out = distort(images, torch.Generator().manual_seed(0), fraction=1.0)
    again = distort(images, torch.Generator().manual_seed(0), fraction=1.0)
    assert torch.equal(out, again)  # seeded: a training run is reproducible
    assert out.min() >= -1 and out.max() <= 1
    palette = torch.from_numpy(_PALETTE) / 127.5 - 1
    flat_count = 0
    for before, after in zip(images, out, strict=True):
        assert not torch.equal(before, after)  # fraction 1: every image is redrawn
        own = {tuple(c) for c in before.flatten(1).T.tolist()}
        colours = {tuple(c) for c in after.flatten(1).T.tolist()}
        if colours <= {tuple(c) for c in palette.tolist()}:  # flattened to palette colours...
            flat_count += 1
            assert colours <= own  # ...of its own scene only
        # small distortions: most pixels keep their colour (within the soft branch's noise and blur)
        assert ((after - before).abs().amax(0) < 0.25).float().mean() > 0.8
    assert 10 < flat_count < 54  # about half flattened, half soft
    # a one-image batch takes one branch alone, flattened or soft, and both work
    singles = [distort(images[:1], torch.Generator().manual_seed(seed), fraction=1.0) for seed in range(20)]
    assert {len({tuple(c) for c in single[0].flatten(1).T.tolist()}) <= len(palette) for single in singles} == {
        True,
        False,
    }
    with pytest.raises(ValueError, match="between 0 and 1"):
        distort(images, torch.Generator(), fraction=1.5)


def test_committed_open_clip_config_matches_the_architecture():
    import json
    from pathlib import Path

    import dsas_diffusion.shapes as shapes
    from dsas_diffusion.shapes.models import CLIP_MODEL_CONFIG

    path = Path(shapes.__file__).parent / "open_clip_configs" / "shapes-clip.json"
    assert json.loads(path.read_text()) == CLIP_MODEL_CONFIG
