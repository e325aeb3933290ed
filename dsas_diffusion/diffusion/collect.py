"""Activation collection through real pipeline runs.

Fitting needs the denoiser's activations on the source / target / control prompts at
chosen denoising steps, for the conditional half of the classifier-free-guidance batch.
:func:`record_denoiser_calls` runs the pipeline on the prompts and keeps the denoiser's
*inputs* at those steps (conditional rows only, on the CPU). Every later pass of the
fitting (pooled statistics, incremental maps, LinEAS training with gradients) is then a
plain ``denoiser(**call)``, so the steering core needs nothing diffusion-specific.

The recorded trajectories are the unsteered ones: a map fitted at step 5 sees the
latents the unsteered model reached at step 5.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..steering import ActivationError, InputSetError, SteeringError
from ..steering.hookpoints import HookPoint, get_output, resolve_module
from ..steering.hooks import HookHandles
from .architectures import architecture_of

__all__ = [
    "DenoiserCall",
    "ImageStreamCheck",
    "StopDenoising",
    "check_image_stream",
    "record_denoiser_calls",
    "run_denoiser_call",
    "run_until_stopped",
]

DenoiserCall = dict[str, Any]
"""The keyword arguments of one denoiser forward call (tensors on the CPU)."""


class StopDenoising(Exception):
    """Raised from a denoiser hook once a partial run has what it needs (:func:`run_until_stopped`)."""


def run_until_stopped(pipe: Any, prompts: Sequence[str], **call: Any) -> bool:
    """Run ``pipe(prompts, output_type="latent", **call)`` until a denoiser hook raises
    :class:`StopDenoising` (or to the end); model offload hooks are freed either way. Returns
    whether the run was stopped."""
    try:
        pipe(list(prompts), output_type="latent", **call)
    except StopDenoising:
        return True
    finally:
        free = getattr(pipe, "maybe_free_model_hooks", None)
        if free is not None:
            free()
    return False


def _primary_input(arguments: Mapping[str, Any]) -> torch.Tensor:
    """The denoiser's first tensor argument: the latents (``sample`` / ``hidden_states``)."""
    return next(v for v in arguments.values() if torch.is_tensor(v))


def timestep_key(value: Any) -> float | None:
    if torch.is_tensor(value):
        return float(value.flatten()[0]) if value.numel() else None
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _take_rows(value: Any, rows: slice, batch: int) -> Any:
    """Slice every tensor whose first dimension is the call's batch; recurse into containers."""
    if torch.is_tensor(value):
        if value.ndim > 0 and value.shape[0] == batch:
            value = value[rows]
        return value.detach().to("cpu").clone()
    if isinstance(value, Mapping):
        return {k: _take_rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, tuple):
        return tuple(_take_rows(v, rows, batch) for v in value)
    if isinstance(value, list):
        return [_take_rows(v, rows, batch) for v in value]
    return value


def _to_device(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device, dtype) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device, dtype) for v in value)
    return value


def run_denoiser_call(denoiser: nn.Module, call: DenoiserCall) -> Any:
    """Replay one recorded call on the denoiser's device and dtype."""
    parameter = next(denoiser.parameters())
    return denoiser(**_to_device(call, parameter.device, parameter.dtype))


def _collection_steps(steps: Sequence[int] | str, num_inference_steps: int) -> set[int]:
    """The denoising step indices to collect (``"all"`` or indices in the schedule)."""
    if steps == "all":
        return set(range(num_inference_steps))
    wanted = {int(s) for s in steps}
    bad = sorted(s for s in wanted if not 0 <= s < num_inference_steps)
    if not wanted or bad:
        raise SteeringError(
            f"collection steps must be indices in [0, {num_inference_steps}) for num_inference_steps="
            f"{num_inference_steps}; got {sorted(wanted)}"
        )
    return wanted


