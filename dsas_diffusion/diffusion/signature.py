"""The DSAS pipelines' call signature: the stock pipeline's, plus the steering arguments.

A ``DSAS*Pipeline`` class gets its own ``__call__`` built from its diffusers base class, so
``inspect.signature(pipe.__call__)`` lists every stock parameter with its stock default and
annotation, then the steering arguments (keyword-only), and ``help(pipe)`` shows the stock
docstring followed by the steering section. Tools that read the signature (diffusers' own
pipeline tests, UIs that build forms from it) see what they see on the stock class.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "STEERING_DOC",
    "STEERING_PARAMETERS",
    "steered_call",
    "steered_signature",
    "stock_call",
    "stock_class",
]

_KW = inspect.Parameter.KEYWORD_ONLY

#: the steering arguments every DSAS pipeline call takes, after the stock ones
STEERING_PARAMETERS = (
    inspect.Parameter(
        "steering_strength", _KW, default=None, annotation=float | Sequence[float] | Mapping[str, Any] | None
    ),
    inspect.Parameter("steering_gate", _KW, default="dsas", annotation=str | Mapping[str, str]),
    inspect.Parameter("steering_cfg", _KW, default="cond", annotation=str),
    inspect.Parameter("steering_steps", _KW, default=None, annotation=tuple[float, float] | None),
    inspect.Parameter("return_gate_maps", _KW, default=False, annotation=bool),
)

STEERING_DOC = """
        Steering arguments (dsas_diffusion), keyword-only, after the stock ones:

            steering_strength (`float`, `Sequence[float]`, `Mapping` or `None`, defaults to `None`):
                λ for every loaded steerer, one λ per prompt (a list as long as ``prompt``; the
                images of a prompt share its λ), a ``{name: λ or [λ per prompt]}`` mapping, or
                ``None`` for each steerer's saved default. ``0`` leaves an image bit-identical
                to the stock pipeline's, also beside steered images in the same batch.
            steering_gate (`str` or `Mapping[str, str]`, defaults to `"dsas"`):
                ``"dsas"`` (or ``"e2e"``) steers through each steerer's gates; ``"none"`` steers
                every position alike (uniform steering, the baseline); ``{name: word}`` chooses
                per loaded steerer (the others ``"dsas"``). ``True`` / ``False`` still work for
                one release, with a deprecation warning.
            steering_cfg (`str`, defaults to `"cond"`):
                ``"cond"`` steers the conditional half of the guidance batch only (in
                pipelines that run the guidance branches as separate denoiser calls, such
                as FLUX with ``true_cfg_scale``, the conditional call); ``"both"`` steers the
                unconditional half too, each gated by its own activations (what each
                costs control images is measured in ``docs/removal.md``).
            steering_steps (`tuple[float, float]`, *optional*):
                ``(start, end)`` fractions of the schedule during which steering acts, e.g.
                ``(0, 0.5)`` for the first half of the denoising steps; ``None`` steers every
                step.
            return_gate_maps (`bool`, defaults to `False`):
                add ``gate_maps`` to the output (or, with ``return_dict=False``, a last tuple
                element): ``{steerer: {layer: tensor}}`` with one ``(steps, images, H, W)``
                float tensor per layer (the conditional half's gates, upsampled to the image
                size; one image per generated image, ``num_images_per_prompt`` included).
"""

STEERING_NAMES = tuple(parameter.name for parameter in STEERING_PARAMETERS)


def stock_class(cls: type, mixin: type) -> type | None:
    """The first class in ``cls``'s MRO that is not a ``mixin`` class and defines
    ``__call__``: the stock diffusers pipeline class, or ``None``."""
    for base in cls.__mro__:
        if base is not object and not issubclass(base, mixin) and "__call__" in vars(base):
            return base
    return None


def stock_call(cls: type, mixin: type) -> Callable[..., Any] | None:
    """The stock pipeline's ``__call__`` (see :func:`stock_class`), or ``None``."""
    base = stock_class(cls, mixin)
    return None if base is None else vars(base)["__call__"]


def steered_signature(stock: Callable[..., Any]) -> inspect.Signature:
    """``stock``'s signature with the steering arguments added as keyword-only parameters
    (before a ``**kwargs``, if the stock call has one).

    Examples:
        >>> def call(self, prompt=None, num_inference_steps=50, **kwargs): ...
        >>> list(steered_signature(call).parameters)  # doctest: +NORMALIZE_WHITESPACE
        ['self', 'prompt', 'num_inference_steps', 'steering_strength', 'steering_gate', 'steering_cfg',
         'steering_steps', 'return_gate_maps', 'kwargs']
    """
    signature = inspect.signature(stock)
    clash = [name for name in STEERING_NAMES if name in signature.parameters]
    if clash:
        raise TypeError(f"the stock call already has parameters named {clash}; DSAS cannot add its own")
    parameters = list(signature.parameters.values())
    variadic = [p for p in parameters if p.kind is inspect.Parameter.VAR_KEYWORD]
    plain = [p for p in parameters if p.kind is not inspect.Parameter.VAR_KEYWORD]
    return signature.replace(parameters=[*plain, *STEERING_PARAMETERS, *variadic])


def steered_call(stock: Callable[..., Any], owner: type) -> Callable[..., Any]:
    """A ``__call__`` for ``owner`` that shows ``stock``'s signature and docstring plus the
    steering ones, and runs ``self._steered_call(args, kwargs, **steering)``."""

    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        steering = {name: kwargs.pop(name) for name in STEERING_NAMES if name in kwargs}
        return self._steered_call(args, kwargs, **steering)

    __call__.__signature__ = steered_signature(stock)  # type: ignore[attr-defined]
    __call__.__doc__ = (stock.__doc__ or "").rstrip() + "\n" + STEERING_DOC
    __call__.__qualname__ = f"{owner.__qualname__}.__call__"
    return __call__
