"""The names the library accepts, each list defined once and imported everywhere.

This module imports nothing, so the command line can build its options from it without
loading torch.
"""

from __future__ import annotations

__all__ = [
    "ADDITIVE_MAPS",
    "CFG_MODES",
    "CLOSED_FORM_MAPS",
    "DIFFUSION_PRESETS",
    "FIT_COLLECTION_ARGUMENTS",
    "FIT_GATES",
    "GATES",
    "GATE_ACTIVATIONS",
    "GATE_CALIBRATIONS",
    "GATE_FIT_ON",
    "GATE_READS",
    "MAP_NAMES",
    "RENDER_MODES",
    "SAMPLE_DECISIONS",
    "TEXT_PRESETS",
]

#: steering maps (how to steer): mean shift, ITI, Linear-AcT, LinEAS
MAP_NAMES = ("caa", "iti", "linear-act", "lineas")
#: maps fitted in closed form from pooled statistics (LinEAS is trained through the model)
CLOSED_FORM_MAPS = ("caa", "iti", "linear-act")
#: maps that add a vector (the others are per-unit affine)
ADDITIVE_MAPS = ("caa", "iti")
#: the one vocabulary for gates: at fit time which gates to fit (DSAS: PCA + logistic; e2e: trained
#: end to end with LinEAS; none: maps only), at call time whether to steer through them
#: ("dsas" / "e2e": the steerer's gates; "none": uniform steering, every position alike)
GATES = ("dsas", "none", "e2e")
FIT_GATES = GATES
#: the gate's squashing function: a sigmoid, a ReLU clipped at 1, or a step (fully open above 0)
GATE_ACTIVATIONS = ("sigmoid", "relu", "step")
#: what the gate's classifier is fitted on: per-sample means, sampled positions, or the
#: concept's positions located by contrast with the paired target
GATE_FIT_ON = ("pooled", "positions", "contrast")
#: what a gate reads at its hooked module: the activation it steers (the module's output, as
#: published) or the module's input (e.g. a cross-attention's query input: the image stream
#: before the prompt enters it) or, for language models, the context: the mean of the cached
#: attention values each token attends to (its prefix)
GATE_READS = ("output", "input", "context")
#: who decides whether a sample is steered at all, with sample gates: each layer's own sample
#: gate, or one decision per sample from every layer over the denoising steps before steering,
#: the layers weighing alike or weighted by a regression on source against control images
SAMPLE_DECISIONS = ("per-layer", "accumulated", "stacked")
#: how a fitted gate is recalibrated on single positions
GATE_CALIBRATIONS = ("none", "control-positions", "two-sided")
#: which half of a classifier-free-guidance batch is steered
CFG_MODES = ("both", "cond")
#: ``fit_steering``'s arguments about the collection runs of pipelines and language models (the
#: rest of its keywords are FitConfig fields)
FIT_COLLECTION_ARGUMENTS = (
    "collect_steps",
    "num_inference_steps",
    "batch_size",
    "pipeline_kwargs",
    "max_length",
    "chat_template",
)
#: named sets of hook points on a denoiser (see diffusion/architectures.py)
DIFFUSION_PRESETS = ("cross-attention", "blocks", "norms")
#: where a pipeline steers unless told otherwise
DEFAULT_DIFFUSION_PRESET = "cross-attention"
#: the three renderings compared everywhere: unsteered, uniform steering, DSAS
RENDER_MODES = ("unsteered", "uniform", "dsas")

#: where to hook a causal language model (see dsas_diffusion.text.architectures)
TEXT_PRESETS = ("residual", "attention", "mlp", "norms")
#: where a language model steers unless told otherwise
DEFAULT_TEXT_PRESET = "residual"
