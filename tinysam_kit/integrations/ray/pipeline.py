"""The Ray Data pipeline behind `tinysam everything --ray`: decode actors → model actors → the driver's sink."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field

import numpy as np

from tinysam_kit.data.images import load_image
from tinysam_kit.inference.batch import BackgroundWriter, PrelabelResult, Sink, everything_batch
from tinysam_kit.inference.policy import EngineOptions
from tinysam_kit.integrations.ray.decode import RowDecoder

RAY_VERSION = "2.60.0"  # the release the tests run against (pyproject's `ray` extra pins it)
# Input rows per Ray Data block: small blocks keep the work lost with a dead node small.
MAX_BLOCKS = 10_000


class RayUnavailableError(RuntimeError):
    """Ray is not installed, or no cluster answers at the address given."""


class RayRunError(RuntimeError):
    """The cluster failed the run; what was written stays written and a re-run finishes the rest."""


def require_ray():
    """The `ray` module, or a one-line error saying how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401 - the pipeline needs Ray Data, not only Ray Core
    except ImportError as exc:
        raise RayUnavailableError(
            f"--ray needs Ray Data: pip install 'tinysam-kit[ray]' (ray[data]=={RAY_VERSION})") from exc
    return ray


@dataclass
class Failure:
    key: str
    source: str
    reason: str


