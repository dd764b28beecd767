"""Batch pre-annotation: everything mode over many images, image decoding overlapped with inference."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from tinysam_kit.data.images import load_image
from tinysam_kit.inference.everything import EverythingGenerator
from tinysam_kit.inference.predictor import TinySamPredictor


@dataclass
class PrelabelResult:
    item: Any  # whatever the caller passed in (a path, a sample id, a task)
    records: list[dict] | None  # None when the image failed
    error: str | None
    height: int = 0
    width: int = 0
    stats: dict | None = None


def prefetch_images(items: Iterable[Any], load: Callable[[Any], Any] = load_image, depth: int = 2,
                    workers: int = 1) -> Iterator[tuple[Any, Any, Exception | None]]:
    """Yield (item, loaded, error) in input order while up to `depth` items are decoded ahead by `workers`
    threads (decoding releases the GIL, so it overlaps inference); memory stays bounded by `depth`.

    Unreadable inputs (ImageError, OSError, other ValueErrors) become per-item errors; anything else is a bug
    and propagates.
    """
    depth = max(1, depth)
    with ThreadPoolExecutor(max(1, workers), thread_name_prefix="tinysam-decode") as pool:
        pending: deque = deque()
        it = iter(items)

        def submit() -> None:
            for item in it:
                pending.append((item, pool.submit(load, item)))
                return

        for _ in range(depth):
            submit()
        while pending:
            item, future = pending.popleft()
            submit()
            try:
                yield item, future.result(), None
            except (OSError, ValueError) as exc:
                yield item, None, exc


def run_everything(predictor: TinySamPredictor, items: Iterable[Any], *, mode: str = "hierarchical",
                   load: Callable[[Any], np.ndarray] = load_image, prefetch: int = 2,
                   **params) -> Iterator[PrelabelResult]:
    """Everything mode for each item; a bad image yields a result with `error` set instead of raising."""
    generator = EverythingGenerator(predictor, mode, **params)
    for item, image, error in prefetch_images(items, load, prefetch):
        if error is not None:
            yield PrelabelResult(item, None, f"{type(error).__name__}: {error}")
            continue
        try:
            # Each image is seen once here: don't let it push interactive embeddings out of the cache.
            state = predictor.embed(image, cache=False)
            records = generator.generate(image_embedding=state)
        except (ValueError, RuntimeError) as exc:
            yield PrelabelResult(item, None, f"{type(exc).__name__}: {exc}", image.shape[0], image.shape[1])
            continue
        yield PrelabelResult(item, records, None, image.shape[0], image.shape[1], dict(generator.stats))

