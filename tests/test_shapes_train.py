"""The training recipes run end to end (a few steps) and write checkpoints the stock classes load."""

import pytest
import torch
from safetensors.torch import load_file

from dsas_diffusion.shapes import train


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    work = tmp_path_factory.mktemp("shapes-work")
    train.train_vae(work, steps=2, batch_size=4)
    return work


def _weights(folder):
    return load_file(str(next(folder.glob("*.safetensors"))))


@pytest.mark.slow
def test_sd_stages_chain_and_write_a_stock_pipeline(work_dir, tmp_path, monkeypatch):
    from diffusers import StableDiffusionPipeline

    stages = ({"steps": 2, "lr": 1e-3, "bank_seed": 3}, {"steps": 1, "lr": 0.0, "bank_seed": 6})
    monkeypatch.setattr(train, "SD_STAGES", stages)
    trained, one_stage = [], train.train_sd

    def train_sd(*args, **kwargs):
        trained.append(kwargs["name"])
        return one_stage(*args, bank_size=32, batch_size=4, **kwargs)

    monkeypatch.setattr(train, "train_sd", train_sd)
    out = train.train_sd_recipe(work_dir, tmp_path)
    first = work_dir / "shapes-sd-stage1"
    assert trained == ["shapes-sd-stage1", "shapes-sd"] and out == tmp_path / "shapes-sd"
    # the second stage starts from the first one's weights: at learning rate 0 it keeps them exactly
    for part in ("unet", "text_encoder"):
        before, after = _weights(first / part), _weights(out / part)
        assert before.keys() == after.keys()
        assert all(torch.equal(before[k], after[k]) for k in before)
    pipe = StableDiffusionPipeline.from_pretrained(out, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle on a white background", num_inference_steps=2, output_type="pt").images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
    # a stage already in the work folder is reused, not trained again
    trained.clear()
    train.train_sd_recipe(work_dir, tmp_path / "again")
    assert trained == ["shapes-sd"]


@pytest.mark.slow
def test_mmdit_recipe_writes_a_stock_sd3_pipeline_sharing_the_vae(work_dir, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    out = train.train_mmdit(work_dir, tmp_path, steps=2, batch_size=4, bank_size=32)
    vae = _weights(work_dir / "vae")
    shipped_vae = _weights(out / "vae")
    assert all(torch.equal(vae[k].half(), shipped_vae[k]) for k in vae)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(
        "a red circle on a white background", num_inference_steps=2, max_sequence_length=16, output_type="pt"
    ).images
    assert image.shape == (1, 3, 64, 64) and torch.isfinite(image).all()
