"""Streaming collection of pooled activations at named modules.

The collector never keeps a full activation: each forward call is reduced on the spot to
one pooled row per sample (and, optionally, a few randomly chosen positions per sample),
so peak memory is one forward pass plus ``rows x channels`` floats.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .errors import ActivationError, InputSetError
from .hookpoints import HookPoint, pool, position_rows, register_reader, resolve_layout, resolve_module
from .hooks import HookHandles, SteeringSession

__all__ = [
    "ActivationCollector",
    "Activations",
    "ContrastPositions",
    "Forward",
    "check_not_empty",
    "collect_activations",
    "collect_contrast_positions",
    "default_forward",
    "default_mask",
]


class ActivationCollector:
    """Record pooled activations of named modules while you run your own forward passes.

    Args:
        model: the module whose submodules are hooked.
        hook_points: module names or :class:`HookPoint` objects; the results are keyed by
            :attr:`HookPoint.key` (the module name; ``"<module>:input"`` for its input).
        positions_per_sample: if set, also keep this many randomly chosen (non-padding)
            per-position feature vectors of each sample, for fitting on positions.
        seed: seed of the position subsampling.

    Attributes you may set between forward calls:
        ``mask``: a ``(B, positions)`` padding mask (1 = real token) for the next calls.
        ``batch_slice``: keep only these batch rows (e.g. the conditional half of a CFG batch).
        ``enabled``: ``False`` skips recording (e.g. denoising steps you do not collect from).

    Examples:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
        >>> with ActivationCollector(model, ["0", "2"]) as collector:
        ...     _ = model(torch.randn(3, 5, 4))   # 3 samples of 5 tokens
        >>> collector.pooled()["2"].shape
        torch.Size([3, 8])
    """

    def __init__(
        self,
        model: nn.Module,
        hook_points: Sequence[HookPoint | str],
        *,
        positions_per_sample: int | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.hook_points = [HookPoint.coerce(point) for point in hook_points]
        if not self.hook_points:
            raise ValueError("give at least one hook point to collect from")
        names = [point.key for point in self.hook_points]
        if len(set(names)) != len(names):
            raise ValueError(f"hook points name the same module twice: {names}")
        self.modules = {point.key: resolve_module(model, point.module) for point in self.hook_points}
        if positions_per_sample is not None and positions_per_sample < 1:
            raise ValueError("positions_per_sample must be a positive integer or None")
        self.positions_per_sample = positions_per_sample
        self.generator = torch.Generator().manual_seed(seed)
        self.mask: torch.Tensor | None = None
        self.batch_slice: slice | None = None
        self.enabled = True
        self.tag: str = ""
        self.layouts: dict[str, str] = {}
        self.widths: dict[str, int] = {}
        self.call_order: list[str] = []
        self._pooled: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._positions: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self._hooks = HookHandles()
        self._owner: int | None = None  # the thread that entered: only its forward calls count

    # -- hook management -------------------------------------------------------------------
    def __enter__(self) -> ActivationCollector:
        self._owner = threading.get_ident()
        _place_readers(self._hooks, self.modules, self.hook_points, self._make_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this collector placed (idempotent)."""
        self._hooks.remove()

    @contextlib.contextmanager
    def masked(self, mask: torch.Tensor | None) -> Iterator[None]:
        """Use ``mask`` as the padding mask for the forward calls inside the block."""
        previous, self.mask = self.mask, mask
        try:
            yield
        finally:
            self.mask = previous

    def _make_hook(self, point: HookPoint) -> Callable[[torch.Tensor], None]:
        name = point.key

        def hook(tensor: torch.Tensor) -> None:
            if not self.enabled or threading.get_ident() != self._owner:
                return  # other threads may run the same model meanwhile (a server answering requests)
            tensor = tensor.detach()
            layout = resolve_layout(tensor, point.layout)
            mask = self.mask
            if self.batch_slice is not None:
                tensor = tensor[self.batch_slice]
                mask = None if mask is None else mask[self.batch_slice]
            if tensor.shape[0] == 0:
                return
            width = tensor.shape[1 if layout == "channels_first" else -1]
            if self.widths.setdefault(name, width) != width:
                raise ActivationError(f"module {name!r} changed width between calls: {self.widths[name]} then {width}")
            self.layouts[name] = layout
            if name not in self.call_order:
                self.call_order.append(name)
            pooled = pool(tensor, layout, mask)
            if not bool(torch.isfinite(pooled).all()):
                raise ActivationError(
                    f"module {name!r} produced NaN or Inf activations{self._where()}; check the "
                    "inputs and the model's dtype (fp16 overflow is a common cause: try float32 or bf16)."
                )
            self._pooled[name].append(pooled.cpu())
            if self.positions_per_sample:
                self._positions[name].append(self._sample_positions(tensor, layout, mask))

        return hook

    def _where(self) -> str:
        return f" while collecting {self.tag}" if self.tag else ""

    def _sample_positions(self, tensor: torch.Tensor, layout: str, mask: torch.Tensor | None) -> torch.Tensor:
        rows = position_rows(tensor, layout).float().cpu()
        keep = None if mask is None else mask.reshape(rows.shape[0], -1).bool().cpu()
        picked = []
        for sample in range(rows.shape[0]):
            valid = torch.arange(rows.shape[1]) if keep is None else keep[sample].nonzero().flatten()
            count = min(self.positions_per_sample or 1, valid.numel())
            choice = valid[torch.randperm(valid.numel(), generator=self.generator)[:count]]
            picked.append(rows[sample, choice])
        return torch.cat(picked)

    # -- results ---------------------------------------------------------------------------
    def pooled(self) -> dict[str, torch.Tensor]:
        """Pooled rows per module, ``(rows, C)`` float32 on the CPU."""
        return {name: _cat(rows, name) for name, rows in self._pooled.items()}

    def positions(self) -> dict[str, torch.Tensor]:
        """Sampled per-position rows per module (needs ``positions_per_sample``)."""
        if not self.positions_per_sample:
            raise ValueError("create the collector with positions_per_sample=k to sample positions")
        return {name: _cat(rows, name) for name, rows in self._positions.items()}

    def clear(self) -> None:
        for rows in (*self._pooled.values(), *self._positions.values()):
            rows.clear()