def _conditional_rows(batch: int, images: int) -> slice:
    """The rows of a denoiser batch of ``batch`` rows for ``images`` images that hold the
    conditional inputs: all of them, or the second half of ``[unconditional; conditional]``."""
    if batch == 2 * images:
        return slice(images, batch)
    if batch == images:
        return slice(0, batch)
    raise ActivationError(
        f"the denoiser was called with a batch of {batch} for {images} images; expected {images} "
        f"or {2 * images} (classifier-free guidance). This pipeline batches in a way the "
        "collector does not know."
    )


def record_denoiser_calls(
    pipe: Any,
    denoiser: nn.Module,
    prompts: Sequence[str],
    *,
    steps: Sequence[int] | str = "all",
    num_inference_steps: int = 10,
    batch_size: int = 8,
    seed: int = 0,
    name: str = "prompts",
    progress: bool = True,
    **pipeline_kwargs: Any,
) -> list[DenoiserCall]:
    """Run ``pipe`` on ``prompts`` and return the denoiser's inputs at ``steps``.

    One returned call per (prompt batch, step), holding only the conditional rows when the
    pipeline batches classifier-free guidance as ``[unconditional; conditional]`` (and,
    when it calls the denoiser more than once per step, only the first call, which is the
    conditional one in diffusers' pipelines). The run stops after the last wanted step.

    Args:
        steps: denoising step indices (0 = the first, noisiest step) or ``"all"``.
        num_inference_steps: the schedule the prompts are run with.
        batch_size: prompts per pipeline call.
        seed: prompt ``i`` uses ``torch.Generator().manual_seed(seed + i)``.
        pipeline_kwargs: passed to every pipeline call (``guidance_scale``, ``height``...).
    """
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise InputSetError(f"the {name} must be a list of prompt strings")
    if len(prompts) == 0:
        raise InputSetError(f"the {name} list is empty; give it at least a few prompts (16 or more is better)")
    wanted = _collection_steps(steps, num_inference_steps)
    last = max(wanted)
    signature = inspect.signature(denoiser.forward)
    images_per_prompt = int(pipeline_kwargs.get("num_images_per_prompt", 1) or 1)
    calls: list[DenoiserCall] = []
    state: dict[str, Any] = {}
    owner = threading.get_ident()

    def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != owner:
            return  # another thread's call on the same denoiser (a server answering requests)
        arguments = signature.bind(*args, **kwargs).arguments
        key = timestep_key(arguments.get("timestep"))
        if key is not None and key == state["timestep"]:
            return  # a further call within the same step (e.g. a separate unconditional pass)
        state["timestep"], state["step"] = key, state["step"] + 1
        step = state["step"]
        if step in wanted:
            batch = _primary_input(arguments).shape[0]
            rows = _conditional_rows(batch, state["images"])
            arguments = dict(arguments)
            arguments.pop("return_dict", None)
            calls.append({**_take_rows(arguments, rows, batch), "return_dict": False})
        if step >= last:
            raise StopDenoising

    handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        bar = tqdm(range(0, len(prompts), batch_size), desc=f"collect {name}", disable=not progress)
        for start in bar:
            chunk = list(prompts[start : start + batch_size])
            state.update(timestep=None, step=-1, images=len(chunk) * images_per_prompt)
            generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            run_until_stopped(
                pipe, chunk, num_inference_steps=num_inference_steps, generator=generators, **pipeline_kwargs
            )
            if state["step"] < last:
                raise SteeringError(
                    f"the pipeline ran {state['step'] + 1} denoising steps but step {last} was asked for; "
                    "lower the collection steps or raise num_inference_steps (strength < 1 in img2img "
                    "also shortens the schedule)"
                )
    finally:
        handle.remove()
    return calls


