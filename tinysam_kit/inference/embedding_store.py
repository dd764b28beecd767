"""Image embeddings on disk, so that a first click on an image is as fast as the later ones.

* fp16 files, one per (model identity, image key), in `<root>/<model>/<ab>/<key>.npz` (no pickles);
* bounded in bytes: the least recently used files are deleted first (a read refreshes a file's time);
* crash-safe: a file is written under a temporary name and renamed into place, so readers see whole files
  or none; a file that cannot be read is treated as absent and removed;
* safe for several processes: writers never share a temporary file, and eviction holds an exclusive lock on
  `<root>/.lock` while it deletes.

Stored embeddings are rounded to fp16: masks from them can differ from the fp32 embedding's at a few boundary
pixels. The predictor uses a store only when given one (`TinySamPredictor(..., store=...)`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

DEFAULT_MAX_BYTES = 4 * 1024**3
SUFFIX = ".npz"


@dataclass
class StoredEmbedding:
    embedding: np.ndarray  # float16, the engine's embedding layout
    original_size: tuple[int, int]
    input_size: tuple[int, int]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:120]


class EmbeddingStore:
    """Persistent LRU of image embeddings bounded in bytes; see the module docstring for the guarantees."""

    def __init__(self, root: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root).expanduser()
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self._lock = threading.Lock()
        self._bytes = self._scan_bytes()
        self.hits = 0
        self.misses = 0

    # ------------------------------------------------------------------ paths
    def path(self, model: str, key: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.root / _safe(model) / digest[:2] / f"{digest}{SUFFIX}"

    def _files(self):
        for path in self.root.glob(f"*/*/*{SUFFIX}"):
            try:
                yield path, path.stat()
            except FileNotFoundError:  # evicted by another process meanwhile
                continue

    def _scan_bytes(self) -> int:
        return sum(st.st_size for _, st in self._files())

    # --------------------------------------------------------------- reading
    def get(self, model: str, key: str) -> StoredEmbedding | None:
        path = self.path(model, key)
        try:
            with np.load(path, allow_pickle=False) as data:
                item = StoredEmbedding(np.array(data["embedding"]), tuple(int(v) for v in data["original_size"]),
                                       tuple(int(v) for v in data["input_size"]))
        except FileNotFoundError:
            self.misses += 1
            return None
        except (OSError, ValueError, KeyError):  # unreadable: never trust it, never keep it
            with contextlib.suppress(OSError):
                path.unlink()
            self.misses += 1
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # most recently used
        self.hits += 1
        return item

    def __contains__(self, model_key: tuple[str, str]) -> bool:
        return self.path(*model_key).is_file()

    # --------------------------------------------------------------- writing
    def put(self, model: str, key: str, embedding: np.ndarray, original_size: tuple[int, int],
            input_size: tuple[int, int]) -> Path:
        path = self.path(model, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, embedding=np.asarray(embedding, dtype=np.float16),
                         original_size=np.asarray(original_size, dtype=np.int64),
                         input_size=np.asarray(input_size, dtype=np.int64))
                fh.flush()
                os.fsync(fh.fileno())
            size = tmp.stat().st_size
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        with self._lock:
            self._bytes += size
            over = self._bytes > self.max_bytes
        if over:
            self.evict()
        return path

    def evict(self) -> int:
        """Delete least recently used files until the store fits its bound; returns the bytes freed."""
        with self._exclusive():
            files = sorted(self._files(), key=lambda item: item[1].st_mtime_ns)
            total = sum(st.st_size for _, st in files)
            freed = 0
            for path, st in files:
                if total - freed <= self.max_bytes:
                    break
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += st.st_size
            with self._lock:
                self._bytes = total - freed
        return freed

    @contextlib.contextmanager
    def _exclusive(self):
        with open(self.root / ".lock", "a+") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return sum(1 for _ in self._files())
