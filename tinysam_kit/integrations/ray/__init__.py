"""Dataset-wide everything mode on a Ray cluster (optional extra: `pip install 'tinysam-kit[ray]'`).

    from tinysam_kit.inference.batch import CocoFolderSink
    from tinysam_kit.inference.policy import EngineOptions
    from tinysam_kit.integrations.ray import run_everything_on_ray

    sink = CocoFolderSink("out", root="images", order=list(items))
    summary = run_everything_on_ray(items, sink, address="auto", options=EngineOptions(model="tinysam"))
    sink.close()  # the merged annotations.json

`items` maps each image's key to where every node can read it: a path on a shared filesystem, or an
object URL read with `load=ObjectLoader(storage_options)` (`tinysam_kit.data.object_store`). The pipeline
is Ray Data: a pool of light actors (no CPU reserved, no PyTorch) reads and decodes the images, an
autoscaling pool of actors with one model each (`num_gpus=1` per actor where the cluster has GPUs, otherwise
`--threads` CPUs each) runs everything mode, and the driver hands each finished image to the sink.
`iter_everything_on_ray` yields `(key, result)` pairs instead, for callers that store results themselves.

The sink protocol (`tinysam_kit.inference.batch.Sink`), which FiftyOne, Label Studio or any other store
implements:

* `done_keys() -> set[str]` — keys already stored. They are skipped: re-running a run resumes it.
* `write(key, result)` — store one image's `PrelabelResult` (`records`, `height`, `width`, `stats`,
  `model_version`; `item` is the image's source). Atomic (never half-written) and idempotent (the same key
  twice leaves one copy). Called in the driver process only, once per key per run.
* `close()` — optional; the caller calls it when it wants the run finalised (`CocoFolderSink` merges
  `annotations.json`).

Exactly once: results are keyed per image and written by the driver as they arrive. When a node dies, Ray
restarts its actors elsewhere and re-runs the lost work; an image delivered a second time is ignored. If the
run fails outright, every image written so far stays written, and a re-run does only the rest.
Unreadable images are reported in the summary with their reason; the run goes on.
"""

import importlib

_PUBLIC = {
    "CocoFolderSink": "tinysam_kit.inference.batch",
    "PrelabelResult": "tinysam_kit.inference.batch",
    "Sink": "tinysam_kit.inference.batch",
    "Failure": "tinysam_kit.integrations.ray.pipeline",
    "RayRunError": "tinysam_kit.integrations.ray.pipeline",
    "RaySummary": "tinysam_kit.integrations.ray.pipeline",
    "RayUnavailableError": "tinysam_kit.integrations.ray.pipeline",
    "iter_everything_on_ray": "tinysam_kit.integrations.ray.pipeline",
    "require_ray": "tinysam_kit.integrations.ray.pipeline",
    "run_everything_on_ray": "tinysam_kit.integrations.ray.pipeline",
}


def __getattr__(name: str):
    # imported on first use: the decode actors' module (`decode`) stays free of PyTorch
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_PUBLIC)