class ImageStreamCheck:
    """Hooks that check, during real denoiser calls, that every hook point's selected output
    is the image stream: UNet blocks must give ``(B, C, H, W)`` maps; transformer blocks
    ``(B, N, C)`` with ``N`` the number of image tokens of the call's latents.

    diffusers has changed what blocks return between releases (and joint blocks return the
    text and the image stream with the same width); this turns a silent mis-steer into an
    error naming the block. Use as a context manager around one or more denoiser calls, then
    :meth:`raise_if_wrong`.
    """

    def __init__(self, denoiser: nn.Module, points: Sequence[HookPoint]) -> None:
        self.denoiser = denoiser
        self.points = list(points)
        self.architecture = architecture_of(denoiser)
        self.problems: list[str] = []
        self.tokens: int | None = None
        self.latent_size: tuple[int, ...] | None = None
        self._hooks = HookHandles()
        self._signature = inspect.signature(denoiser.forward)
        self._owner: int | None = None  # only the entering thread's calls are checked

    def __enter__(self) -> ImageStreamCheck:
        self._owner = threading.get_ident()
        self._hooks.add(self.denoiser.register_forward_pre_hook(self._read_latents, with_kwargs=True))
        self._hooks.place(
            (resolve_module(self.denoiser, point.module), self._make_hook(point)) for point in self.points
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def _read_latents(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if threading.get_ident() != self._owner:
            return
        arguments = self._signature.bind(*args, **kwargs).arguments
        latents = _primary_input(arguments)
        self.latent_size = tuple(latents.shape[-2:]) if latents.ndim == 4 else None
        if latents.ndim == 4:  # (B, C, H, W) latents, patchified inside transformers
            patch = int(getattr(self.denoiser.config, self.architecture.patch_size_attr or "patch_size", 1) or 1)
            self.tokens = (latents.shape[-2] // patch) * (latents.shape[-1] // patch)
        else:  # already packed (B, N, C), as in FLUX
            self.tokens = latents.shape[1]

    def _make_hook(self, point: HookPoint):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if threading.get_ident() != self._owner:
                return
            try:
                tensor = get_output(output, point.output_index, point.module)
            except ActivationError as error:
                self.problems.append(str(error))
                return
            if point.layout == "channels_first" and tensor.ndim != 4:
                self.problems.append(
                    f"{point.module!r} gave {tuple(tensor.shape)}, expected a (B, C, H, W) feature map"
                )
            elif point.layout == "channels_last" and self.architecture.image_ndim == 3:
                if tensor.ndim != 3 or tensor.shape[1] != self.tokens:
                    self.problems.append(
                        f"{point.module!r} output {point.output_index!r} has shape {tuple(tensor.shape)}, expected "
                        f"(B, {self.tokens} image tokens, C): it is not the image-token stream"
                    )
            elif point.layout == "channels_last" and self.latent_size is not None:
                # tokens of a UNet feature map (inside its transformer blocks): one per position
                # of the latents downsampled by a power of two
                height, width = self.latent_size
                grids = {(height >> k) * (width >> k) for k in range(8) if height >> k and width >> k}
                if tensor.ndim != 3 or tensor.shape[1] not in grids:
                    self.problems.append(
                        f"{point.module!r} gave {tuple(tensor.shape)}, expected (B, positions, C) with the positions "
                        f"of a {height}x{width} latent grid or a downsampled one: it is not the image stream"
                    )

        return hook

    def raise_if_wrong(self) -> None:
        if self.problems:
            unique = list(dict.fromkeys(self.problems))
            raise ActivationError(
                "hook points do not read the image stream (the installed diffusers may return block outputs "
                "in another order than the mapping in dsas_diffusion.diffusion.ARCHITECTURES says): "
                + "; ".join(unique[:5])
            )


def check_image_stream(denoiser: nn.Module, points: Sequence[HookPoint], call: DenoiserCall) -> None:
    """Replay ``call`` once under an :class:`ImageStreamCheck` and raise if it finds a problem."""
    with ImageStreamCheck(denoiser, points) as check, torch.no_grad():
        run_denoiser_call(denoiser, call)
    check.raise_if_wrong()
