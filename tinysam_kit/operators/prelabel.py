"""Batch pre-annotation: everything mode over many images, image decoding overlapped with inference."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from .everything import EverythingGenerator
from .images import load_image
from .predictor import TinySamPredictor


@dataclass
class PrelabelResult:
    item: Any  # whatever the caller passed in (a path, a sample id, a task)
    records: list[dict] | None  # None when the image failed
    error: str | None
    height: int = 0
    width: int = 0
    stats: dict | None = None


def prefetch_images(items: Iterable[Any], load: Callable[[Any], np.ndarray] = load_image,
                    depth: int = 2) -> Iterator[tuple[Any, np.ndarray | None, str | None]]:
    """Decode images in a background thread, at most `depth` ahead, so decoding overlaps inference."""
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    done = object()
    stop = threading.Event()

    def worker() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                try:
                    q.put((item, load(item), None))
                except Exception as exc:  # noqa: BLE001 - every failure becomes a per-item error
                    q.put((item, None, f"{type(exc).__name__}: {exc}"))
        finally:
            q.put(done)

    thread = threading.Thread(target=worker, name="tinysam-prefetch", daemon=True)
    thread.start()
    try:
        while (entry := q.get()) is not done:
            yield entry
    finally:
        stop.set()
        while thread.is_alive():  # unblock the worker if the consumer stopped early
            try:
                q.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.05)


def run_everything(predictor: TinySamPredictor, items: Iterable[Any], *, mode: str = "hierarchical",
                   load: Callable[[Any], np.ndarray] = load_image, prefetch: int = 2,
                   **params) -> Iterator[PrelabelResult]:
    """Everything mode for each item; a bad image yields a result with `error` set instead of raising."""
    generator = EverythingGenerator(predictor, mode, **params)
    for item, image, error in prefetch_images(items, load, prefetch):
        if error is not None:
            yield PrelabelResult(item, None, error)
            continue
        try:
            # Each image is seen once here: don't let it push interactive embeddings out of the cache.
            state = predictor.embed(image, cache=False)
            records = generator.generate(image_embedding=state)
        except (ValueError, RuntimeError) as exc:
            yield PrelabelResult(item, None, f"{type(exc).__name__}: {exc}", image.shape[0], image.shape[1])
            continue
        yield PrelabelResult(item, records, None, image.shape[0], image.shape[1], dict(generator.stats))

