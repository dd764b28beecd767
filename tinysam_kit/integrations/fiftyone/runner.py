"""Dataset-wide TinySAM runs on FiftyOne collections: resumable, idempotent, recorded.

* Resumable: a sample counts as done once its output field is set; re-running the same run skips it.
* No partial samples: every sample's result is one document update (masks on disk are written first, the
  optional instance map before the output field, so the output field is the completion marker).
* Recorded: a FiftyOne run (`dataset.get_run_info("tinysam_<field>")`) holds model, model version,
  precision and parameters; its results hold the status, counts and per-sample errors.
* Throughput: images are decoded by a small thread pool a bounded number of samples ahead of inference,
  and results are written in batches.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

from tinysam_kit.data.images import load_image
from tinysam_kit.inference.batch import prefetch_images
from tinysam_kit.inference.predictor import PromptError, TinySamPredictor
from tinysam_kit.integrations.fiftyone import labels as L

TASKS = ("everything", "prompts")
EVERYTHING_PARAMS = ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                     "min_mask_region_area", "max_masks")
RESERVED_FIELDS = {"id", "filepath", "tags", "metadata", "created_at", "last_modified_at", "media_type"}
FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RUN_KEY_PREFIX = "tinysam_"


class RunError(ValueError):
    """The run cannot start as asked; the message says what to change."""


@dataclass
class RunSpec:
    """What to compute and where to write it."""

    task: str  # "everything" | "prompts"
    label_field: str
    model: str = "auto"
    engine: str = "torch"
    precision: str = "fp32"
    device: str = "auto"
    # everything mode
    mode: str = "hierarchical"
    everything: dict = field(default_factory=dict)
    label: str = "object"
    # prompts
    box_field: str | None = None
    point_field: str | None = None
    point_label_attribute: str | None = None
    # output
    instance_map_field: str | None = None
    mask_dir: str | None = None  # masks as PNG files under <mask_dir>/<label_field>/<sample id>/
    overwrite: bool = False
    # throughput
    write_batch: int = 16
    prefetch: int = 4
    decode_workers: int = 2

    def signature(self, model_version: str) -> dict:
        """What makes two runs produce the same field (a run with another signature is another run)."""
        sig = {"task": self.task, "model_version": model_version, "instance_map_field": self.instance_map_field,
               "masks_on_disk": bool(self.mask_dir)}
        if self.task == "everything":
            sig.update(mode=self.mode, label=self.label, everything=dict(sorted(self.everything.items())))
        else:
            sig.update(box_field=self.box_field, point_field=self.point_field,
                       point_label_attribute=self.point_label_attribute)
        return sig


@dataclass
class RunSummary:
    label_field: str
    run_key: str
    status: str = "running"
    total: int = 0  # samples in the target view
    processed: int = 0  # samples written by this invocation
    already_done: int = 0  # skipped because a previous invocation wrote them
    masks: int = 0
    without_prompts: int = 0
    errors: list[dict] = field(default_factory=list)  # {"sample_id", "filepath", "error"}
    seconds: float = 0.0

    @property
    def images_per_minute(self) -> float:
        return 60.0 * self.processed / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["images_per_minute"] = round(self.images_per_minute, 2)
        d["failed"] = len(self.errors)
        return d

    def message(self) -> str:
        parts = [f"{self.processed} sample(s) segmented into '{self.label_field}' ({self.masks} masks)"]
        if self.already_done:
            parts.append(f"{self.already_done} already done")
        if self.without_prompts:
            parts.append(f"{self.without_prompts} without prompts")
        if self.errors:
            first = self.errors[0]
            parts.append(f"{len(self.errors)} failed (e.g. {first['error']})")
        return "; ".join(parts)


ProgressFn = Callable[[int, int, str], None]


# ---------------------------------------------------------------------------------------- checks
def check_image_collection(samples) -> None:
    media = samples.media_type
    if media != "image":
        raise RunError(f"TinySAM segments images, but the target samples have media type {media!r}; "
                       "select an image-only dataset or view")


def check_field_name(name: str, what: str) -> None:
    if not name or not FIELD_NAME.match(name) or name in RESERVED_FIELDS:
        raise RunError(f"{what} {name!r} is not a usable field name (letters, digits and underscores, "
                       "starting with a letter, not a built-in field)")


def field_type_name(schema, name) -> str | None:
    f = schema.get(name)
    if f is None:
        return None
    doc = getattr(f, "document_type", None)
    return doc.__name__ if doc is not None else type(f).__name__


def run_key_for(label_field: str) -> str:
    return RUN_KEY_PREFIX + label_field


def validate_spec(samples, spec: RunSpec) -> None:
    """Every check that can fail before any model is loaded or anything is written."""
    if spec.task not in TASKS:
        raise RunError(f"task must be one of {', '.join(TASKS)}, got {spec.task!r}")
    check_image_collection(samples)
    if getattr(samples, "_is_generated", False):
        raise RunError("patches, frames and clips views cannot receive masks; run on the dataset or a "
                       "filtered view of its samples")
    check_field_name(spec.label_field, "output field")
    schema = samples._dataset.get_field_schema()
    outputs = [spec.label_field] + ([spec.instance_map_field] if spec.instance_map_field else [])
    if spec.instance_map_field:
        check_field_name(spec.instance_map_field, "instance map field")
        if spec.instance_map_field == spec.label_field:
            raise RunError("the instance map field must differ from the output field")
    for name, want in zip(outputs, ("Detections", "Segmentation")):
        have = field_type_name(schema, name)
        if have is not None and have != want:
            raise RunError(f"field {name!r} already exists as {have}; TinySAM writes {want} there. "
                           "Choose another field name")
    if spec.task == "everything":
        unknown = sorted(set(spec.everything) - set(EVERYTHING_PARAMS))
        if unknown:
            raise RunError(f"unknown everything-mode parameter(s): {', '.join(unknown)}")
        if spec.mode not in ("hierarchical", "dense"):
            raise RunError(f"mode must be 'hierarchical' or 'dense', got {spec.mode!r}")
        return
    if not spec.box_field and not spec.point_field:
        raise RunError("give a box prompt field (Detections) and/or a point prompt field (Keypoints)")
    for name, want in ((spec.box_field, "Detections"), (spec.point_field, "Keypoints")):
        if not name:
            continue
        have = field_type_name(schema, name)
        if have is None:
            raise RunError(f"prompt field {name!r} does not exist on dataset {samples._dataset.name!r}")
        if have != want:
            raise RunError(f"prompt field {name!r} holds {have}; expected {want}")
        if name in outputs:
            raise RunError(f"the output field must differ from the prompt field {name!r}")
    present = 0
    for name in (spec.box_field, spec.point_field):
        if name:
            present += samples.count(f"{name}.{'detections' if name == spec.box_field else 'keypoints'}")
    if present == 0:
        fields = " / ".join(n for n in (spec.box_field, spec.point_field) if n)
        raise RunError(f"the prompt field(s) {fields} hold no labels in the {len(samples)} target sample(s); "
                       "nothing to segment")


def _previous_run(dataset, run_key: str) -> dict | None:
    if run_key not in dataset.list_runs():
        return None
    return dataset.get_run_info(run_key).config.serialize()


def plan_run(samples, spec: RunSpec, model_version: str) -> tuple[list[str], list[str], int]:
    """(ids to process, their filepaths, number already done), enforcing the never-overwrite rule."""
    dataset = samples._dataset
    run_key = run_key_for(spec.label_field)
    schema = dataset.get_field_schema()
    exists = spec.label_field in schema
    previous = _previous_run(dataset, run_key)
    if exists and not spec.overwrite:
        if previous is None:
            raise RunError(f"field {spec.label_field!r} already exists and was not written by TinySAM; "
                           "choose another output field or tick overwrite")
        old = previous.get("signature")
        new = spec.signature(model_version)
        if old != new:
            diff = sorted(k for k in set(old or {}) | set(new) if (old or {}).get(k) != new.get(k))
            raise RunError(f"field {spec.label_field!r} holds a TinySAM run with different settings "
                           f"({', '.join(diff)}); choose another output field or tick overwrite")
    ids, paths = samples.values(["id", "filepath"])
    done = set()
    if exists and not spec.overwrite:
        done = set(samples.exists(spec.label_field).values("id"))
    todo = [(i, p) for i, p in zip(ids, paths) if i not in done]
    return [i for i, _ in todo], [p for _, p in todo], len(ids) - len(todo)


def _record_run(dataset, spec: RunSpec, predictor: TinySamPredictor, summary: RunSummary) -> None:
    config = dataset.init_run(
        method="tinysam", task=spec.task, label_field=spec.label_field, model=str(spec.model),
        model_version=predictor.model_version, engine=spec.engine, precision=spec.precision,
        device=spec.device, signature=spec.signature(predictor.model_version),
        parameters={k: v for k, v in asdict(spec).items()
                    if k not in ("overwrite", "write_batch", "prefetch", "decode_workers")},
    )
    dataset.register_run(summary.run_key, config, overwrite=True, cleanup=False)
    _save_summary(dataset, summary)


def _save_summary(dataset, summary: RunSummary) -> None:
    data = summary.to_dict()
    del data["run_key"]  # init_run_results takes the key positionally
    results = dataset.init_run_results(summary.run_key, **data)
    dataset.save_run_results(summary.run_key, results, overwrite=True, cache=False)


def load_summary(dataset, label_field: str) -> dict | None:
    """The recorded status/counts/errors of the run that wrote `label_field` (None if there is none)."""
    key = run_key_for(label_field)
    if key not in dataset.list_runs():
        return None
    results = dataset.load_run_results(key, cache=False)
    return None if results is None else {k: getattr(results, k) for k in results.attributes()
                                         if not k.startswith("_")}


# --------------------------------------------------------------------------------------- pipeline
class _Writer:
    """Buffers per-sample results and writes them in batches; the output field is written last."""

    def __init__(self, dataset, spec: RunSpec, batch: int) -> None:
        self.dataset, self.spec, self.batch = dataset, spec, max(1, batch)
        self.labels: dict = {}
        self.instances: dict = {}
        self.last_flush = time.monotonic()

    def add(self, sample_id: str, detections, instance_map) -> None:
        self.labels[sample_id] = detections
        if instance_map is not None:
            self.instances[sample_id] = instance_map
        if len(self.labels) >= self.batch or time.monotonic() - self.last_flush > 5.0:
            self.flush()

    def flush(self) -> None:
        if self.instances:
            self.dataset.set_values(self.spec.instance_map_field, self.instances, key_field="id", progress=False)
        if self.labels:
            self.dataset.set_values(self.spec.label_field, self.labels, key_field="id", progress=False)
        self.labels, self.instances = {}, {}
        self.last_flush = time.monotonic()


def _sample_mask_dir(spec: RunSpec, sample_id: str) -> str | None:
    if not spec.mask_dir:
        return None
    path = os.path.join(os.path.abspath(spec.mask_dir), spec.label_field, sample_id)
    if os.path.isdir(path):
        shutil.rmtree(path)  # stale files of an interrupted or overwritten run
    return path


def _prompt_values(samples, spec: RunSpec, ids: list[str], chunk: int = 64) -> Iterator[tuple]:
    """(box label, keypoints label) per id, fetched from the database a chunk at a time (through the
    target view, so label filters the user applied also filter the prompts)."""
    fields = [f for f in (spec.box_field, spec.point_field) if f]
    for start in range(0, len(ids), chunk):
        part = ids[start : start + chunk]
        view = samples.select(part, ordered=True)
        values = [view.values(f) for f in fields]
        for row in zip(*values):
            by_name = dict(zip(fields, row))
            yield by_name.get(spec.box_field), by_name.get(spec.point_field)


def run_segmentation(samples, spec: RunSpec, predictor: TinySamPredictor | None = None,
                     progress: ProgressFn | None = None, cancel: threading.Event | None = None) -> RunSummary:
    """Segment the target samples into `spec.label_field`; see the module docstring for guarantees."""
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor

    validate_spec(samples, spec)
    predictor = predictor or get_predictor(spec.model, spec.engine, spec.precision, spec.device)
    dataset = samples._dataset
    t0 = time.perf_counter()
    ids, paths, already = plan_run(samples, spec, predictor.model_version)
    summary = RunSummary(spec.label_field, run_key_for(spec.label_field), total=len(ids) + already,
                         already_done=already)
    _record_run(dataset, spec, predictor, summary)
    prompts_iter = _prompt_values(samples, spec, ids) if spec.task == "prompts" else itertools.repeat((None, None))
    items = ((i, p, next(prompts_iter)) for i, p in zip(ids, paths))
    writer = _Writer(dataset, spec, spec.write_batch)
    everything = None
    if spec.task == "everything":
        from tinysam_kit.inference.everything import EverythingGenerator

        everything = EverythingGenerator(predictor, spec.mode, **spec.everything)
    try:
        for n, ((sample_id, path, prompt_labels), image, error) in enumerate(
                prefetch_images(items, lambda item: load_image(item[1]), spec.prefetch, spec.decode_workers), 1):
            if cancel is not None and cancel.is_set():
                summary.status = "cancelled"
                break
            if error is None:
                try:
                    detections, instance_map = _segment_sample(predictor, everything, spec, sample_id, image,
                                                               prompt_labels, summary)
                    writer.add(sample_id, detections, instance_map)
                    summary.processed += 1
                    summary.masks += len(detections.detections)
                except PromptError as exc:
                    error = exc
            if error is not None:
                summary.errors.append({"sample_id": sample_id, "filepath": path, "error": str(error)})
            if progress is not None:
                progress(n, len(ids), os.path.basename(path))
        writer.flush()
        if summary.status == "running":
            summary.status = "completed" if not summary.errors else "completed_with_errors"
    except BaseException as exc:
        summary.status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        try:
            writer.flush()  # the buffered samples are complete: keep them for the resume
        except Exception:  # noqa: BLE001 - the original error matters more than a failed final write
            pass
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        _save_summary(dataset, summary)
    return summary


def _segment_sample(predictor, everything, spec: RunSpec, sample_id: str, image, prompt_labels,
                    summary: RunSummary):
    h, w = image.shape[:2]
    if everything is not None:
        state = predictor.embed(image)
        results = L.everything_results(everything.generate(image_embedding=state), spec.label)
    else:
        boxes, points = prompt_labels
        prompts = L.combine_prompts(
            L.box_prompts(boxes, w, h, spec.box_field or "boxes"),
            L.point_prompts(points, w, h, spec.point_field or "points", spec.point_label_attribute))
        if not prompts:
            summary.without_prompts += 1
            results = []
        else:
            results = L.segment_prompts(predictor, predictor.embed(image), prompts)
    mask_dir = _sample_mask_dir(spec, sample_id)
    instance_map = None
    if spec.instance_map_field:
        path = os.path.join(mask_dir, "instances.png") if mask_dir else None
        instance_map = L.instance_map(results, (h, w), path)
    return L.results_to_detections(results, mask_dir), instance_map
