"""Serving several users at once without cross-talk: the model cache, per-request
pipelines, the read-write lock that lets a fit take a model exclusively, and torch's
thread count per request.

* :class:`ModelCache` keeps **one base pipeline per model** (weights loaded once).
* Each request runs on its own light pipeline, :func:`request_pipeline`: ``from_pipe`` of the
  base (the same weight tensors, no copy) with private copies of the scheduler and the
  tokenizers (both hold per-call state) and the request's steerer loaded on it. Steering hooks
  are attached for one call and act only on the calling thread (the core's scoped sessions),
  so requests with different strengths or steerers never see each other's settings.
* A fit takes the model's lock exclusively (:class:`ReadWriteLock`): generation requests on
  that model wait until it ends; generation requests run together. (The library's collection
  hooks only count the fitting thread's forward calls, so this is not needed for correctness;
  it keeps a fit, minutes of work, from sharing the cores with requests.)
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..steering import Steerer
from .validation import InputError

__all__ = [
    "STEERER_NAME",
    "ModelCache",
    "ModelEntry",
    "PromptTokenizer",
    "ReadWriteLock",
    "configure_torch_threads",
    "request_pipeline",
]

STEERER_NAME = "demo"

# diffusers' from_pipe calls pipeline.to(dtype=None), which logs a warning per model each time
logging.getLogger("diffusers.models.modeling_utils").setLevel(logging.ERROR)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._condition:
            while self._writer or self._writers_waiting:
                self._condition.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._condition:
            self._readers -= 1
            if self._readers == 0:
                self._condition.notify_all()

    def acquire_write(self) -> None:
        with self._condition:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._condition.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._condition:
            self._writer = False
            self._condition.notify_all()

    class _Guard:
        def __init__(self, acquire: Callable[[], None], release: Callable[[], None]) -> None:
            self._acquire, self._release = acquire, release

        def __enter__(self) -> None:
            self._acquire()

        def __exit__(self, *exc: object) -> None:
            self._release()

    def reading(self) -> ReadWriteLock._Guard:
        """``with lock.reading():`` shared access."""
        return self._Guard(self.acquire_read, self.release_read)

    def writing(self) -> ReadWriteLock._Guard:
        """``with lock.writing():`` exclusive access."""
        return self._Guard(self.acquire_write, self.release_write)


class PromptTokenizer:
    """Counts a prompt's tokens with a private copy of a pipeline's tokenizer.

    A fast tokenizer keeps its padding / truncation settings as state, so a validation call
    ``tokenizer(text)`` on a tokenizer a request is using would switch padding off under that
    request's ``padding="max_length"`` encoding (see :func:`request_pipeline`).
    """

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = copy.deepcopy(tokenizer)
        self._lock = threading.Lock()
        self.model_max_length = int(tokenizer.model_max_length)

    def count(self, text: str) -> int:
        """How many tokens ``text`` is, begin and end tokens included."""
        with self._lock:
            return len(self._tokenizer(text, verbose=False).input_ids)


@dataclass
class ModelEntry:
    """One loaded model: its base pipeline, its lock and its CLIP scorer (made on first use)."""

    name: str
    pipeline: Any
    tokenizer: PromptTokenizer | None = None
    lock: ReadWriteLock = field(default_factory=ReadWriteLock)
    scorer: Any = None
    scorer_error: str | None = None
    scorer_lock: threading.Lock = field(default_factory=threading.Lock)
    _tokenizer_pool: list[dict[str, Any]] = field(default_factory=list)
    _pool_lock: threading.Lock = field(default_factory=threading.Lock)

    def borrow_tokenizers(self) -> dict[str, Any]:
        """Private copies of the pipeline's tokenizers for one request (from the pool)."""
        with self._pool_lock:
            if self._tokenizer_pool:
                return self._tokenizer_pool.pop()
        components = self.pipeline.components
        return {k: copy.deepcopy(v) for k, v in components.items() if k.startswith("tokenizer") and v is not None}

    def return_tokenizers(self, tokenizers: dict[str, Any]) -> None:
        """Give copies from :meth:`borrow_tokenizers` back to the pool."""
        with self._pool_lock:
            self._tokenizer_pool.append(tokenizers)

    def clip_scores(self, images: Sequence[Image.Image], prompt: str) -> tuple[list[float] | None, str]:
        """CLIP score of each image against ``prompt`` and the scoring model's name; ``None``
        scores (and the reason in place of the name) when no CLIP model can be loaded."""
        from ..eval.metrics import ClipScorer, default_clip_for

        clip_name, pretrained = default_clip_for(self.name)
        label = clip_name if pretrained is None else f"{clip_name} ({pretrained})"
        with self.scorer_lock:  # one scorer per model; its text cache is a plain dict
            if self.scorer is None and self.scorer_error is None:
                try:
                    self.scorer = ClipScorer(clip_name, pretrained)
                except Exception as error:  # offline without the weights: show why, keep the images
                    self.scorer_error = f"no CLIP score: {label} could not be loaded ({error})"
            if self.scorer is None:
                return None, self.scorer_error or "no CLIP score"
            scores = self.scorer.clip_score(list(images), [prompt] * len(images))
        return [float(s) for s in scores], label


