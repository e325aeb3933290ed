"""The Shapes world, the project's embedded default: procedural scenes with exact ground
truth, small models trained on them and shipped in the package, their judges, concept
prompt sets and example steerings.

The rest of the library reaches this package only through the names exported here (model
names and folders, concept sets, the detector, the judge's CLIP model, the example
steerings); nothing here imports the diffusers integration, the evaluation, the app or the
command line.

Examples:
    >>> from dsas_diffusion.shapes import is_shapes_world, resolve_model_path
    >>> is_shapes_world("shapes-sd"), resolve_model_path("shapes-sd").name
    (True, 'shapes-sd')
"""

from .._lazy import lazy_exports

_EXPORTS = {
    **dict.fromkeys(
        (
            "SHAPES_MODELS",
            "WEIGHTS_DIR",
            "is_shapes_model",
            "is_shapes_world",
            "load_shapes_pipeline",
            "resolve_model_path",
        ),
        ".hub",
    ),
    **dict.fromkeys(
        (
            "EVAL_SETS",
            "FIT_SETS",
            "HELD_OUT_CONCEPTS",
            "PROMPTS_DIR",
            "TUNING_CONCEPTS",
            "concept_dir",
            "concept_names",
            "concept_prompts",
            "evaluation_prompts",
            "make_concept_sets",
        ),
        ".concepts",
    ),
    **dict.fromkeys(
        (
            "ShapeJudge",
            "banana_drawn",
            "concept_drawn",
            "concept_mask",
            "concepts_drawn",
            "others_drawn",
            "read_objects",
            "read_scenes",
            "unprompted_concept",
        ),
        ".detect",
    ),
    **dict.fromkeys(
        (
            "EXAMPLES_DIR",
            "EXAMPLE_CONCEPTS",
            "EXAMPLE_FITS",
            "IMAGE_GATES",
            "TEXT_EXAMPLE_FIT",
            "TEXT_EXAMPLE_MAPS",
            "example_steerings",
            "fit_example_steering",
            "fit_text_example",
            "text_example_steerings",
        ),
        ".examples",
    ),
    "load_shapes_clip": ".clip",
    **dict.fromkeys(
        (
            "HELD_OUT_TEXT_CONCEPTS",
            "TEXT_CONCEPTS",
            "concept_words",
            "grammar_checks",
            "is_text_concept",
            "make_text_sets",
            "mentions",
            "neutral_version",
            "text_concept_files",
            "without_concept",
        ),
        ".text_sets",
    ),
}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
