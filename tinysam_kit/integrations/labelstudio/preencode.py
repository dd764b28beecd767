"""Background encoding of task images, so that the first click on a task is as fast as the later ones.

New tasks (the TASKS_CREATED webhook) and opened tasks (Label Studio's predict without a context) are queued
here; one worker thread fetches each image with the backend's fetcher (same allow-list and credentials) and
encodes it into the predictor's memory cache and the shared embedding store. Every encode takes the model
gate as batch work, so an annotator's click waits at most for the one encode in progress, never for the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from tinysam_kit.integrations.labelstudio.label_config import LabelConfig

log = logging.getLogger("tinysam_kit.integrations.labelstudio")


@dataclass(frozen=True)
class _Job:
    key: str  # the image's cache key (its resolved URL)
    task: dict
    url_value: str


class BackgroundEncoder:
    """A bounded queue of task images and the one worker thread that encodes them (started on first use).

    Images already embedded (memory or store) are skipped; an image already waiting is not queued twice; when
    the queue is full further images are dropped with a log line (their first click encodes them instead).
    """

    def __init__(self, image_key: Callable[[dict, str], str], store_embedding: Callable[[dict, str], bool],
                 max_pending: int) -> None:
        """`image_key(task, url_value)`: the image's cache key, no I/O (raises ValueError for a reference that
        cannot be fetched); `store_embedding(task, url_value)`: fetch and encode unless embedded, True when the
        encoder ran (the backend's methods of those names)."""
        self.image_key = image_key
        self.store_embedding = store_embedding
        self.max_pending = int(max_pending)
        self._queue: queue.Queue[_Job | None] = queue.Queue(maxsize=max(self.max_pending, 1))
        self._pending: set[str] = set()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closed = False
        self.counters = {"queued": 0, "encoded": 0, "already_embedded": 0, "dropped": 0, "failed": 0}

    @property
    def enabled(self) -> bool:
        return self.max_pending > 0

    def describe(self) -> dict:
        with self._lock:
            return {**self.counters, "pending": len(self._pending), "max_pending": self.max_pending}

    def submit(self, tasks: list, config: LabelConfig) -> int:
        """Queue every <Image> of `tasks` that is not embedded or queued yet; returns how many were queued.

        Only string work happens here (no download, no disk), so an HTTP handler can call it and answer at once.
        """
        if not self.enabled or self._closed:
            return 0
        queued = dropped = 0
        for task in tasks:
            if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
                continue
            for image_name in config.images:
                url_value = task["data"].get(config.image_key(image_name))
                if not isinstance(url_value, str):
                    continue
                try:
                    key = self.image_key(task, url_value)
                except ValueError as exc:  # BadRequest: a reference the fetcher would refuse
                    log.warning("pre-encoding task %s: %s", task.get("id"), exc)
                    with self._lock:
                        self.counters["failed"] += 1
                    continue
                with self._lock:
                    if key in self._pending:
                        continue
                    try:
                        self._queue.put_nowait(_Job(key, task, url_value))
                    except queue.Full:
                        self.counters["dropped"] += 1
                        dropped += 1
                        continue
                    self._pending.add(key)
                    self.counters["queued"] += 1
                    queued += 1
        if dropped:
            log.warning("pre-encoding queue full (TINYSAM_PREENCODE_QUEUE=%d): %d image(s) not queued; their "
                        "first click encodes them", self.max_pending, dropped)
        if queued:
            self._start()
        return queued

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="tinysam-preencode", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            try:
                encoded = self.store_embedding(job.task, job.url_value)
                outcome = "encoded" if encoded else "already_embedded"
            except Exception as exc:  # noqa: BLE001 - one bad image must not stop the worker
                log.warning("pre-encoding task %s (%s): %s", job.task.get("id"), job.url_value[:200], exc)
                outcome = "failed"
            with self._lock:
                self.counters[outcome] += 1
                self._pending.discard(job.key)

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking work; the worker ends after the image in progress (queued images are forgotten)."""
        self._closed = True
        with self._lock:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
            self._pending.clear()
            thread = self._thread
        if thread is not None and thread.is_alive():
            self._queue.put(None)
            thread.join(timeout)
