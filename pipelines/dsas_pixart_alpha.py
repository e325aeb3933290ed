"""PixArt-alpha with DSAS steering, as a diffusers custom pipeline.

    pipe = DiffusionPipeline.from_pretrained(
        model_path, custom_pipeline="pipelines/dsas_pixart_alpha.py", trust_remote_code=True
    )
    pipe.fit_steering(source_prompts, target_prompts, control_prompts)
    image = pipe(prompt, steering_strength=1.0).images[0]

The class is dsas_diffusion's DSASPixArtAlphaPipeline (install dsas-diffusion); this file only
exposes it to diffusers' custom-pipeline loader, which takes the one pipeline class it finds.
"""

from dsas_diffusion.diffusion.pipelines import DSASPixArtAlphaPipeline

__all__ = ["DSASPixArtAlphaPipeline"]
