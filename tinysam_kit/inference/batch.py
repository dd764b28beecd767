"""Batch pre-annotation: everything mode over many images, image decoding overlapped with inference.

Results go to a *sink*: anything with `done_keys()` and `write(key, result)` (see `Sink`). The single-process
runner (`tinysam everything`) and the Ray pipeline (`tinysam_kit.integrations.ray`) share `CocoFolderSink`,
so both write the same files.
"""

from __future__ import annotations

import io
import json
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from tinysam_kit.data.images import load_image
from tinysam_kit.data.object_store import is_url, relative_key
from tinysam_kit.inference.everything import EverythingGenerator
from tinysam_kit.inference.predictor import ImageEmbedding, TinySamPredictor


@dataclass
class PrelabelResult:
    item: Any  # whatever the caller passed in (a path, a sample id, a task)
    records: list[dict] | None  # None when the image failed
    error: str | None
    height: int = 0
    width: int = 0
    stats: dict | None = None
    model_version: str | None = None


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


def embed_many(predictor: TinySamPredictor, images: Sequence[np.ndarray]) -> list[ImageEmbedding]:
    """Uncached embeddings of RGB uint8 images, encoded in one engine call when the engine has `encode_batch`
    (each embedding equals the one `predictor.embed(image, cache=False)` gives, within float rounding)."""
    prepared = [predictor.preprocess(image) for image in images]
    engine = predictor.engine
    if len(prepared) > 1 and hasattr(engine, "encode_batch"):
        embeddings = engine.encode_batch(torch.cat([tensor for tensor, _ in prepared]))
    else:
        embeddings = [engine.encode(tensor) for tensor, _ in prepared]
    return [ImageEmbedding("uncached", emb, (image.shape[0], image.shape[1]), input_size,
                           engine.embedding_nbytes(emb))
            for image, (_, input_size), emb in zip(images, prepared, embeddings)]


def everything_batch(predictor: TinySamPredictor, generator: EverythingGenerator, items: Sequence[Any],
                     images: Sequence[np.ndarray]) -> list[PrelabelResult]:
    """Everything mode for decoded images encoded together; a failing image gets `error`, the others go on
    (when a batch cannot be encoded, its images are retried one by one)."""
    try:
        states = embed_many(predictor, images)
    except (ValueError, RuntimeError) as exc:
        if len(images) > 1:
            return [r for item, image in zip(items, images)
                    for r in everything_batch(predictor, generator, [item], [image])]
        h, w = images[0].shape[:2]
        return [PrelabelResult(items[0], None, f"{type(exc).__name__}: {exc}", h, w)]
    results = []
    for item, image, state in zip(items, images, states):
        h, w = image.shape[:2]
        try:
            records = generator.generate(image_embedding=state)
        except (ValueError, RuntimeError) as exc:
            results.append(PrelabelResult(item, None, f"{type(exc).__name__}: {exc}", h, w))
            continue
        results.append(PrelabelResult(item, records, None, h, w, dict(generator.stats), predictor.model_version))
    return results


def run_everything(predictor: TinySamPredictor, items: Iterable[Any], *, mode: str = "hierarchical",
                   load: Callable[[Any], np.ndarray] = load_image, prefetch: int = 2, batch_size: int = 1,
                   **params) -> Iterator[PrelabelResult]:
    """Everything mode for each item; a bad image yields a result with `error` set instead of raising.

    `batch_size` images are encoded per engine call (worth it on GPUs; on CPU batch 1 is as fast). Decoding
    runs ahead in a bounded pool (`prefetch` images, at least one batch) and overlaps inference.
    """
    generator = EverythingGenerator(predictor, mode, **params)
    batch_size = max(1, int(batch_size))
    pending: list[tuple[Any, np.ndarray | None, Exception | None]] = []  # results keep the input order

    def flush() -> list[PrelabelResult]:
        good = [(item, image) for item, image, error in pending if error is None]
        done = iter(everything_batch(predictor, generator, [i for i, _ in good], [im for _, im in good])
                    if good else [])
        return [next(done) if error is None else PrelabelResult(item, None, f"{type(error).__name__}: {error}")
                for item, _, error in pending]

    for entry in prefetch_images(items, load, max(prefetch, batch_size)):
        pending.append(entry)
        if sum(error is None for _, _, error in pending) == batch_size or (len(pending) == 1 and entry[2]):
            yield from flush()
            pending = []
    if pending:
        yield from flush()