class ModelCache:
    """Base pipelines by model name, at most ``max_models`` at once (least recently used goes).

    Every request on a model shares the one base pipeline's weights through
    :func:`request_pipeline`.
    """

    def __init__(self, max_models: int = 2, device: str | None = None) -> None:
        self.max_models = max_models
        self.device = device
        self._entries: OrderedDict[str, ModelEntry] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, model: str) -> ModelEntry:
        """The loaded model ``model`` (a Shapes name, a hub id or a folder), loading it once."""
        from ..diffusion.loading import load_pipeline

        name = (model or "").strip()
        if not name:
            raise InputError("Choose a model: shapes-sd, or a diffusers model id or folder you have locally.")
        with self._lock:
            if name in self._entries:
                self._entries.move_to_end(name)
                return self._entries[name]
            try:
                pipeline = load_pipeline(name, device=self.device)
            except Exception as error:  # offline hub ids, broken folders, unsupported classes: say which
                raise InputError(f"Could not load the model {name!r}: {error}") from error
            pipeline.set_progress_bar_config(disable=True)
            tokenizer = getattr(pipeline, "tokenizer", None)
            entry = ModelEntry(name, pipeline, None if tokenizer is None else PromptTokenizer(tokenizer))
            self._entries[name] = entry
            while len(self._entries) > self.max_models:
                self._entries.popitem(last=False)
            return entry

    def loaded(self) -> list[str]:
        """Names of the models now in memory."""
        with self._lock:
            return list(self._entries)


@contextlib.contextmanager
def request_pipeline(entry: ModelEntry, steerer: Steerer | None = None) -> Iterator[Any]:
    """``with request_pipeline(entry, steerer) as pipe:`` a pipeline for one request.

    It shares the base pipeline's models (no weight copy) and has its own copy of the
    scheduler and of the tokenizers, which both keep per-call state: the scheduler its
    timesteps; a fast tokenizer its padding / truncation settings, which diffusers'
    ``encode_prompt`` switches between ``max_length`` and ``longest`` in every call, so two
    threads sharing one tokenizer encoded each other's prompts unpadded now and then (a
    different image for the same seed, seen in the 8-concurrent-calls test). Tokenizer
    copies are pooled per model. ``steerer`` is loaded on this pipeline only.
    """
    base = entry.pipeline
    tokenizers = entry.borrow_tokenizers()
    try:
        pipe = type(base).from_pipe(base, scheduler=copy.deepcopy(base.scheduler), **tokenizers)
        pipe.set_progress_bar_config(disable=True)
        if steerer is not None:
            pipe.load_steering(steerer, name=STEERER_NAME)
        yield pipe
    finally:
        entry.return_tokenizers(tokenizers)


def configure_torch_threads(concurrency: int, threads: int | None = None) -> int:
    """Set torch's CPU threads per request so that ``concurrency`` requests fit the cores.

    Each request thread runs its own intra-op thread team, and teams that share the cores spin
    against each other (measured in docs/design.md, "The app"). ``threads`` overrides the
    choice. Returns the number set (process-wide: ``torch.set_num_threads``).
    """
    if threads is None:
        threads = max(1, (os.cpu_count() or 1) // max(1, int(concurrency)))
    torch.set_num_threads(int(threads))
    return int(threads)