@dataclass
class RaySummary:
    total: int
    skipped: int = 0
    written: int = 0
    masks: int = 0
    duplicates: int = 0  # deliveries of an already written image (after a node failure), ignored
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    actors: int = 0

    def describe(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        text = (f"ray: {self.written} image(s) done, {self.masks} mask(s), {len(self.failures)} failed, "
                f"{self.skipped} already done; {self.seconds:.1f} s ({rate:.2f} images/s, up to {self.actors} "
                "model actor(s))")
        if self.duplicates:
            text += f"; {self.duplicates} repeated delivery(ies) after node failures ignored"
        return text


# ------------------------------------------------------------------------------------- cluster side
class EverythingActor:
    """One model per actor, loaded once; each call runs everything mode on a batch of decoded images (the
    batch is encoded in one engine call)."""

    def __init__(self, options: dict, mode: str, params: dict) -> None:
        from tinysam_kit.inference.everything import EverythingGenerator
        from tinysam_kit.inference.predictor import TinySamPredictor

        self.predictor = TinySamPredictor.from_options(EngineOptions(**options))
        self.generator = EverythingGenerator(self.predictor, mode, **params)

    def __call__(self, batch: dict) -> dict:
        rows = list(zip(batch["key"], batch["source"], batch["pixels"], batch["height"], batch["width"],
                        batch["error"]))
        good = [r for r in rows if not r[5]]
        images = [np.frombuffer(r[2], np.uint8).reshape(int(r[3]), int(r[4]), 3) for r in good]
        results = {str(r[0]): res for r, res in zip(good, everything_batch(
            self.predictor, self.generator, [str(r[1]) for r in good], images))} if good else {}
        out = {"key": [], "source": [], "records": [], "error": [], "height": [], "width": [], "stats": [],
               "model_version": []}
        for key, source, _, height, width, error in rows:
            res = results.get(str(key))
            out["key"].append(str(key))
            out["source"].append(str(source))
            out["error"].append(str(error) if error else (res.error or ""))
            out["records"].append(json.dumps(res.records) if res is not None and res.records is not None else "")
            out["stats"].append(json.dumps(res.stats) if res is not None and res.stats is not None else "")
            out["height"].append(int(height))
            out["width"].append(int(width))
            out["model_version"].append((res.model_version or "") if res is not None else "")
        return out


# ------------------------------------------------------------------------------------------ driver side
def connect(address: str) -> None:
    """Join the cluster at `address` ('auto', HOST:PORT or ray://HOST:PORT) unless already connected."""
    ray = require_ray()
    if ray.is_initialized():
        return
    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except ConnectionError as exc:
        raise RayUnavailableError(f"no Ray cluster at {address!r}: {exc}") from exc


def actor_resources(options: EngineOptions) -> tuple[dict, int, EngineOptions]:
    """Per-actor resources, how many such actors the cluster holds now, and the engine options each actor
    uses: one GPU per actor where the cluster has GPUs (and the device allows), else `options.threads` CPUs
    (default 1)."""
    import ray

    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus and not options.device.startswith("cpu"):
        return {"num_gpus": 1, "num_cpus": 1}, gpus, options
    threads = int(options.threads or 1)
    options = EngineOptions(options.model, options.engine, options.precision,
                            "cpu" if options.device == "auto" else options.device, threads)
    return {"num_cpus": threads}, max(1, int(resources.get("CPU", 1)) // threads), options


def iter_everything_on_ray(items: Mapping[str, str] | Iterable[tuple[str, str]], *, address: str = "auto",
                           options: EngineOptions | None = None, mode: str = "hierarchical",
                           params: dict | None = None, batch_size: int = 1, max_actors: int | None = None,
                           min_actors: int | None = None, output_mode: str = "coco_rle",
                           load: Callable[[str], np.ndarray] | None = None,
                           summary: RaySummary | None = None) -> Iterator[tuple[str, PrelabelResult]]:
    """Everything mode for `items` (key → source readable by every node) on the cluster at `address`.

    Yields `(key, PrelabelResult)` in completion order, each key once (`result.error` set for an unreadable
    image). `params` are everything-mode parameters (`policy.everything_params`); `batch_size` images per
    encoder call. The actor pool starts with `min_actors` (default: as many as the cluster holds now) and
    scales up to `max_actors` (default the same) as an autoscaling cluster adds nodes.

    `load(source)` reads one image as RGB uint8 on a cluster node (default: `load_image`, a path or URL
    every node can read). It is pickled to the nodes with what it holds (e.g. a Label Studio token), and
    signals an unreadable image with OSError or ValueError. Records are `output_mode` "coco_rle" (compact,
    JSON-safe) or "uncompressed_rle" (`encodings.coco.with_binary_masks` turns either into arrays).
    """
    if output_mode not in ("coco_rle", "uncompressed_rle"):
        raise ValueError(f"output_mode must be 'coco_rle' or 'uncompressed_rle' on Ray (records travel as JSON), "
                         f"got {output_mode!r}")
    ray = require_ray()
    items = list(items.items() if isinstance(items, Mapping) else items)
    summary = summary if summary is not None else RaySummary(len(items))
    if not items:
        return
    connect(address)
    options = options or EngineOptions()
    resources, fits_now, actor_options = actor_resources(options)
    pool_max = max(1, min(max_actors or fits_now, len(items)))
    pool_min = max(1, min(min_actors or fits_now, pool_max))
    summary.actors = pool_max
    ds = ray.data.from_items([{"key": k, "source": s} for k, s in items],
                             override_num_blocks=min(len(items), MAX_BLOCKS))
    # Decoding needs no reserved CPU: it is short, and a CPU reserved for it would idle between images.
    decoded = ds.map_batches(RowDecoder, fn_constructor_kwargs={"load": load or load_image}, batch_size=1,
                             num_cpus=0, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=2 * pool_max))
    results = decoded.map_batches(
        EverythingActor, batch_size=max(1, int(batch_size)),
        compute=ray.data.ActorPoolStrategy(min_size=pool_min, max_size=pool_max),
        fn_constructor_kwargs={"options": asdict(actor_options), "mode": mode,
                               "params": {**(params or {}), "output_mode": output_mode}},
        **resources)
    seen: set[str] = set()
    try:
        for row in results.iter_rows():
            key = str(row["key"])
            if key in seen:
                summary.duplicates += 1
                continue
            seen.add(key)
            records = json.loads(row["records"]) if row["records"] else None
            stats = json.loads(row["stats"]) if row["stats"] else None
            yield key, PrelabelResult(str(row["source"]), records, row["error"] or None, int(row["height"]),
                                      int(row["width"]), stats, row["model_version"] or None)
    except ray.exceptions.RayError as exc:
        raise RayRunError(f"the Ray run failed after {len(seen)} of {len(items)} image(s) ({exc}); finished "
                          "images are kept, run again to do the rest") from exc


def run_everything_on_ray(items: Mapping[str, str] | Iterable[tuple[str, str]], sink: Sink, *,
                          address: str = "auto", overwrite: bool = False, progress: bool = True,
                          **pipeline) -> RaySummary:
    """Everything mode for every item not yet in `sink` (all of them with `overwrite`), written to `sink` as
    each image finishes. Returns the summary (done, masks, failures with reasons). See the module docstring
    for the sink protocol; `pipeline` takes `iter_everything_on_ray`'s options."""
    from tqdm import tqdm

    require_ray()
    items = list(items.items() if isinstance(items, Mapping) else items)
    done = set() if overwrite else sink.done_keys()
    todo = [(k, s) for k, s in items if k not in done]
    summary = RaySummary(len(items), skipped=len(items) - len(todo))
    if todo:
        connect(address)
    start = time.perf_counter()
    bar = tqdm(total=len(todo), unit="img", desc="everything (ray)", disable=not progress or not todo,
               file=sys.stderr)
    writer = BackgroundWriter(sink)  # the driver writes image i while the next ones arrive
    try:
        for key, result in iter_everything_on_ray(todo, address=address, summary=summary, **pipeline):
            if result.error is not None:
                summary.failures.append(Failure(key, str(result.item), result.error))
                bar.write(f"skipped {result.item}: {result.error}", file=sys.stderr)
            else:
                writer.write(key, result)
                summary.written += 1
                summary.masks += len(result.records)
            bar.update(1)
            bar.set_postfix(masks=summary.masks, failed=len(summary.failures), refresh=False)
    finally:
        writer.flush()
        bar.close()
        summary.seconds = time.perf_counter() - start
    return summary
