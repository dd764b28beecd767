"""The persistent embedding store: bounded LRU on disk, crash-safe, shared by processes, used by the predictor."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tinysam_kit.inference.embedding_store import EmbeddingStore
from tinysam_kit.inference.predictor import TinySamPredictor


def _array(seed: int, shape=(1, 8, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_round_trip_is_fp16_and_keyed_by_model_and_key(tmp_path):
    store = EmbeddingStore(tmp_path, max_bytes=10**7)
    emb = _array(0)
    store.put("model-a", "content:abc", emb, (480, 640), (768, 1024))
    got = store.get("model-a", "content:abc")
    assert got.embedding.dtype == np.float16 and got.original_size == (480, 640) and got.input_size == (768, 1024)
    assert np.allclose(got.embedding.astype(np.float32), emb, atol=2e-3, rtol=1e-3)
    assert store.get("model-b", "content:abc") is None  # another model's embeddings never answer
    assert store.get("model-a", "content:other") is None


def test_bounded_in_bytes_least_recently_used_first(tmp_path):
    one = EmbeddingStore(tmp_path / "probe", max_bytes=10**9)
    size = one.put("m", "k", _array(0), (1, 1), (1, 1)).stat().st_size
    store = EmbeddingStore(tmp_path / "s", max_bytes=int(size * 3.5))
    for i in range(3):
        store.put("m", f"k{i}", _array(i), (1, 1), (1, 1))
        time.sleep(0.01)
    assert store.get("m", "k0") is not None  # k0 becomes the most recently used
    time.sleep(0.01)
    store.put("m", "k3", _array(3), (1, 1), (1, 1))
    assert store.get("m", "k1") is None  # the least recently used went first
    assert all(store.get("m", k) is not None for k in ("k0", "k2", "k3"))
    assert store.nbytes <= store.max_bytes and len(store) == 3


def test_unreadable_file_is_a_miss_and_removed(tmp_path):
    store = EmbeddingStore(tmp_path)
    path = store.put("m", "k", _array(0), (2, 3), (4, 5))
    path.write_bytes(b"not an npz file")
    assert store.get("m", "k") is None
    assert not path.exists()


def _writer(root: str, worker: int, count: int) -> None:
    store = EmbeddingStore(root, max_bytes=60_000)
    for i in range(count):
        store.put("m", f"w{worker}-{i}", _array(worker * 1000 + i), (1, 1), (1, 1))
        store.get("m", f"w{(worker + 1) % 3}-{i}")


def test_several_processes_share_one_store_within_its_bound(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path), w, 30)) for w in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = EmbeddingStore(tmp_path, max_bytes=60_000)
    files = list(tmp_path.glob("*/*/*.npz"))
    assert files and store.nbytes <= 60_000 + max(f.stat().st_size for f in files)
    for f in files:  # every file that is there is whole
        with np.load(f, allow_pickle=False) as data:
            assert data["embedding"].shape == (1, 8, 16, 16)
    assert not list(tmp_path.glob("*/*/.*.tmp"))


def test_a_writer_killed_mid_write_leaves_no_partial_file(tmp_path):
    code = (
        "import numpy as np, sys\n"
        "from tinysam_kit.inference.embedding_store import EmbeddingStore\n"
        "s = EmbeddingStore(sys.argv[1], max_bytes=10**10)\n"
        "i = 0\n"
        "while True:\n"
        "    s.put('m', f'k{i}', np.ones((1, 256, 64, 64), np.float32), (1, 1), (1, 1)); i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)])
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("*/*/*.npz"))) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    store = EmbeddingStore(tmp_path)
    keys = [f"k{i}" for i in range(len(list(tmp_path.glob("*/*/*.npz"))) + 1)]
    found = [store.get("m", k) for k in keys]
    assert sum(item is not None for item in found) >= 3
    assert all(item is None or item.embedding.shape == (1, 256, 64, 64) for item in found)


@pytest.fixture(scope="module")
def demo_engine_predictor():
    return TinySamPredictor.from_pretrained("demo", device="cpu")


def test_predictor_answers_from_the_store_in_a_new_process_without_encoding(tmp_path, demo_engine_predictor):
    image = (np.random.default_rng(1).random((120, 160, 3)) * 255).astype(np.uint8)
    first = TinySamPredictor(demo_engine_predictor.engine, store=EmbeddingStore(tmp_path))
    first.embed(image, key="task-7")
    mask_a, score_a, _ = first.segment([[80, 60]], [1], image_embedding=first.embed(image, key="task-7"))

    # A fresh predictor (empty memory cache) over the same store: no encoder call, the same answer.
    second = TinySamPredictor(demo_engine_predictor.engine, store=EmbeddingStore(tmp_path))
    calls = []
    original = second.engine.encode
    second.engine.encode = lambda x: calls.append(1) or original(x)
    try:
        assert second.has_embedding(key="task-7") and not second.has_embedding(key="task-8")
        state = second.cached("task-7")
        assert state is not None and state.original_size == (120, 160)
        mask_b, score_b, _ = second.segment([[80, 60]], [1], image_embedding=state)
        by_content = second.embed(image)  # keyed by content: encoded once, stored, then served
        again = TinySamPredictor(demo_engine_predictor.engine, store=EmbeddingStore(tmp_path)).embed(image)
    finally:
        second.engine.encode = original
    assert calls == [1]
    assert by_content.original_size == again.original_size
    assert abs(score_a - score_b) < 1e-2
    agreement = (mask_a & mask_b).sum() / max((mask_a | mask_b).sum(), 1)
    assert agreement > 0.98
