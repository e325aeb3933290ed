"""The Gradio demo through gradio_client against the app served on localhost: real calls,
real images, concurrent requests without cross-talk, and validation messages in the UI."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from app_server import running_app
from gradio_client import Client
from gradio_client.exceptions import AppError
from PIL import Image

from dsas_diffusion import fit_steerer

PROMPT = "a yellow banana on a gray background"
STEPS = 8


@pytest.fixture(scope="module")
def url():
    with running_app(concurrency=8) as address:
        yield address


def client(url: str) -> Client:
    return Client(url, verbose=False)


def generate(c: Client, strength: float = 3.0, **changes):
    args = dict(model="shapes-sd", steering="banana", directory="", prompt=PROMPT, seed=0, steps=STEPS, guidance=7.5)
    args.update(strength=strength, size=0)
    args.update(changes)
    return c.predict(*args.values(), api_name="/generate")


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.slow
def test_generate_shows_three_images_clip_scores_and_gates_per_layer(url):
    c = client(url)
    unsteered, uniform, dsas, scores, gates, step_slider = generate(c)
    images = [pixels(p) for p in (unsteered, uniform, dsas)]
    assert all(image.shape == (256, 256, 3) for image in images)  # 64 px, shown 4x
    assert np.abs(images[1].astype(int) - images[0]).mean() > 1.0  # uniform steering changed the banana image
    numbers = [float(x) for x in re.findall(r"\| ([\d.]+)", scores)]
    assert "shapes-clip" in scores and len(numbers) == 3 and all(0 < n <= 100 for n in numbers)
    captions = [item["caption"] for item in gates]
    assert captions[0].startswith("all layers") and len(captions) >= 2  # the mean, then one heatmap per layer
    assert all("mean over steps" in caption for caption in captions)
    assert pixels(gates[0]["image"]).shape == (256, 256, 3)
    assert step_slider["maximum"] == STEPS
    # the step slider redraws the heatmaps of one denoising step (state kept in this client's session)
    step = c.predict(3, api_name="/gate_step")
    assert [item["caption"].split(":")[0] for item in step] == [caption.split(":")[0] for caption in captions]
    assert all(f"step 3/{STEPS}" in item["caption"] for item in step)


@pytest.mark.numerics
@pytest.mark.slow
def test_eight_concurrent_calls_are_batched_and_each_returns_what_it_returns_alone(url):
    """Eight users with different steerings, strengths and seeds: their requests share pipeline
    calls, and each gets its images alone, up to rounding: the stock pipeline's own images of a
    prompt differ by one level of 255 between a batch and a call alone (docs/app.md), and steering
    amplifies that at a few values (up to 4 levels at 1% of them at λ 8 under torch's portable
    kernels), while another request's strength moves almost every value (λ 6 against 8: 99.9%)."""
    requests = [("banana", 0.0, 0), ("red", 0.5, 1), ("banana", 1.0, 2), ("red", 2.0, 0),
                ("banana", 3.0, 1), ("red", 4.0, 2), ("banana", 6.0, 0), ("banana", 8.0, 0)]  # fmt: skip
    clients = [client(url) for _ in requests]  # eight users, eight sessions
    batcher = running_app.demo.dsas_batcher
    calls = len(batcher.batch_sizes)
    jobs = [
        c.submit("shapes-sd", steering, "", PROMPT, seed, STEPS, 7.5, strength, 0, api_name="/generate")
        for c, (steering, strength, seed) in zip(clients, requests, strict=True)
    ]
    together = [[pixels(p) for p in job.result(timeout=300)[:3]] for job in jobs]
    assert max(batcher.batch_sizes[calls:]) > 1  # some requests shared a call
    for (steering, strength, seed), images in zip(requests, together, strict=True):
        alone = [pixels(p) for p in generate(clients[0], strength, steering=steering, seed=seed)[:3]]
        for mode, a, b in zip(("unsteered", "uniform", "DSAS"), images, alone, strict=True):
            difference = np.abs(a.astype(int) - b)
            beyond = float((difference > 1).mean())  # values more than the one level of the stock pipeline
            assert beyond <= 0.05 and difference.max() <= 16, (
                f"{steering} λ={strength}: the {mode} image differs from alone by more than one level at "
                f"{beyond:.2%} of its values, by {difference.max()} at most"
            )
    # the strengths really differed: uniform images move further from the unsteered one as λ grows,
    # and two requests that differ only in λ (6 and 8) differ by far more than that tolerance
    change = [np.abs(images[1].astype(int) - images[0]).mean() for images in together]
    assert change[0] <= 0.05 and change[-1] > change[2] > 0.05
    other = np.abs(together[-1][1].astype(int) - together[-2][1])
    assert float((other > 1).mean()) > 0.5  # another request's image: most values, by far more