def _place_readers(
    hooks: HookHandles,
    modules: Mapping[str, nn.Module],
    points: Sequence[HookPoint],
    make: Callable[[HookPoint], Callable[[torch.Tensor], None]],
) -> None:
    """Register a reader (:func:`~.hookpoints.register_reader`) per point on its module, kept
    in ``hooks``; if one fails, remove those placed so far and re-raise."""
    try:
        for point in points:
            for handle in register_reader(modules[point.key], point, make(point)):
                hooks.add(handle)
    except BaseException:
        hooks.remove()
        raise


def _cat(rows: list[torch.Tensor], name: str) -> torch.Tensor:
    if not rows:
        raise ActivationError(
            f"module {name!r} was never called during collection: it is not on the forward path "
            "of the inputs you ran, or collection was disabled. Pick a module that runs."
        )
    return torch.cat(rows)


Forward = Callable[[Any], Any]


def default_forward(model: nn.Module) -> Forward:
    """``model(**batch)`` for dicts, ``model(*batch)`` for tuples/lists, else ``model(batch)``."""

    def forward(batch: Any) -> Any:
        if isinstance(batch, Mapping):
            return model(**batch)
        if isinstance(batch, (tuple, list)):
            return model(*batch)
        return model(batch)

    return forward


def default_mask(batch: Any) -> torch.Tensor | None:
    """The ``attention_mask`` entry of a dict batch (for padded text), else ``None``."""
    if isinstance(batch, Mapping):
        return batch.get("attention_mask")
    return None


@dataclass
class Activations:
    """Pooled activations of one input set: per module ``(samples, C)`` float32 rows."""

    pooled: dict[str, torch.Tensor]
    positions: dict[str, torch.Tensor] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)
    call_order: list[str] = field(default_factory=list)

    @property
    def num_samples(self) -> int:
        return next(iter(self.pooled.values())).shape[0]


