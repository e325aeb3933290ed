"""Gathering concurrent requests into one batched call.

:class:`RequestBatcher` lets threads that each serve one request (a Gradio queue worker, a web
server's handler) submit their work and wait: requests with the same key that arrive while a
batch is being gathered, up to ``max_batch_size`` of them, run together as one call of
``run_batch``, and each thread gets its own result back (or its own exception, when only its
request failed). A request that finds no other waits at most ``wait`` seconds for company.

Examples:
    >>> batcher = RequestBatcher(lambda key, items: [item * 2 for item in items], max_batch_size=4, wait=0.0)
    >>> batcher.submit("key", 21)
    42
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["RequestBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    item: T
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


@dataclass
class _Gathering(Generic[T]):
    pending: list[_Pending[T]] = field(default_factory=list)
    full: threading.Event = field(default_factory=threading.Event)


class RequestBatcher(Generic[T, R]):
    """Runs ``run_batch(key, items)`` (returning one result, or one exception, per item in
    order) on the requests submitted under one key while a batch is gathered.

    Args:
        run_batch: the batched call. It may raise: every request of the batch gets the error.
        max_batch_size: at most this many requests per call.
        wait: how long the first request of a batch waits for others (seconds).
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 16,
        wait: float = 0.05,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size!r}")
        if wait < 0:
            raise ValueError(f"wait must be at least 0 seconds, got {wait!r}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait = wait
        self._lock = threading.Lock()
        self._gathering: dict[Hashable, _Gathering[T]] = {}
        #: how many requests each call ran, in order (for tests and monitoring)
        self.batch_sizes: list[int] = []

    def submit(self, key: Hashable, item: T) -> R:
        """Run ``item`` in a batch with the requests of the same ``key``; block until done and
        return its result (or raise its error)."""
        pending = _Pending(item)
        with self._lock:
            gathering = self._gathering.get(key)
            leader = gathering is None
            if leader:
                gathering = self._gathering[key] = _Gathering()
            gathering.pending.append(pending)
            if len(gathering.pending) >= self.max_batch_size:
                del self._gathering[key]  # full: the next request starts a new batch
                gathering.full.set()
        if leader:
            gathering.full.wait(self.wait)
            with self._lock:
                if self._gathering.get(key) is gathering:
                    del self._gathering[key]
                batch = list(gathering.pending)
            self._run(key, batch)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _run(self, key: Hashable, batch: list[_Pending[T]]) -> None:
        with self._lock:
            self.batch_sizes.append(len(batch))
        try:
            results = list(self.run_batch(key, [p.item for p in batch]))
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for {len(batch)} requests")
        except BaseException as error:  # every request of the batch learns why
            for p in batch:
                p.error = error
                p.done.set()
            return
        for p, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                p.error = result
            else:
                p.result = result
            p.done.set()
