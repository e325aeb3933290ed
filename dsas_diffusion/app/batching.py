"""Gathering concurrent requests into one batched call.

:class:`RequestBatcher` lets threads that each serve one request (a Gradio queue worker, a web
server's handler) submit their work and wait. One worker thread of the batcher runs the calls:
requests with the same key that arrive while it is busy, or within ``wait`` seconds of the
first, run together as one call of ``run_batch`` (at most ``max_batch_size`` of them, the
oldest first), and each thread gets its own result back (or its own exception, when only its
request failed). Under light load a request waits at most ``wait``; under heavy load the
batches grow while the previous call runs. Torch's thread team lives in the worker thread
and is reused by every call.

Examples:
    >>> batcher = RequestBatcher(lambda key, items: [item * 2 for item in items], max_batch_size=4, wait=0.0)
    >>> batcher.submit("key", 21)
    42
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = ["RequestBatcher"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class _Pending(Generic[T]):
    key: Hashable
    item: T
    arrived: float
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class RequestBatcher(Generic[T, R]):
    """Runs ``run_batch(key, items)`` (returning one result, or one exception, per item in
    order) on requests submitted under one key, gathered as described in the module.

    Args:
        run_batch: the batched call. It may raise: every request of the batch gets the error.
        max_batch_size: at most this many requests per call.
        wait: how long the first request waits for others while the worker is idle (seconds).
    """

    def __init__(
        self,
        run_batch: Callable[[Hashable, Sequence[T]], Sequence[R | BaseException]],
        *,
        max_batch_size: int = 16,
        wait: float = 0.01,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size!r}")
        if wait < 0:
            raise ValueError(f"wait must be at least 0 seconds, got {wait!r}")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.wait = wait
        self._condition = threading.Condition()
        self._queue: list[_Pending[T]] = []
        self._worker: threading.Thread | None = None
        #: how many requests each call ran, in order (for tests and monitoring)
        self.batch_sizes: list[int] = []

    def submit(self, key: Hashable, item: T) -> R:
        """Run ``item`` in a batch with the requests of the same ``key``; block until done and
        return its result (or raise its error)."""
        pending = _Pending(key, item, time.monotonic())
        with self._condition:
            self._queue.append(pending)
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="dsas-batcher", daemon=True)
                self._worker.start()
            self._condition.notify_all()
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.result

    def _next_batch(self) -> list[_Pending[T]]:
        """The oldest request and up to ``max_batch_size - 1`` more of its key, once its batch
        is full or its ``wait`` is over (called holding the condition)."""
        while True:
            while not self._queue:
                self._condition.wait()
            first = self._queue[0]
            same = [p for p in self._queue if p.key == first.key]
            left = first.arrived + self.wait - time.monotonic()
            if len(same) >= self.max_batch_size or left <= 0:
                batch = same[: self.max_batch_size]
                self._queue = [p for p in self._queue if not any(p is b for b in batch)]
                return batch
            self._condition.wait(left)

    def _work(self) -> None:
        while True:
            with self._condition:
                batch = self._next_batch()
                self.batch_sizes.append(len(batch))
            self._run(batch)

    def _run(self, batch: list[_Pending[T]]) -> None:
        try:
            results = list(self.run_batch(batch[0].key, [p.item for p in batch]))
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