@pytest.mark.slow
def test_strength_sweep_is_one_strip(url):
    strip = pixels(client(url).predict("shapes-sd", "banana", "", PROMPT, 0, 4, 7.5, 2.0, 0, 3, api_name="/sweep"))
    assert strip.shape == (16 + 2 * 128, 56 + 3 * 128, 3)  # λ header, uniform and DSAS rows, 3 columns
    first_uniform, first_dsas = strip[16:144, 56:184], strip[144:272, 56:184]
    assert np.array_equal(first_uniform, first_dsas)  # λ = 0: both rows show the unsteered image


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "   "}, "The prompt is empty"),
        ({"prompt": "a" * 301}, "at most 300 are allowed"),
        ({"prompt": "a " * 120}, "tokens long; the model reads at most 24"),
        # out-of-range sliders and numbers are refused by Gradio's own check of the component bounds
        ({"steps": 0}, "Value 0 is less than minimum value 1"),
        ({"steps": 51}, "Value 51 is greater than maximum value 50"),
        ({"strength": 10.5}, "Value 10.5 is greater than maximum value 10"),
        ({"seed": -1}, "Value -1 is less than minimum value 0"),
        ({"size": 256}, "image size must be between 64 and 128"),  # shapes-sd: twice its 64 px
        ({"size": 100}, "multiple of 8"),
        (
            {"steering": "directory", "directory": "/no/such/steering"},
            "No steering directory '/no/such/steering' under",
        ),
        # a folder outside the allowed roots gets the same answer as a missing one
        ({"steering": "directory", "directory": "/root"}, "No steering directory '/root' under"),
        ({"steering": "directory", "directory": ""}, "Give the path of a steering directory"),
        ({"steering": "fitted"}, "No steering has been fitted in this session"),
        ({"model": "shapes-mmdit"}, "This steering was made for shapes-sd, not for shapes-mmdit"),
        ({"model": "/no/such/model"}, "Could not load the model"),
    ],
)
def test_bad_requests_get_a_message_not_a_traceback(url, changes, message):
    with pytest.raises(AppError, match=re.escape(message)):
        generate(client(url), **changes)


