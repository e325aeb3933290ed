"""The training recipes run end to end (a few steps) and write checkpoints the stock classes load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from dsas_diffusion.shapes import training
from dsas_diffusion.shapes.hub import WEIGHTS_DIR


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("shapes-work")
    training.train_vae(work, steps=2, batch_size=4)
    return work


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


def _generate(folder, sd3: bool = False):
    """Two denoising steps with the stock pipeline class (SD3 without T5 when ``sd3``)."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    if sd3:
        pipe = StableDiffusion3Pipeline.from_pretrained(
            folder, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
        )
        extra = {"max_sequence_length": 16}
    else:
        pipe, extra = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32), {}
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle on a white background", num_inference_steps=2, output_type="pt", **extra).images


def _scheduler(folder):
    """The scheduler class a pipeline folder names and its config, diffusers' version left out."""
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config.pop("_diffusers_version")
    return json.loads((folder / "model_index.json").read_text())["scheduler"], config


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "trainer", "parts"),
    [
        ("shapes-sd", "train_sd", ("unet", "text_encoder")),
        ("shapes-mmdit", "train_mmdit", ("transformer", "text_encoder", "text_encoder_2")),
    ],
)
def test_stages_chain_and_write_a_stock_pipeline(work_dir, tmp_path, name, trainer, parts):
    stages = ({"steps": 2, "lr": 1e-3, "bank_seed": 3}, {"steps": 1, "lr": 0.0, "bank_seed": 6})
    trained, one_stage = [], getattr(training, trainer)

    def small_stage(*args, **kwargs):
        trained.append(kwargs["name"])
        return one_stage(*args, bank_size=32, batch_size=4, **kwargs)

    out = training.train_stages(small_stage, stages, name, work_dir, tmp_path)
    first = work_dir / f"{name}-stage1"
    assert trained == [f"{name}-stage1", name] and out == tmp_path / name
    # the saved configs do not name the folders this run loaded from
    for config in out.glob("*/*config.json"):
        assert not {"_name_or_path", "local_files_only"} & json.loads(config.read_text()).keys(), config
    # the second stage starts from the first one's weights: at learning rate 0 it keeps them exactly
    for part in parts:
        before, after = _weights(first / part), _weights(out / part)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    image = _generate(out, sd3=name == "shapes-mmdit")
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    # the recipe writes the sampler that ships with the model
    assert _scheduler(out) == _scheduler(WEIGHTS_DIR / name)
    # a stage already in the work folder is reused, not trained again
    trained.clear()
    training.train_stages(small_stage, stages, name, work_dir, tmp_path / "again")
    assert trained == [name]


@pytest.mark.slow
def test_mmdit_recipe_writes_a_stock_sd3_pipeline_sharing_the_vae(work_dir, tmp_path):
    out = training.train_mmdit(work_dir, tmp_path, steps=2, batch_size=4, bank_size=32)
    vae = _weights(work_dir / "vae")
    shipped_vae = _weights(out / "vae")
    assert all(torch.equal(vae[k].half(), shipped_vae[k]) for k in vae)
    image = _generate(out, sd3=True)
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()


def test_training_command_lists_every_recipe(capsys):
    from dsas_diffusion.shapes import train

    with pytest.raises(SystemExit):
        train.main(["--help"])
    usage = capsys.readouterr().out
    assert "{vae,clip,sd,mmdit,lm,all}" in usage


def test_clip_recipe_writes_a_folder_open_clip_loads_with_the_shipped_layout(tmp_path):
    from dsas_diffusion.shapes.clip import load_shapes_clip, shapes_clip_dir
    from dsas_diffusion.shapes.data import render_scene, sample_spec

    folder = training.train_clip(tmp_path, steps=2, batch_size=8)
    shipped = shapes_clip_dir()
    assert json.loads((folder / "open_clip_config.json").read_text()) == json.loads(
        (shipped / "open_clip_config.json").read_text()
    )
    trained, reference = _weights(folder), _weights(shipped)
    assert trained.keys() == reference.keys()
    assert all(trained[k].shape == reference[k].shape and trained[k].dtype == reference[k].dtype for k in trained)
    model, preprocess, tokenizer = load_shapes_clip(path=folder)  # open_clip's local-dir: loading
    scene = render_scene(sample_spec(0))
    with torch.no_grad():
        text = model.encode_text(tokenizer([scene.caption]), normalize=True)
        image = model.encode_image(preprocess(scene.image).unsqueeze(0), normalize=True)
    assert text.shape == image.shape == (1, 64) and torch.isfinite(text @ image.T).all()


def test_lm_recipe_writes_a_checkpoint_the_auto_classes_load_like_the_shipped_one(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dsas_diffusion.shapes import resolve_model_path
    from dsas_diffusion.shapes.training.lm import train_lm
    from dsas_diffusion.text import DSASLanguageModel

    folder = train_lm(tmp_path, steps=2, batch_size=4, heldout=10)
    shipped = resolve_model_path("shapes-lm")
    trained, reference = _weights(folder), _weights(shipped)
    assert trained.keys() == reference.keys()
    assert all(trained[k].shape == reference[k].shape and trained[k].dtype == reference[k].dtype for k in trained)
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert (
        type(model).__name__ == "LlamaForCausalLM"
        and tokenizer.decode(tokenizer("a red star.").input_ids, skip_special_tokens=True) == "a red star."
    )
    generation = DSASLanguageModel(model.float(), tokenizer).generate(["a red star"], max_new_tokens=3, do_sample=False)
    assert generation.sequences.shape[1] <= tokenizer("a red star", return_tensors="pt").input_ids.shape[1] + 3