# ------------------------------------------------------------------------------------------------- sinks
@runtime_checkable
class Sink(Protocol):
    """Where a dataset-wide run puts each image's results. Keys are the caller's per-image identifiers
    (a file's output name, a FiftyOne sample id, a Label Studio task id).

    * `done_keys()` — keys whose results are already stored; a run skips them (resume).
    * `write(key, result)` — store one image's `PrelabelResult` (`records` set, `error` None). It must be atomic
      (a reader never sees half of it) and idempotent (writing the same key twice leaves one copy): a
      distributed run may deliver an image again after a node failure.
    * `close()` — optional; called once when the run ends (e.g. to merge per-image files).
    """

    def done_keys(self) -> set[str]: ...

    def write(self, key: str, result: PrelabelResult) -> None: ...


class BackgroundWriter:
    """Runs a sink's writes in one background thread, so writing image i (JSON, preview) overlaps the
    inference of image i+1. At most `depth` results wait; `close()` waits for them, re-raises the first write
    error, then closes the sink. Order and exactly-once are the sink's: each key is still written once."""

    def __init__(self, sink: Sink, depth: int = 2) -> None:
        import queue
        import threading

        self.sink = sink
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._drain, name="tinysam-writer", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if self._error is None:
                try:
                    self.sink.write(*job)
                except BaseException as exc:  # noqa: BLE001 - handed to the caller in write()/close()
                    self._error = exc

    def done_keys(self) -> set[str]:
        return self.sink.done_keys()

    def write(self, key: str, result: PrelabelResult) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put((key, result))

    def flush(self) -> None:
        """Wait for every queued write; re-raise the first error."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if self._error is not None:
            raise self._error

    def close(self):
        self.flush()
        close = getattr(self.sink, "close", None)
        return close() if close is not None else None


def write_atomic(path: Path, data: bytes) -> None:
    """Write through a temporary file in the same folder and rename it into place: all or nothing."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def overlay(image, masks, alpha: float = 0.5):
    """Image with each mask tinted in its own colour (largest first, so small ones stay visible)."""
    out = image.astype(np.float32)
    pixels = out.reshape(-1, out.shape[-1])
    rng = np.random.default_rng(0)
    # Each mask's pixel indices once: blending touches only those pixels, not the whole image per mask.
    for index in sorted((np.flatnonzero(mask) for mask in masks), key=lambda idx: -len(idx)):
        color = rng.integers(40, 256, size=3).astype(np.float32)
        pixels[index] = pixels[index] * (1 - alpha) + color * alpha
    return out.clip(0, 255).astype(np.uint8)


PREVIEW_PNG_LEVEL = 1  # zlib level of preview PNGs: PIL's default (6) took 3x longer for files within 3 % of the size


CATEGORIES = [{"id": 1, "name": "object", "supercategory": "object"}]


def coco_document(file_name: str, height: int, width: int, records: list[dict], image_id: int = 1,
                  first_annotation_id: int = 1) -> dict:
    annotations = []
    for i, rec in enumerate(records):
        annotations.append({
            "id": first_annotation_id + i, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": rec["segmentation"], "area": rec["area"], "bbox": rec["bbox"],
            "score": rec["predicted_iou"], "predicted_iou": rec["predicted_iou"],
            "stability_score": rec["stability_score"], "point_coords": rec["point_coords"],
        })
    return {
        "images": [{"id": image_id, "file_name": file_name, "height": height, "width": width}],
        "annotations": annotations,
        "categories": list(CATEGORIES),
    }


def merge_coco(paths: list[Path]) -> dict:
    merged = {"images": [], "annotations": [], "categories": list(CATEGORIES)}
    next_ann = 1
    for image_id, path in enumerate(paths, start=1):
        doc = json.loads(path.read_text())
        merged["images"].append({**doc["images"][0], "id": image_id})
        for ann in doc["annotations"]:
            merged["annotations"].append({**ann, "id": next_ann, "image_id": image_id})
            next_ann += 1
    return merged


MERGED_NAME = "annotations.json"