def collect_activations(
    model: nn.Module,
    hook_points: Sequence[HookPoint | str],
    inputs: Sequence[Any],
    *,
    forward: Forward | None = None,
    mask_fn: Callable[[Any], torch.Tensor | None] = default_mask,
    positions_per_sample: int | None = None,
    steering: SteeringSession | None = None,
    name: str = "inputs",
    progress: bool = True,
    seed: int = 0,
) -> Activations:
    """Run every batch of ``inputs`` through ``forward`` and pool each hooked activation.

    ``steering``, if given, is a detached :class:`SteeringSession` kept active during the
    collection (used for incremental fitting: upstream layers already steered).
    """
    check_not_empty(inputs, name)
    forward = forward or default_forward(model)
    collector = ActivationCollector(model, hook_points, positions_per_sample=positions_per_sample, seed=seed)
    collector.tag = f"the {name} set"
    with torch.no_grad(), collector:
        if steering is not None:
            steering.attach()
        try:
            for batch in tqdm(inputs, desc=f"collect {name}", disable=not progress, leave=False):
                with collector.masked(mask_fn(batch)):
                    forward(batch)
        finally:
            if steering is not None:
                steering.detach()
    return Activations(
        pooled=collector.pooled(),
        positions=collector.positions() if positions_per_sample else {},
        layouts=dict(collector.layouts),
        call_order=list(collector.call_order),
    )


def check_not_empty(inputs: Sequence[Any] | None, name: str) -> None:
    if inputs is None or len(inputs) == 0:
        raise InputSetError(f"the {name} set is empty; give it at least a few batches (32 samples is the default size)")


@dataclass
class ContrastPositions:
    """Per module, rows of single positions of the source inputs located by contrast with
    their paired target inputs: ``concept`` where a source input differs most from its
    target (the concept is there), ``background`` where it hardly differs."""

    concept: dict[str, torch.Tensor]
    background: dict[str, torch.Tensor]


