"""Stable Diffusion XL with DSAS steering, as a diffusers custom pipeline.

    pipe = DiffusionPipeline.from_pretrained(
        model_path, custom_pipeline="pipelines/dsas_stable_diffusion_xl.py", trust_remote_code=True
    )
    pipe.fit_steering(source_prompts, target_prompts, control_prompts)
    image = pipe(prompt, steering_strength=1.0).images[0]

The class is dsas_diffusion's DSASStableDiffusionXLPipeline (install dsas-diffusion); this file only
exposes it to diffusers' custom-pipeline loader, which takes the one pipeline class it finds.
"""

from dsas_diffusion.diffusion.pipelines import DSASStableDiffusionXLPipeline

__all__ = ["DSASStableDiffusionXLPipeline"]