def relative_name(item, root) -> str:
    """An image's path under `root`: a file's under its folder, or an object URL's under its root URL
    (`object_store.relative_key`, '/'-separated); the COCO `file_name`."""
    if is_url(root):
        return relative_key(str(item), root)
    return str(Path(item).relative_to(root))


def coco_key(path: Path | str, root: Path | str) -> str:
    """An image's key in a COCO folder: its path under `root` (a folder, or a root URL for object URLs)
    without suffix, folders joined by `__`."""
    return str(Path(relative_name(path, root)).with_suffix("")).replace(os.sep, "__")


class CocoFolderSink:
    """One COCO JSON per image (`<key>.json`, written last and atomically: its presence means done), an
    optional overlay preview (`<key>_overlay.png`), and on `close()` the merged `annotations.json` in `order`.
    Segmentations are compressed RLE, or COCO polygons (one per connected part, holes filled) when a
    `polygon_tolerance` (pixels) is given.

    `root` turns a result's item (the image path, or object URL under a root URL) into the COCO `file_name`;
    `info` (mode, params) goes into every document with the result's model version and stats. Previews read
    the image again with `load` (which must pickle where the sink travels to worker processes).
    """

    def __init__(self, out_dir: str | os.PathLike, root: str | os.PathLike, *, info: dict | None = None,
                 previews: bool = True, order: Sequence[str] | None = None,
                 polygon_tolerance: float | None = None, load: Callable[[Any], np.ndarray] = load_image) -> None:
        self.out_dir = Path(out_dir)
        self.root = root if is_url(root) else Path(root)
        self.load = load
        self.info = dict(info or {})
        self.polygon_tolerance = polygon_tolerance
        if polygon_tolerance is not None:
            self.info["segmentation"] = {"format": "polygons", "tolerance": polygon_tolerance}
        self.previews = previews
        self.order = list(order) if order is not None else None
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def json_path(self, key: str) -> Path:
        return self.out_dir / f"{key}.json"

    def done_keys(self) -> set[str]:
        return {p.stem for p in self.out_dir.glob("*.json") if p.name != MERGED_NAME}

    def write(self, key: str, result: PrelabelResult) -> None:
        from PIL import Image

        from tinysam_kit.inference.encodings.coco import coco_rle_to_mask
        from tinysam_kit.inference.encodings.polygons import mask_to_parts

        source = result.item if is_url(result.item) else Path(result.item)
        records = result.records
        if self.polygon_tolerance is not None:
            records = [{**r, "segmentation": mask_to_parts(coco_rle_to_mask(r["segmentation"]),
                                                           tolerance=self.polygon_tolerance)} for r in records]
        doc = coco_document(relative_name(source, self.root), result.height, result.width, records)
        doc["info"] = {"model_version": result.model_version, **self.info, "stats": result.stats}
        target = self.json_path(key)
        if self.previews:
            masks = [coco_rle_to_mask(r["segmentation"]) for r in result.records]
            buffer = io.BytesIO()
            Image.fromarray(overlay(self.load(source), masks)).save(buffer, format="PNG",
                                                                    compress_level=PREVIEW_PNG_LEVEL)
            write_atomic(target.with_name(target.stem + "_overlay.png"), buffer.getvalue())
        # The JSON is written last: its presence marks the image as done for resumed runs.
        write_atomic(target, json.dumps(doc).encode())

    def close(self) -> dict:
        """Merge the per-image documents (in `order`, else by key) into `annotations.json`; returns it."""
        done = self.done_keys()
        keys = [k for k in self.order if k in done] if self.order is not None else sorted(done)
        merged = merge_coco([self.json_path(k) for k in keys])
        write_atomic(self.out_dir / MERGED_NAME, json.dumps(merged).encode())
        return merged


# ------------------------------------------------------------------------------- several processes, one machine
@dataclass
class ImageOutcome:
    """What became of one image of a multi-process run: done (`error` None; written by a worker's sink, or,
    for a run without one, `result` holds it), failed (unreadable image, model error) or lost (its worker
    process died before finishing it)."""

    index: int  # position in the caller's job list
    key: str
    item: Any
    error: str | None
    masks: int = 0
    lost: bool = False
    result: PrelabelResult | None = None  # runs without a worker sink: the image's result, for the caller to store