def test_steering_fitted_on_another_model_is_refused(url, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    batches = [[torch.randn(4, 6, 8) + shift for _ in range(8)] for shift in (1.0, 0.0, -1.0)]
    fit_steerer(model, ["0"], *batches, map="caa", progress=False).save_pretrained(tmp_path / "toy")
    with pytest.raises(AppError, match=r"made for another model, not for shapes-sd: .* module '0'"):
        generate(client(url), steering="directory", directory=str(tmp_path / "toy"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AppError, match="No steering directory"):
        generate(client(url), steering="directory", directory=str(tmp_path / "empty"))


def test_fitting_needs_three_prompt_lists(url):
    prompts = "a red banana on a white background\na blue banana on a black background"
    with pytest.raises(AppError, match="The control prompt list is empty"):
        client(url).predict("shapes-sd", prompts, prompts, "# only a comment\n\n", "caa", 2, api_name="/fit")


@pytest.mark.slow
def test_fit_from_pasted_prompts_then_generate_with_it(url):
    colours = ["red", "green", "blue", "yellow", "purple", "red"]
    backgrounds = ["white", "black", "gray", "gray", "white", "black"]
    pairs = list(zip(colours * 2, backgrounds * 2, strict=True))
    source = "\n".join(f"a {c} banana on a {b} background" for c, b in pairs)
    target = "\n".join(f"a {c} circle on a {b} background" for c, b in pairs)
    control = "\n".join(f"a {c} square on a {b} background" for c, b in pairs)
    c = client(url)
    summary, steering = c.predict("shapes-sd", source, target, control, "caa", 2, api_name="/fit")
    assert "map **caa**" in summary and "made for **shapes-sd**" in summary and steering["value"] == "fitted"
    unsteered, uniform, *_ = generate(c, steering="fitted", strength=2.0)
    assert pixels(uniform).shape == (256, 256, 3)
    assert not np.array_equal(pixels(uniform), pixels(unsteered))


def test_dsas_demo_command_has_its_options():
    script = Path(sys.executable).parent / "dsas"
    result = subprocess.run([str(script), "demo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    assert all(option in result.stdout for option in ("--model", "--host", "--port", "--share", "--concurrency"))


# -- the Text tab --------------------------------------------------------------------------------
TEXT_PROMPT = "an ugly, dirty red square lies on the left."  # the tab's defaults: the negative register, CAA


def continue_text(c: Client, strength: float = 16.0, **changes):
    args = dict(model="shapes-lm", concept="negative", map_name="caa", directory="", prompt=TEXT_PROMPT)
    args.update(strength=strength, seed=0, samples=8, max_new_tokens=30, counted="negative")
    args.update(changes)
    return c.predict(*args.values(), api_name="/generate_text")


def gate_spans(view: str) -> list[float]:
    return [float(g) for g in re.findall(r'title="gate ([\d.]+)"', view)]


@pytest.mark.slow
def test_text_tab_continues_three_ways_with_per_token_gates_per_layer(url):
    c = client(url)
    *views, table, layer = continue_text(c, strength=0.0)
    assert views[0] == views[1] == views[2]  # strength 0: the three continuations are the unsteered one
    rows = [line for line in table.splitlines() if line.startswith("| unsteered") or line.startswith("| uniform")
            or line.startswith("| DSAS")]  # fmt: skip
    assert len(rows) == 3 and len({row.split("|", 2)[2] for row in rows}) == 1
    assert [choice[0] for choice in layer["choices"]] == [f"model.layers.{i}" for i in range(4)]
    assert layer["value"] == "model.layers.2"
    *views, table, _ = continue_text(c, strength=16.0)
    gates = gate_spans(views[2])
    assert len(gates) > len(TEXT_PROMPT.split()) and all(0.0 <= g <= 1.0 for g in gates)
    assert views[1] != views[0]  # uniform steering changed the continuation
    other = c.predict("model.layers.0", api_name="/text_layer")
    assert [re.sub(r'title="gate [\d.]+" style="[^"]*"', "", v) for v in other] == [
        re.sub(r'title="gate [\d.]+" style="[^"]*"', "", v) for v in views
    ]  # the same tokens, coloured by another layer's gates
    assert any(gate_spans(a) != gate_spans(b) for a, b in zip(other, views, strict=True))


@pytest.mark.slow
def test_text_tab_concurrent_calls_each_return_what_they_return_alone(url):
    strengths = [0.0, 4.0, 16.0, 32.0]
    clients = [client(url) for _ in strengths]
    jobs = [
        c.submit("shapes-lm", "negative", "caa", "", TEXT_PROMPT, s, 0, 8, 30, "negative", api_name="/generate_text")
        for c, s in zip(clients, strengths, strict=True)
    ]
    together = [list(job.result(timeout=300)[:4]) for job in jobs]
    for strength, result in zip(strengths, together, strict=True):
        assert result == list(continue_text(clients[0], strength)[:4]), f"λ={strength} differs from the call alone"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"prompt": "  "}, "The prompt is empty"),
        ({"prompt": "a" * 301}, "at most 300 are allowed"),
        ({"directory": "/root"}, "No steering directory '/root' under"),
        ({"model": "/no/such/model"}, "Could not load the language model"),
    ],
)
def test_text_tab_bad_requests_get_a_message(url, changes, message):
    with pytest.raises(AppError, match=re.escape(message)):
        continue_text(client(url), **changes)


def test_text_tab_refuses_an_image_steering(url, tmp_path):
    from dsas_diffusion import Steerer
    from dsas_diffusion.shapes import example_steerings

    Steerer.from_pretrained(example_steerings()["banana"]).save_pretrained(tmp_path / "image-banana")
    with pytest.raises(AppError, match=r"This steering cannot steer shapes-lm: .*image pipeline"):
        continue_text(client(url), directory=str(tmp_path / "image-banana"))
