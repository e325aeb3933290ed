"""The model-agnostic steering core: torch only, no diffusers or transformers imports.

Collect pooled activations at named modules, fit steering maps (CAA, ITI, Linear-AcT,
LinEAS) and DSAS gates, apply them through removable hooks, save and load them.
"""

from ..names import FIT_GATES, MAP_NAMES
from .collect import (
    ActivationCollector,
    Activations,
    ContrastPositions,
    collect_activations,
    collect_contrast_positions,
    default_forward,
    default_mask,
)
from .errors import (
    ActivationError,
    IncompatibleSteeringError,
    InputSetError,
    PromptFileError,
    SteeringError,
    SteeringFileError,
    UnknownModuleError,
)
from .fit import fit_from_activations, fit_steerer
from .gate import LinearGate, calibrate_gate_on_positions, calibrate_gate_two_sided, fit_gate, gate_accuracy_scale
from .gate_fit import select_layers
from .hookpoints import HookPoint, pool, resolve_module
from .hooks import SteeringSession, active_hook_names
from .layer import SteeringLayer
from .lineas import LinEASConfig, sliced_w2, train_lineas
from .maps import SteeringMap, fit_caa, fit_iti, fit_linear_act, identity_affine_map
from .persistence import CONFIG_NAME, WEIGHTS_NAME
from .steerer import Steerer

__all__ = [
    "CONFIG_NAME",
    "FIT_GATES",
    "MAP_NAMES",
    "WEIGHTS_NAME",
    "ActivationCollector",
    "ActivationError",
    "Activations",
    "ContrastPositions",
    "HookPoint",
    "IncompatibleSteeringError",
    "InputSetError",
    "LinEASConfig",
    "LinearGate",
    "PromptFileError",
    "Steerer",
    "SteeringError",
    "SteeringFileError",
    "SteeringLayer",
    "SteeringMap",
    "SteeringSession",
    "UnknownModuleError",
    "active_hook_names",
    "calibrate_gate_on_positions",
    "calibrate_gate_two_sided",
    "collect_activations",
    "collect_contrast_positions",
    "default_forward",
    "default_mask",
    "fit_caa",
    "fit_from_activations",
    "fit_gate",
    "fit_iti",
    "fit_linear_act",
    "fit_steerer",
    "gate_accuracy_scale",
    "identity_affine_map",
    "pool",
    "resolve_module",
    "select_layers",
    "sliced_w2",
    "train_lineas",
]
