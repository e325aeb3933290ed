"""Stable Diffusion 3 / 3.5 with DSAS steering, as a diffusers custom pipeline.

    pipe = DiffusionPipeline.from_pretrained(
        model_path, custom_pipeline="pipelines/dsas_stable_diffusion_3.py", trust_remote_code=True
    )
    pipe.fit_steering(source_prompts, target_prompts, control_prompts)
    image = pipe(prompt, steering_strength=1.0).images[0]

The class is dsas_diffusion's DSASStableDiffusion3Pipeline (install dsas-diffusion); this file only
exposes it to diffusers' custom-pipeline loader, which takes the one pipeline class it finds.
"""

from dsas_diffusion.diffusion.pipelines import DSASStableDiffusion3Pipeline

__all__ = ["DSASStableDiffusion3Pipeline"]