class WorkerError(RuntimeError):
    """A worker process failed as a whole (model could not load, a sink write raised): the run stops."""


MIN_IMAGES_PER_WORKER = 8  # `auto_workers`: below this many images per extra process, start-up costs more
WORKER_MEMORY_BYTES = 1 << 30  # `auto_workers`: one worker per GiB available (official TinySAM peaks at ~0.8 GiB)


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def available_memory() -> int | None:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def auto_workers(images: int, *, device: str = "cpu", threads: int | None = None, cores: int | None = None,
                 memory: int | None = None) -> int:
    """`--workers auto`: one process per `threads` usable cores (default one thread each) on CPU, no more than
    one per MIN_IMAGES_PER_WORKER images and one per WORKER_MEMORY_BYTES of available memory; one process on a
    GPU (it batches) or for small folders."""
    if device != "cpu":
        return 1
    cores = usable_cores() if cores is None else cores
    memory = available_memory() if memory is None else memory
    by_memory = memory // WORKER_MEMORY_BYTES if memory else cores
    return max(1, min(cores // max(1, int(threads or 1)), images // MIN_IMAGES_PER_WORKER, by_memory))


def resolve_workers(workers: int | str, images: int, *, device: str = "cpu", threads: int | None = None) -> int:
    """Model processes for `images` images to do: `workers` as given (at most one per image), or `auto_workers`'
    choice for 'auto' on `device` ("cpu", "cuda", "cuda:1", ...); one for fewer than two images."""
    if images < 2:
        return 1
    if workers == "auto":
        return auto_workers(images, device=str(device).split(":")[0], threads=threads)
    return max(1, min(int(workers), images))


def worker_threads(threads: int | None, workers: int) -> int:
    """PyTorch threads per model process: `threads` when given, else the process's share of the usable cores."""
    return int(threads) if threads else max(1, usable_cores() // max(1, workers))


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        import signal

        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit code {exitcode}"


def _worker_main(conn, options, sink: Sink, mode: str, load, prefetch: int, batch_size: int, params: dict) -> None:
    """One worker process: load the model once, then run everything mode on the tasks (index, key, item) the
    parent sends (None: no more), writing each image through `sink` and telling the parent what became of it."""
    import traceback

    try:
        predictor = TinySamPredictor.from_options(options)
        taken: deque = deque()  # (index, key) in the order run_everything returns results

        def tasks() -> Iterator[Any]:
            while True:
                task = conn.recv()
                if task is None:
                    return
                index, key, item = task
                taken.append((index, key))
                yield item

        for res in run_everything(predictor, tasks(), mode=mode, load=load, prefetch=prefetch,
                                  batch_size=batch_size, **params):
            index, key = taken.popleft()
            if res.error is not None:
                conn.send(("failed", index, res.error))
                continue
            if sink is None:
                conn.send(("result", index, res))
            else:
                sink.write(key, res)
                conn.send(("done", index, len(res.records)))
        conn.send(("exit",))
    except (EOFError, BrokenPipeError, KeyboardInterrupt):  # the parent is gone or stopping us
        return
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which stops the run
        import pickle

        try:
            pickle.loads(pickle.dumps(exc))  # the parent re-raises it when it travels
        except Exception:  # noqa: BLE001 - any exception type may fail to pickle; the text still goes
            exc = None
        try:
            conn.send(("fatal", traceback.format_exc(), exc))
        except (OSError, ValueError):
            pass
        raise SystemExit(1) from None


def run_everything_workers(options, jobs: Sequence[tuple[str, Any]], sink: Sink | None, *, workers: int,
                           mode: str = "hierarchical", load: Callable[[Any], np.ndarray] = load_image,
                           prefetch: int = 2, batch_size: int = 1, **params) -> Iterator[ImageOutcome]:
    """Everything mode over `jobs` ((key, item) pairs) in `workers` processes (spawned), each loading the model
    of `options` (an `EngineOptions`; its `threads` per process) once and writing its images through its own
    copy of `sink` (which must pickle, and whose writes are atomic and per key, like `CocoFolderSink`'s). With
    `sink=None` the workers write nothing: each outcome carries the image's `result` and the caller stores it
    (one writer, e.g. a database).

    Yields one `ImageOutcome` per job as images finish (not in job order). The parent only hands out work:
    each worker holds a few images at a time (enough to keep its decode prefetch busy), so the load balances.
    A worker that dies (killed, out of memory) loses only the images it held: they come back with `lost` set
    and an error saying so (the sink never saw half of them: a re-run with resume does them), and the other
    workers take the rest. A worker that fails as a whole (model load, a sink write raising) stops the run
    with `WorkerError`, caused by the worker's exception (`__cause__`) when it pickles. The caller
    merges/closes the sink. With `workers=1` prefer `run_everything` in-process
    (no start-up cost).
    """
    import multiprocessing as mp
    from multiprocessing.connection import wait

    todo = deque(enumerate(jobs))
    if not todo:
        return
    ctx = mp.get_context("spawn")  # never fork a process that holds torch's thread pools
    hold = max(prefetch, batch_size) + batch_size  # what run_everything reads ahead before its first result
    procs, conns, held = [], [], []
    try:
        for w in range(max(1, min(int(workers), len(todo)))):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"tinysam-worker-{w}", daemon=True,
                               args=(child, options, sink, mode, load, prefetch, batch_size, params))
            proc.start()
            child.close()
            procs.append(proc)
            conns.append(parent)
            held.append({})

        def top_up(w: int) -> None:
            try:
                while len(held[w]) < hold and todo:
                    index, (key, item) = todo[0]
                    conns[w].send((index, key, item))
                    held[w][index] = todo.popleft()[1]
                if not todo:
                    conns[w].send(None)
            except OSError:  # it died: its sentinel says so next
                pass

        live = set(range(len(procs)))
        stopped = set()  # workers told there is no more work
        for w in live:
            top_up(w)
            if not todo:
                stopped.add(w)

        def handle(w: int, msg: tuple) -> Iterator[ImageOutcome]:
            kind = msg[0]
            if kind == "fatal":
                raise WorkerError(f"worker process {w} (pid {procs[w].pid}) failed:\n{msg[1]}") from msg[2]
            if kind in ("done", "failed", "result"):
                index = msg[1]
                key, item = held[w].pop(index)
                if kind == "done":
                    yield ImageOutcome(index, key, item, None, msg[2])
                elif kind == "result":
                    yield ImageOutcome(index, key, item, None, len(msg[2].records), result=msg[2])
                else:
                    yield ImageOutcome(index, key, item, msg[2])
                if w not in stopped:
                    top_up(w)
                    if not todo:
                        stopped.add(w)

        while live:
            by_conn = {conns[w]: w for w in live}
            by_sentinel = {procs[w].sentinel: w for w in live}
            ready = wait(list(by_conn) + list(by_sentinel))
            dead = set()
            for obj in ready:
                if obj in by_conn:
                    w = by_conn[obj]
                    try:
                        msg = obj.recv()
                    except (EOFError, OSError):
                        dead.add(w)
                        continue
                    if msg[0] == "exit":
                        dead.add(w)
                    yield from handle(w, msg)
                else:
                    dead.add(by_sentinel[obj])
            for w in dead:
                while True:  # what it said before it went
                    try:
                        if not conns[w].poll():
                            break
                        msg = conns[w].recv()
                    except (EOFError, OSError):
                        break
                    yield from handle(w, msg)
                procs[w].join(timeout=30)
                live.discard(w)
                if held[w]:
                    done = sink.done_keys() if sink is not None else set()  # written, not yet said
                    why = (f"lost: worker process {w} (pid {procs[w].pid}) died "
                           f"({_signal_name(procs[w].exitcode)}) before finishing it; run again to complete it")
                    for index, (key, item) in sorted(held[w].items()):
                        yield (ImageOutcome(index, key, item, None) if key in done
                               else ImageOutcome(index, key, item, why, lost=True))
                    held[w].clear()
                if todo and live:  # its share goes to the others
                    for other in live - stopped:
                        top_up(other)
                        if not todo:
                            stopped.add(other)
        while todo:  # every worker died
            index, (key, item) = todo.popleft()
            yield ImageOutcome(index, key, item, "lost: not started, every worker process died; run again to "
                                                 "complete it", lost=True)
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(timeout=30)
        for conn in conns:
            conn.close()
