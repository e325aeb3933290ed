"""FLUX with DSAS steering, as a diffusers custom pipeline.

    pipe = DiffusionPipeline.from_pretrained(
        model_path, custom_pipeline="pipelines/dsas_flux.py", trust_remote_code=True
    )
    pipe.fit_steering(source_prompts, target_prompts, control_prompts)
    image = pipe(prompt, steering_strength=1.0).images[0]

The class is dsas_diffusion's DSASFluxPipeline (install dsas-diffusion); this file only
exposes it to diffusers' custom-pipeline loader, which takes the one pipeline class it finds.
"""

from dsas_diffusion.diffusion.pipelines import DSASFluxPipeline

__all__ = ["DSASFluxPipeline"]