class _FullCapture:
    """Hooks keeping the whole ``(B, positions, C)`` activation of the last forward call per module."""

    def __init__(self, model: nn.Module, hook_points: Sequence[HookPoint]) -> None:
        self.points = list(hook_points)
        self.modules = {point.key: resolve_module(model, point.module) for point in self.points}
        self.rows: dict[str, torch.Tensor] = {}
        self._hooks = HookHandles()
        self._owner = threading.get_ident()

    def __enter__(self) -> _FullCapture:
        _place_readers(self._hooks, self.modules, self.points, self._make_hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._hooks.remove()

    def _make_hook(self, point: HookPoint) -> Callable[[torch.Tensor], None]:
        def hook(tensor: torch.Tensor) -> None:
            if threading.get_ident() != self._owner:
                return
            tensor = tensor.detach()
            self.rows[point.key] = position_rows(tensor, resolve_layout(tensor, point.layout)).float().cpu()

        return hook

    def take(self) -> dict[str, torch.Tensor]:
        rows, self.rows = self.rows, {}
        return rows


def _paired_difference(
    name: str,
    source_rows: Mapping[str, torch.Tensor],
    target_rows: Mapping[str, torch.Tensor],
    mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Module ``name``'s source activations and, per sample and position, their distance to the
    paired target's (0 where ``mask`` is off)."""
    if name not in source_rows or name not in target_rows:
        raise ActivationError(f"module {name!r} was not called by the forward pass of a source or target batch")
    rows, other = source_rows[name], target_rows[name]
    if rows.shape != other.shape:
        raise InputSetError(
            f"module {name!r}: a source batch gave activations of shape {tuple(rows.shape)} and its "
            f"paired target batch {tuple(other.shape)}; contrast needs paired inputs of the same shape"
        )
    difference = (rows - other).norm(dim=-1)  # (B, positions)
    if mask is not None:
        difference = difference * mask.reshape(difference.shape).to(difference.dtype).cpu()
    return rows, difference


def _contrast_split(
    difference: torch.Tensor,
    level: float,
    per_sample: int,
    background_level: float,
    background_per_sample: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One sample's concept positions (at least ``level`` times its largest difference, at most
    ``per_sample``, largest first) and background positions (at most ``background_level`` times
    it, ``background_per_sample`` at random); ``None`` where source and target are identical."""
    top = difference.max()
    if not bool(top > 0):
        return None
    order = difference.argsort(descending=True)
    strong = order[difference[order] >= level * top][:per_sample]
    weak = (difference <= background_level * top).nonzero().flatten()
    weak = weak[torch.randperm(weak.numel(), generator=generator)[:background_per_sample]]
    return strong, weak


def collect_contrast_positions(
    model: nn.Module,
    hook_points: Sequence[HookPoint | str],
    source_inputs: Sequence[Any],
    target_inputs: Sequence[Any],
    *,
    forward: Forward | None = None,
    mask_fn: Callable[[Any], torch.Tensor | None] = default_mask,
    level: float = 0.5,
    per_sample: int = 16,
    background_level: float = 0.1,
    background_per_sample: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> ContrastPositions:
    """Locate the concept inside each source input without any mask, by contrast with its
    paired target input (the same scene without the concept, e.g. the same prompt and seed
    with the concept word replaced): at each hooked module, the positions where
    ``|| source - target ||`` reaches at least ``level`` times the input's largest
    difference (at most ``per_sample`` of them, largest first) are concept positions; the
    positions below ``background_level`` times it (``background_per_sample`` of them, at
    random) are the concept images' background.

    Source and target must be paired batch by batch with activations of the same shape
    (diffusion: the same seeds and steps; text of different lengths cannot be paired).

    Examples:
        >>> model = torch.nn.Linear(4, 4)
        >>> concept = torch.zeros(2, 5, 4)
        >>> concept[:, 3] = 5.0                        # the concept at position 3
        >>> source = [concept]
        >>> found = collect_contrast_positions(model, ["" ], source, [torch.zeros(2, 5, 4)], progress=False)
        >>> found.concept[""].shape, found.background[""].shape
        (torch.Size([2, 4]), torch.Size([8, 4]))
    """
    if not 0.0 < background_level < level <= 1.0:
        raise ValueError("contrast levels must satisfy 0 < background_level < level <= 1")
    check_not_empty(source_inputs, "source")
    check_not_empty(target_inputs, "target")
    if len(source_inputs) != len(target_inputs):
        raise InputSetError(
            f"locating the concept by contrast pairs source and target batch by batch, but there are "
            f"{len(source_inputs)} source and {len(target_inputs)} target batches; give paired sets of the same size"
        )
    forward = forward or default_forward(model)
    points = [HookPoint.coerce(point) for point in hook_points]
    generator = torch.Generator().manual_seed(seed)
    concept: dict[str, list[torch.Tensor]] = {point.key: [] for point in points}
    background: dict[str, list[torch.Tensor]] = {point.key: [] for point in points}
    pairs = zip(source_inputs, target_inputs, strict=True)
    with torch.no_grad(), _FullCapture(model, points) as capture:
        for source_batch, target_batch in tqdm(pairs, total=len(source_inputs), desc="contrast", disable=not progress):
            forward(source_batch)
            source_rows = capture.take()
            forward(target_batch)
            target_rows = capture.take()
            mask = mask_fn(source_batch)
            for point in points:
                name = point.key
                rows, difference = _paired_difference(name, source_rows, target_rows, mask)
                for sample in range(rows.shape[0]):
                    found = _contrast_split(
                        difference[sample], level, per_sample, background_level, background_per_sample, generator
                    )
                    if found is not None:  # (None: source and target identical here, nothing to locate)
                        concept[name].append(rows[sample, found[0]])
                        background[name].append(rows[sample, found[1]])
    empty = [name for name, found in concept.items() if not found]
    if empty:
        raise InputSetError(
            f"source and target activations are identical at {empty}: the concept cannot be located by "
            "contrast there; check that the target set differs from the source set"
        )
    return ContrastPositions(
        {name: torch.cat(rows) for name, rows in concept.items()},
        {name: torch.cat(rows) for name, rows in background.items()},
    )
