"""Dataset-wide TinySAM runs on FiftyOne collections: resumable, idempotent, recorded.

* Resumable: a sample counts as done once its output field is set; re-running the same run skips it.
* No partial samples: every sample's result is one document update (masks on disk are written first, the
  optional instance map before the output field, so the output field is the completion marker).
* Recorded: a FiftyOne run (`dataset.get_run_info("tinysam_<field>")`) holds the model actually used (and why,
  when `auto` fell back to the demo model), model version, engine, precision and every parameter; its results
  hold the status, counts, per-sample errors and a heartbeat, so a run whose process died shows as stale.
* Throughput: images are decoded by a small thread pool a bounded number of samples ahead of inference,
  and results are written in batches.
* Scale-out: with `ray_address` set, everything mode runs on a Ray cluster's model actors (the sample files
  must be readable by every node: a shared filesystem) and this process writes each sample as its result
  arrives, under the same guarantees; the labels equal those of a run in this process.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone

from tinysam_kit.data.images import load_image
from tinysam_kit.inference import policy
from tinysam_kit.inference.batch import PrelabelResult, prefetch_images
from tinysam_kit.inference.predictor import PromptError, TinySamPredictor
from tinysam_kit.integrations.fiftyone import labels as L

TASKS = ("everything", "prompts")
EVERYTHING_PARAMS = tuple(policy.EVERYTHING_DEFAULTS)
RESERVED_FIELDS = {"id", "filepath", "tags", "metadata", "created_at", "last_modified_at", "media_type"}
FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
RUN_KEY_PREFIX = "tinysam_"
FAILED_TAG = "tinysam_failed"  # samples whose image could not be read or prompted, until a run succeeds
# A running run refreshes its heartbeat at least this often; one silent for STALE_AFTER is considered dead.
HEARTBEAT_SECONDS = 10.0
STALE_AFTER = 120.0
# How a user changes the output of a run, in each front end's words.
APP_REMEDY = "choose another output field or tick Overwrite"
CLI_REMEDY = "pass another --field, or --overwrite to replace it"


class RunError(ValueError):
    """The run cannot start as asked; the message says what to change."""


@dataclass
class RunSpec:
    """What to compute and where to write it."""

    task: str  # "everything" | "prompts"
    label_field: str
    options: policy.EngineOptions = field(default_factory=policy.EngineOptions)
    # everything mode: explicit values only; None or missing = the model's own (see policy.everything_params)
    mode: str = "hierarchical"
    everything: dict = field(default_factory=dict)
    label: str = "object"
    # prompts
    box_field: str | None = None
    point_field: str | None = None
    point_label_attribute: str | None = None
    # output
    output: str = "detections"  # "detections" (instance masks) | "polylines" (filled, one per connected part)
    instance_map_field: str | None = None
    mask_dir: str | None = None  # masks as PNG files under <mask_dir>/<label_field>/<sample id>/
    overwrite: bool = False
    # throughput
    write_batch: int = 16
    prefetch: int = 4
    decode_workers: int = 2
    # everything mode on a Ray cluster ('auto' or HOST:PORT); None runs in this process
    ray_address: str | None = None
    ray_actors: int | None = None  # grow the actor pool up to this many (default: what the cluster holds)
    batch_size: int = 1  # images per encoder call on the cluster's actors
    # everything mode in this many model processes on this machine (1: in this process); 'auto': the number
    # `inference.batch.auto_workers` chooses for the samples still to do
    workers: int | str = 1

    def everything_params(self, model_name: str) -> dict:
        """The everything-mode parameters this run uses with `model_name` (pre-labelling rules)."""
        return policy.everything_params(model_name, self.everything, prelabel=True)

    def signature(self, model: str, model_version: str | None = None, registered_name: str | None = None) -> dict:
        """What makes two runs produce the same field (a run with another signature is another run).

        `model`: the model asked for, resolved (`auto` → its choice); `registered_name`: the loaded model's
        registry name, which decides its own everything-mode values. Without a version (a form being filled
        in, no model loaded) only the everything-mode values given explicitly are included."""
        sig = {"task": self.task, "model": model, "engine": self.options.engine,
               "precision": self.options.precision, "instance_map_field": self.instance_map_field,
               "masks_on_disk": bool(self.mask_dir)}
        if self.output != "detections":
            sig["output"] = self.output
        if model_version is not None:
            sig["model_version"] = model_version
        if self.task == "everything":
            everything = ({k: v for k, v in self.everything.items() if v is not None} if model_version is None
                          else self.everything_params(registered_name or model))
            sig.update(mode=self.mode, label=self.label, everything=dict(sorted(everything.items())))
        else:
            sig.update(box_field=self.box_field, point_field=self.point_field,
                       point_label_attribute=self.point_label_attribute)
        return sig


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
    model: str = ""  # the model actually used
    model_note: str | None = None  # why `auto` fell back to the demo model
    heartbeat: str = field(default_factory=_now)  # UTC, refreshed while running
    host: str = field(default_factory=socket.gethostname)
    pid: int = field(default_factory=os.getpid)
    operation_id: str | None = None  # the delegated operation, when run by a worker
    workers: int = 1  # model processes on this machine that ran everything mode (1: the running process)

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
            parts.append(f"{len(self.errors)} failed, tagged '{FAILED_TAG}' (e.g. {first['error']})")
        parts.append(f"model: {self.model}" + (" (the bundled demo model: `auto` found no official weights)"
                                                if self.model_note else ""))
        if self.workers > 1:
            parts.append(f"{self.workers} model processes")
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
    if spec.output not in L.OUTPUTS:
        raise RunError(f"output must be one of {', '.join(L.OUTPUTS)}, got {spec.output!r}")
    if spec.output == "polylines" and spec.mask_dir:
        raise RunError("masks on disk apply to Detections output; polylines are stored in the dataset")
    schema = samples._dataset.get_field_schema()
    outputs = [spec.label_field] + ([spec.instance_map_field] if spec.instance_map_field else [])
    if spec.instance_map_field:
        check_field_name(spec.instance_map_field, "instance map field")
        if spec.instance_map_field == spec.label_field:
            raise RunError("the instance map field must differ from the output field")
    for name, want in zip(outputs, (L.OUTPUTS[spec.output], "Segmentation")):
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
        if spec.ray_address is not None and not str(spec.ray_address).strip():
            raise RunError("the Ray address is empty: give 'auto' or HOST:PORT, or none to run in this process")
        workers_ok = spec.workers == "auto" or (isinstance(spec.workers, int) and spec.workers >= 1)
        if spec.batch_size < 1 or not workers_ok or (spec.ray_actors is not None and spec.ray_actors < 1):
            raise RunError("batch size, worker processes and Ray actors must be positive integers "
                           f"(worker processes may also be 'auto'); got workers {spec.workers!r}")
        if spec.workers not in (1, "auto") and spec.ray_address:
            raise RunError("worker processes run on this machine; on a Ray cluster the actor pool does the work")
        return
    if spec.ray_address or spec.workers not in (1, "auto"):
        raise RunError("prompt runs execute in this process; a Ray address or worker processes apply to "
                       "everything mode only")
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


def _lookup(record: dict | None, dotted: str):
    value = record or {}
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def describe_changes(old: dict | None, new: dict) -> str:
    """`name: old → new` for every setting that differs between two run signatures."""
    names = policy.changed_settings(old, new)
    return ", ".join(f"{n}: {_lookup(old, n)!r} → {_lookup(new, n)!r}" for n in names)


def output_conflict(dataset, spec: RunSpec, model: str, model_version: str | None = None,
                    registered_name: str | None = None, remedy: str = APP_REMEDY) -> str | None:
    """Why `spec` may not write its output field (None when it may): the field exists and TinySAM did not
    write it, or an earlier TinySAM run with other settings did. Forms call it without a model version: then
    the settings given are compared (the model's own values are known once it is loaded)."""
    if spec.overwrite or spec.label_field not in dataset.get_field_schema():
        return None
    previous = _previous_run(dataset, run_key_for(spec.label_field))
    if previous is None:
        return f"field {spec.label_field!r} already exists and was not written by TinySAM; {remedy}"
    old = previous.get("signature") or {}
    new = spec.signature(model, model_version, registered_name)
    if model_version is None:
        old = {k: v for k, v in old.items() if k != "model_version"}
        if "everything" in new:
            old_values = old.get("everything") or {}
            old["everything"] = {k: old_values.get(k) for k in new["everything"]}
    if old != new:
        return (f"field {spec.label_field!r} holds a TinySAM run with different settings "
                f"({describe_changes(old, new)}); {remedy}")
    return None


def plan_run(samples, spec: RunSpec, predictor: TinySamPredictor,
             remedy: str = APP_REMEDY) -> tuple[list[str], list[str], int]:
    """(ids to process, their filepaths, number already done), enforcing the never-overwrite rule."""
    dataset = samples._dataset
    conflict = output_conflict(dataset, spec, predictor.model_choice.name, predictor.model_version,
                               predictor.model_name, remedy)
    if conflict:
        raise RunError(conflict)
    ids, paths = samples.values(["id", "filepath"])
    done = set()
    if spec.label_field in dataset.get_field_schema() and not spec.overwrite:
        done = set(samples.exists(spec.label_field).values("id"))
    todo = [(i, p) for i, p in zip(ids, paths) if i not in done]
    return [i for i, _ in todo], [p for _, p in todo], len(ids) - len(todo)


def _record_run(dataset, spec: RunSpec, predictor: TinySamPredictor, summary: RunSummary) -> None:
    choice = predictor.model_choice
    signature = spec.signature(choice.name, predictor.model_version, predictor.model_name)
    parameters = {k: v for k, v in asdict(spec).items()
                  if k not in ("options", "overwrite", "write_batch", "prefetch", "decode_workers",
                               "ray_actors", "batch_size", "workers")}
    if spec.task == "everything":
        parameters["everything"] = spec.everything_params(predictor.model_name)
    config = dataset.init_run(
        method="tinysam", task=spec.task, label_field=spec.label_field, model=choice.name,
        model_requested=choice.requested, model_note=choice.note, model_version=predictor.model_version,
        engine=spec.options.engine, precision=spec.options.precision, device=spec.options.device,
        signature=signature, identity=policy.run_identity(predictor.model_version, spec.task, signature),
        parameters=parameters,
    )
    dataset.register_run(summary.run_key, config, overwrite=True, cleanup=False)
    _save_summary(dataset, summary)


def _save_summary(dataset, summary: RunSummary) -> None:
    summary.heartbeat = _now()
    data = summary.to_dict()
    del data["run_key"]  # init_run_results takes the key positionally
    results = dataset.init_run_results(summary.run_key, **data)
    dataset.save_run_results(summary.run_key, results, overwrite=True, cache=False)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def stale_reason(summary: dict, now: datetime | None = None) -> str | None:
    """Why a summary that says "running" cannot be running any more (None when it may be)."""
    if summary.get("status") != "running":
        return None
    host, pid = summary.get("host"), summary.get("pid")
    if host == socket.gethostname() and isinstance(pid, int) and not _process_alive(pid):
        return f"its process (pid {pid} on {host}) has exited"
    beat = summary.get("heartbeat")
    if beat:
        age = ((now or datetime.now(timezone.utc)) - datetime.fromisoformat(beat)).total_seconds()
        if age > STALE_AFTER:
            return f"its process (pid {pid} on {host}) has not reported for {age / 60:.0f} minute(s)"
    return None


def load_summary(dataset, label_field: str) -> dict | None:
    """The recorded status/counts/errors of the run that wrote `label_field` (None if there is none).

    A run whose process died shows `status: "stale"`, with `stale_reason` and `how_to_continue`."""
    key = run_key_for(label_field)
    if key not in dataset.list_runs():
        return None
    results = dataset.load_run_results(key, cache=False)
    if results is None:
        return None
    summary = {k: getattr(results, k) for k in results.attributes() if not k.startswith("_")}
    reason = stale_reason(summary)
    if reason:
        summary["status"] = "stale"
        summary["stale_reason"] = f"the run stopped without finishing: {reason}"
        how = ("run the same operator (or command) again: samples already written are kept and skipped, "
               "it continues with the rest")
        if summary.get("operation_id"):
            how += (f". Its delegated operation still says running; mark it failed with "
                    f"`fiftyone delegated fail {summary['operation_id']}`")
        summary["how_to_continue"] = how
    return summary


# --------------------------------------------------------------------------------------- pipeline
class _Writer:
    """Buffers per-sample results and writes them in batches; the output field is written last."""

    def __init__(self, dataset, spec: RunSpec, batch: int, on_flush: Callable[[], None] | None = None) -> None:
        self.dataset, self.spec, self.batch = dataset, spec, max(1, batch)
        self.on_flush = on_flush
        self.labels: dict = {}
        self.instances: dict = {}
        self.metadata: dict = {}
        self.last_flush = time.monotonic()

    def add(self, sample_id: str, detections, instance_map, metadata) -> None:
        self.labels[sample_id] = detections
        self.metadata[sample_id] = metadata
        if instance_map is not None:
            self.instances[sample_id] = instance_map
        if len(self.labels) >= self.batch or time.monotonic() - self.last_flush > 5.0:
            self.flush()

    def flush(self) -> None:
        if self.metadata:
            self.dataset.set_values("metadata", self.metadata, key_field="id", progress=False)
        if self.instances:
            self.dataset.set_values(self.spec.instance_map_field, self.instances, key_field="id", progress=False)
        if self.labels:
            self.dataset.set_values(self.spec.label_field, self.labels, key_field="id", progress=False)
        self.labels, self.instances, self.metadata = {}, {}, {}
        self.last_flush = time.monotonic()
        if self.on_flush is not None:
            self.on_flush()


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


def image_metadata(path: str, height: int, width: int, channels: int = 3):
    """FiftyOne's `ImageMetadata` for a sample whose image was decoded (size from the decoded pixels: the
    orientation the model saw)."""
    import fiftyone as fo

    h, w = height, width
    try:
        size = os.path.getsize(path)
    except OSError:
        size = None
    return fo.ImageMetadata(width=w, height=h, num_channels=channels, size_bytes=size)


def _update_failed_tags(dataset, failed: list[str], succeeded: list[str]) -> None:
    if failed:
        dataset.select(failed).tag_samples(FAILED_TAG)
    if succeeded:
        dataset.select(succeeded).untag_samples(FAILED_TAG)


def run_segmentation(samples, spec: RunSpec, predictor: TinySamPredictor | None = None,
                     progress: ProgressFn | None = None, cancel: threading.Event | None = None,
                     remedy: str = APP_REMEDY, operation_id: str | None = None) -> RunSummary:
    """Segment the target samples into `spec.label_field`; see the module docstring for guarantees.

    `remedy` is how the caller's user picks another output (the App's and the CLI's words differ)."""
    for update in iter_segmentation(samples, spec, predictor, cancel, remedy, operation_id):
        if isinstance(update, RunSummary):
            return update
        if progress is not None:
            progress(*update)
    raise AssertionError("iter_segmentation ends with its summary")


def iter_segmentation(samples, spec: RunSpec, predictor: TinySamPredictor | None = None,
                      cancel: threading.Event | None = None, remedy: str = APP_REMEDY,
                      operation_id: str | None = None) -> Iterator[tuple[int, int, str] | RunSummary]:
    """`run_segmentation` as a generator: yields (done, total, file name) after every sample and finally the
    summary, for callers that report progress by yielding (App operators)."""
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor

    validate_spec(samples, spec)
    predictor = predictor or get_predictor(spec.options)
    dataset = samples._dataset
    t0 = time.perf_counter()
    ids, paths, already = plan_run(samples, spec, predictor, remedy)
    choice = predictor.model_choice
    summary = RunSummary(spec.label_field, run_key_for(spec.label_field), total=len(ids) + already,
                         already_done=already, model=choice.name, model_note=choice.note, operation_id=operation_id,
                         workers=_workers_for(spec, predictor, len(ids)))
    _record_run(dataset, spec, predictor, summary)
    last_beat = [time.monotonic()]
    succeeded: list[str] = []

    def beat(force: bool = False) -> None:
        if force or time.monotonic() - last_beat[0] > HEARTBEAT_SECONDS:
            last_beat[0] = time.monotonic()
            summary.seconds = time.perf_counter() - t0
            _save_summary(dataset, summary)

    if spec.ray_address:
        outcomes = _ray_outcomes(spec, predictor, ids, paths)
    elif summary.workers > 1:
        outcomes = _worker_outcomes(spec, predictor, ids, paths, summary.workers)
    else:
        outcomes = _local_outcomes(samples, spec, predictor, ids, paths, summary)
    writer = _Writer(dataset, spec, spec.write_batch, on_flush=beat)
    try:
        for n, (sample_id, path, outcome) in enumerate(outcomes, 1):
            if cancel is not None and cancel.is_set():
                summary.status = "cancelled"
                break
            if isinstance(outcome, Exception):
                summary.errors.append({"sample_id": sample_id, "filepath": path, "error": str(outcome)})
            else:
                results, (h, w) = outcome
                detections, instance_map = _sample_labels(spec, sample_id, results, (h, w))
                writer.add(sample_id, detections, instance_map, image_metadata(path, h, w))
                succeeded.append(sample_id)
                summary.processed += 1
                summary.masks += L.label_count(detections)
            beat()
            yield n, len(ids), os.path.basename(path)
        writer.flush()
        if summary.status == "running":
            summary.status = "completed" if not summary.errors else "completed_with_errors"
    except BaseException as exc:
        summary.status = {KeyboardInterrupt: "interrupted", GeneratorExit: "cancelled"}.get(type(exc), "failed")
        try:
            writer.flush()  # the buffered samples are complete: keep them for the resume
        except Exception:  # noqa: BLE001 - the original error matters more than a failed final write
            pass
        raise
    finally:
        summary.seconds = time.perf_counter() - t0
        _update_failed_tags(dataset, [e["sample_id"] for e in summary.errors], succeeded)
        _save_summary(dataset, summary)
    yield summary


Outcome = tuple[list, tuple[int, int]] | Exception  # (mask results, (height, width)) or why the sample failed


def _local_outcomes(samples, spec: RunSpec, predictor: TinySamPredictor, ids: list[str], paths: list[str],
                    summary: RunSummary) -> Iterator[tuple[str, str, Outcome]]:
    """(sample id, filepath, outcome) per sample, in order, computed in this process (decoding prefetched)."""
    prompts_iter = _prompt_values(samples, spec, ids) if spec.task == "prompts" else itertools.repeat((None, None))
    items = ((i, p, next(prompts_iter)) for i, p in zip(ids, paths))
    everything = None
    if spec.task == "everything":
        from tinysam_kit.inference.everything import EverythingGenerator

        everything = EverythingGenerator(predictor, spec.mode, **spec.everything_params(predictor.model_name))
    for (sample_id, path, prompt_labels), image, error in prefetch_images(
            items, lambda item: load_image(item[1]), spec.prefetch, spec.decode_workers):
        if error is None:
            try:
                outcome = (_sample_results(predictor, everything, spec, image, prompt_labels, summary),
                           image.shape[:2])
            except PromptError as exc:
                outcome = exc
        else:
            outcome = error
        yield sample_id, path, outcome


def _ray_outcomes(spec: RunSpec, predictor: TinySamPredictor, ids: list[str],
                  paths: list[str]) -> Iterator[tuple[str, str, Outcome]]:
    """(sample id, filepath, outcome) per sample, as the cluster's model actors finish them. The actors load the
    model this process resolved (so `auto` cannot resolve differently on a node)."""
    from tinysam_kit.integrations.ray import RayRunError, RayUnavailableError, iter_everything_on_ray

    path_of = dict(zip(ids, paths))
    try:
        for sample_id, result in iter_everything_on_ray(
                path_of, address=spec.ray_address, options=replace(spec.options, model=predictor.model_choice.name),
                mode=spec.mode, params=spec.everything_params(predictor.model_name), batch_size=spec.batch_size,
                max_actors=spec.ray_actors, output_mode="coco_rle"):
            yield sample_id, path_of[sample_id], _everything_outcome(spec, predictor, result, "the cluster's")
    except (RayUnavailableError, RayRunError) as exc:
        raise RunError(str(exc)) from exc


def _workers_for(spec: RunSpec, predictor: TinySamPredictor, todo: int) -> int:
    """Model processes for this run's everything mode on this machine: 1 for prompt runs and Ray runs, else
    `inference.batch.resolve_workers` for this engine's device."""
    from tinysam_kit.inference.batch import resolve_workers

    if spec.task != "everything" or spec.ray_address:
        return 1
    return resolve_workers(spec.workers, todo, device=predictor.engine.info.device, threads=spec.options.threads)


def _worker_outcomes(spec: RunSpec, predictor: TinySamPredictor, ids: list[str], paths: list[str],
                     workers: int) -> Iterator[tuple[str, str, Outcome]]:
    """(sample id, filepath, outcome) per sample, as `workers` model processes on this machine finish them
    (each with `threads` or its share of the cores); this process stays the only database writer."""
    from tinysam_kit.inference.batch import run_everything_workers, worker_threads

    threads = worker_threads(spec.options.threads, workers)
    options = replace(spec.options, model=predictor.model_choice.name, threads=threads)
    path_of = dict(zip(ids, paths))
    for outcome in run_everything_workers(options, list(path_of.items()), None, workers=workers,
                                          mode=spec.mode, output_mode="coco_rle",
                                          **spec.everything_params(predictor.model_name)):
        result = outcome.result if outcome.result is not None else PrelabelResult(outcome.item, None, outcome.error)
        yield outcome.key, path_of[outcome.key], _everything_outcome(spec, predictor, result, "the workers'")


def _everything_outcome(spec: RunSpec, predictor: TinySamPredictor, result: PrelabelResult, where: str) -> Outcome:
    """One image's everything-mode result computed elsewhere (records as RLE) as this process's outcome; results
    from another model version than this process's stop the run."""
    from tinysam_kit.inference.encodings.coco import with_binary_masks

    if result.error is not None:
        return RunError(result.error)
    if result.model_version != predictor.model_version:
        raise RunError(f"{where} model is {result.model_version}, this process's is {predictor.model_version}: "
                       "give every node the same weights (or an explicit checkpoint path they all read)")
    return L.everything_results(with_binary_masks(result.records), spec.label), (result.height, result.width)


def _sample_results(predictor, everything, spec: RunSpec, image, prompt_labels, summary: RunSummary) -> list:
    h, w = image.shape[:2]
    # Encoded afresh (cache=False), never read from the embedding store: stored embeddings are rounded to fp16,
    # and a run's output must not depend on what happened to be stored (a resumed run equals an uninterrupted one).
    if everything is not None:
        return L.everything_results(everything.generate(image_embedding=predictor.embed(image, cache=False)),
                                    spec.label)
    boxes, points = prompt_labels
    prompts = L.combine_prompts(
        L.box_prompts(boxes, w, h, spec.box_field or "boxes"),
        L.point_prompts(points, w, h, spec.point_field or "points", spec.point_label_attribute))
    if not prompts:
        summary.without_prompts += 1
        return []
    return L.segment_prompts(predictor, predictor.embed(image, cache=False), prompts)


def _sample_labels(spec: RunSpec, sample_id: str, results: list, shape: tuple[int, int]):
    """(output label, instance map or None) of one sample's results; mask files are written here."""
    h, w = shape
    mask_dir = _sample_mask_dir(spec, sample_id)
    instance_map = None
    if spec.instance_map_field:
        path = os.path.join(mask_dir, "instances.png") if mask_dir else None
        instance_map = L.instance_map(results, (h, w), path)
    return L.results_to_labels(results, spec.output, mask_dir), instance_map


# ------------------------------------------------------------------------------------- embeddings
@dataclass
class EmbeddingSummary:
    """What a *Compute TinySAM embeddings* run did."""

    total: int = 0  # samples in the target view
    computed: int = 0  # embeddings encoded and stored by this run
    already_stored: int = 0  # skipped: the store (or this process's cache) had them
    errors: list[dict] = field(default_factory=list)  # {"sample_id", "filepath", "error"}
    seconds: float = 0.0
    model: str = ""
    model_note: str | None = None
    store: str = ""  # the store's folder

    def to_dict(self) -> dict:
        d = asdict(self)
        d["failed"] = len(self.errors)
        d["images_per_minute"] = round(60.0 * self.computed / self.seconds, 2) if self.seconds > 0 else 0.0
        return d

    def message(self) -> str:
        parts = [f"{self.computed} embedding(s) computed into {self.store}"]
        if self.already_stored:
            parts.append(f"{self.already_stored} already stored")
        if self.errors:
            parts.append(f"{len(self.errors)} failed (e.g. {self.errors[0]['error']})")
        parts.append(f"model: {self.model}" + (" (the bundled demo model: `auto` found no official weights)"
                                                if self.model_note else ""))
        return "; ".join(parts)


def iter_embeddings(samples, options: policy.EngineOptions, predictor: TinySamPredictor | None = None,
                    prefetch: int = 4, decode_workers: int = 2
                    ) -> Iterator[tuple[int, int, str] | EmbeddingSummary]:
    """Fill the persistent embedding store for the target samples, under the key the App's operators and panel
    look up (`predictors.image_key`), skipping those already stored; yields (done, total, file name) per
    encoded image and finally the summary."""
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor, image_key

    check_image_collection(samples)
    predictor = predictor or get_predictor(options)
    if predictor.store is None:
        raise RunError(f"the embedding store is off ({policy.STORE_ENV}=off): computed embeddings would not be "
                       f"kept; unset {policy.STORE_ENV} or point it at a folder")
    t0 = time.perf_counter()
    choice = predictor.model_choice
    summary = EmbeddingSummary(model=choice.name, model_note=choice.note, store=str(predictor.store.root))
    todo = []
    for sample_id, path in zip(*samples.values(["id", "filepath"])):
        summary.total += 1
        try:
            key = image_key(path)
        except OSError as exc:
            summary.errors.append({"sample_id": sample_id, "filepath": path, "error": str(exc)})
            continue
        if predictor.has_embedding(key=key):
            summary.already_stored += 1
        else:
            todo.append((sample_id, path, key))
    items = prefetch_images(todo, lambda item: load_image(item[1]), prefetch, decode_workers)
    for n, ((sample_id, path, key), image, error) in enumerate(items, 1):
        if error is None:
            predictor.embed(image, key=key)
            summary.computed += 1
        else:
            summary.errors.append({"sample_id": sample_id, "filepath": path, "error": str(error)})
        yield n, len(todo), os.path.basename(path)
    summary.seconds = time.perf_counter() - t0
    yield summary
