"""The model side of the backend: Label Studio tasks and contexts in, brush or polygon predictions out.

Transport-free (no HTTP here) so the server, the `ls-prelabel` command and tests share one path.
"""

from __future__ import annotations

import logging
import math
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from tinysam_kit.data.images import ImageError, load_image
from tinysam_kit.inference import policy
from tinysam_kit.inference.encodings.labelstudio import mask_to_rle
from tinysam_kit.inference.encodings.polygons import mask_to_parts
from tinysam_kit.inference.predictor import ImageEmbedding, PromptError, TinySamPredictor
from tinysam_kit.integrations.labelstudio.fetch import ImageFetcher, ImageFetchError
from tinysam_kit.integrations.labelstudio.label_config import (
    POLYGON_TAGS,
    Control,
    LabelConfig,
    LabelConfigError,
    parse_label_config,
)
from tinysam_kit.integrations.labelstudio.preencode import BackgroundEncoder
from tinysam_kit.integrations.labelstudio.settings import BackendSettings

log = logging.getLogger("tinysam_kit.integrations.labelstudio")

# Clicks at the very edge of the image can land a hair outside 0..100 %.
COORD_TOLERANCE_PCT = 1.0


class BadRequest(ValueError):
    """The request cannot be answered as sent; `status_code` is the HTTP status to use."""

    def __init__(self, message: str, status_code: int = 422) -> None:
        super().__init__(message)
        self.status_code = status_code


class ModelGate:
    """Serialises model calls; interactive clicks go ahead of waiting batch work.

    One model instance serves every annotator: running two forward passes at once would not be faster on
    a CPU and is unsafe for some engines, so calls take turns. A click waits at most for the batch task
    that is already running, never for the whole queue of batch tasks behind it.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._busy = False
        self._waiting_interactive = 0
        self.busy_since: float | None = None

    @contextmanager
    def hold(self, interactive: bool) -> Iterator[None]:
        with self._cond:
            if interactive:
                self._waiting_interactive += 1
            try:
                while self._busy or (not interactive and self._waiting_interactive):
                    self._cond.wait()
            finally:
                if interactive:
                    self._waiting_interactive -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()


@dataclass
class Prompt:
    image_name: str
    points: list[tuple[float, float]] = field(default_factory=list)  # percentages
    point_labels: list[int] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None  # percentages x0, y0, x1, y1
    label: str | None = None
    original_size: tuple[int, int] | None = None  # (width, height) as Label Studio saw the image

    def is_empty(self) -> bool:
        return not self.points and self.box is None


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{what} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise BadRequest(f"{what} must be finite, got {value}")
    return value


def _percent(value: Any, what: str) -> float:
    v = _number(value, what)
    if not -COORD_TOLERANCE_PCT <= v <= 100 + COORD_TOLERANCE_PCT:
        raise BadRequest(f"{what} = {v:g} is outside the image (Label Studio sends percentages 0..100)")
    return min(max(v, 0.0), 100.0)


def _first_label(value: dict, *keys: str) -> str | None:
    for key in keys:
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return None


def parse_context(context: Any, config: LabelConfig, max_regions: int) -> Prompt | None:
    """All keypoints (positive and negative) and the latest rectangle of a smart-tool context.

    Returns None when the context has no keypoint or rectangle region (e.g. a smart brush stroke).
    """
    if context is None:
        return None
    if not isinstance(context, dict):
        raise BadRequest(f"params.context must be an object, got {type(context).__name__}")
    results = context.get("result", [])
    if results is None:
        return None
    if not isinstance(results, list):
        raise BadRequest(f"params.context.result must be a list, got {type(results).__name__}")
    if len(results) > max_regions:
        raise BadRequest(f"params.context.result has {len(results)} regions; the limit is {max_regions}", 413)
    prompt: Prompt | None = None
    for n, region in enumerate(results):
        where = f"params.context.result[{n}]"
        if not isinstance(region, dict):
            raise BadRequest(f"{where} must be an object, got {type(region).__name__}")
        kind = str(region.get("type", "")).lower()
        if kind not in ("keypointlabels", "keypoint", "rectanglelabels", "rectangle"):
            continue  # smart brush strokes and other tools carry no prompt for us
        value = region.get("value")
        if not isinstance(value, dict):
            raise BadRequest(f"{where}.value must be an object")
        image_name = region.get("to_name")
        if not isinstance(image_name, str) or image_name not in config.images:
            if len(config.images) == 1 and image_name is None:
                image_name = next(iter(config.images))
            else:
                raise BadRequest(f"{where}.to_name {image_name!r} is not an <Image> of the label config "
                                 f"({', '.join(config.images)})")
        if prompt is None:
            prompt = Prompt(image_name)
        elif prompt.image_name != image_name:
            raise BadRequest(f"{where} targets image {image_name!r} but earlier regions target "
                             f"{prompt.image_name!r}; one context must prompt one image")
        width, height = region.get("original_width"), region.get("original_height")
        if width is not None or height is not None:
            w, h = _number(width, f"{where}.original_width"), _number(height, f"{where}.original_height")
            if w < 1 or h < 1 or w != int(w) or h != int(h) or w * h > 2**31:
                raise BadRequest(f"{where}: original_width/height must be positive integers, got {width}×{height}")
            prompt.original_size = (int(w), int(h))
        if kind.startswith("keypoint"):
            x = _percent(value.get("x"), f"{where}.value.x")
            y = _percent(value.get("y"), f"{where}.value.y")
            positive = region.get("is_positive", True)
            if positive is not None and not isinstance(positive, bool):
                raise BadRequest(f"{where}.is_positive must be true or false, got {positive!r}")
            prompt.points.append((x, y))
            prompt.point_labels.append(0 if positive is False else 1)
            label = _first_label(value, "keypointlabels", "labels")
            if positive is not False and label:
                prompt.label = label
            elif prompt.label is None:
                prompt.label = label
        else:
            x = _percent(value.get("x"), f"{where}.value.x")
            y = _percent(value.get("y"), f"{where}.value.y")
            bw = _number(value.get("width"), f"{where}.value.width")
            bh = _number(value.get("height"), f"{where}.value.height")
            if bw < 0 or bh < 0:
                raise BadRequest(f"{where}: rectangle width and height must be >= 0, got {bw:g}×{bh:g}")
            rotation = value.get("rotation", 0) or 0
            rotation = _number(rotation, f"{where}.value.rotation")
            prompt.box = _rectangle_bounds(x, y, bw, bh, rotation, prompt.original_size)
            prompt.label = _first_label(value, "rectanglelabels", "labels") or prompt.label
    return prompt


def _rectangle_bounds(x: float, y: float, w: float, h: float, rotation: float, size: tuple[int, int] | None):
    """Axis-aligned bounds (percent) of Label Studio's rectangle, rotated clockwise about its top-left corner.

    Rotation happens in pixels, so a non-square image is rotated in pixel units when its size is known.
    """
    if rotation % 360 == 0:
        corners = np.array([[x, y], [x + w, y + h]])
    else:
        sx, sy = (size[0] / 100.0, size[1] / 100.0) if size else (1.0, 1.0)
        t = math.radians(rotation)
        dx = np.array([0, w, w, 0]) * sx
        dy = np.array([0, 0, h, h]) * sy
        px = x * sx + dx * math.cos(t) - dy * math.sin(t)
        py = y * sy + dx * math.sin(t) + dy * math.cos(t)
        corners = np.stack([px / sx, py / sy], 1)
    x0, y0 = np.clip(corners.min(0), 0, 100)
    x1, y1 = np.clip(corners.max(0), 0, 100)
    return float(x0), float(y0), float(x1), float(y1)


def prompt_label(control: Control, wanted: str | None) -> str | None:
    """The label of a smart-tool answer: the prompt's own label, matched by name (a prompt without a
    label gets the control's first label).

    A prompt label the output control does not have is refused (422) rather than swapped for another label:
    the annotator would otherwise accept a mask labelled differently from the tool they clicked with.
    """
    if not control.labels:
        return wanted
    if wanted is None:
        return control.labels[0]
    if wanted in control.labels:
        return wanted
    raise BadRequest(f"the prompt's label {wanted!r} has no label of the same name in <{control.tag} "
                     f"name=\"{control.name}\"> (its labels: {', '.join(control.labels)}); add "
                     f"<Label value=\"{wanted}\"/> to it or rename the smart tool's label")


def unmatched_prompt_labels(config: LabelConfig) -> list[str]:
    """Smart-tool labels with no output label of the same name: clicks with them will be refused."""
    out = []
    for control in config.keypoints + config.rectangles:
        for image_name in control.to_name:
            try:
                output = config.output_for(image_name)
            except LabelConfigError:
                continue
            missing = [label for label in control.labels if output.labels and label not in output.labels]
            if missing:
                out.append(f"<{control.tag} name=\"{control.name}\"> label(s) {', '.join(missing)} have no label "
                           f"of the same name in <{output.tag} name=\"{output.name}\"> ({', '.join(output.labels)}); "
                           "smart clicks with them will be refused")
    return out


def batch_label(control: Control, wanted: str = "") -> str | None:
    """The label of everything-mode regions: `wanted` (TINYSAM_BATCH_LABEL) or the control's first label."""
    if not control.labels:
        return None
    if not wanted:
        return control.labels[0]
    if wanted not in control.labels:
        raise BadRequest(f"TINYSAM_BATCH_LABEL {wanted!r} is not a label of <{control.tag} name="
                         f"\"{control.name}\"> (its labels: {', '.join(control.labels)})")
    return wanted


def _region(control: Control, image_name: str, size: tuple[int, int], value: dict, label: str | None,
            score: float) -> dict:
    if control.tag.endswith("labels"):
        value[control.tag] = [label] if label else []
    width, height = size
    return {
        "id": uuid.uuid4().hex[:10],
        "from_name": control.name,
        "to_name": image_name,
        "type": control.result_type,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": value,
        "score": float(score),
        "readonly": False,
    }


def brush_region(mask: np.ndarray, control: Control, image_name: str, label: str | None,
                 score: float) -> dict:
    """One brush region: the mask in Label Studio's brush RLE."""
    height, width = mask.shape
    return _region(control, image_name, (width, height), {"format": "rle", "rle": mask_to_rle(mask)}, label, score)


def polygon_regions(mask: np.ndarray, control: Control, image_name: str, label: str | None,
                    score: float) -> list[dict]:
    """One closed polygon region per connected part of the mask larger than `polygons.MIN_PART_AREA` pixels, in
    percent of the image. Holes are filled: Label Studio polygons cannot express them (use brush masks where
    holes matter)."""
    height, width = mask.shape
    return [_region(control, image_name, (width, height),
                    {"points": [[x * 100.0 / width, y * 100.0 / height] for x, y in zip(part[0::2], part[1::2])],
                     "closed": True}, label, score)
            for part in mask_to_parts(mask)]


def mask_regions(mask: np.ndarray, control: Control, image_name: str, label: str | None,
                 score: float) -> list[dict]:
    """The regions one mask becomes on `control`: polygons for polygon controls, else one brush region."""
    if control.tag in POLYGON_TAGS:
        return polygon_regions(mask, control, image_name, label, score)
    return [brush_region(mask, control, image_name, label, score)]


def prompt_to_pixels(prompt: Prompt, height: int, width: int):
    points = [(x / 100.0 * width, y / 100.0 * height) for x, y in prompt.points]
    box = None
    if prompt.box is not None:
        x0, y0, x1, y1 = prompt.box
        box = (x0 / 100.0 * width, y0 / 100.0 * height, x1 / 100.0 * width, y1 / 100.0 * height)
    return points, list(prompt.point_labels), box


def fit_to(mask: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    """Resize a mask to the (width, height) Label Studio displays, when that differs from the file."""
    if size is None or (mask.shape[1], mask.shape[0]) == size:
        return mask
    import cv2

    return cv2.resize(mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)


class TinySamBackend:
    """Loads the model once and answers Label Studio's /predict payloads."""

    def __init__(self, settings: BackendSettings, predictor: TinySamPredictor | None = None,
                 fetcher: ImageFetcher | None = None) -> None:
        self.settings = settings
        if predictor is None:
            # the shared store: embeddings survive restarts and are shared with `ls-prelabel` and other processes
            predictor = TinySamPredictor.from_options(settings.engine_options(), cache_bytes=settings.cache_bytes,
                                                      store=policy.embedding_store())
        self.predictor = predictor
        self.model_choice = predictor.model_choice
        policy.announce(self.model_choice, lambda note: log.warning("model %s: %s", self.model_choice.requested, note))
        self.fetcher = fetcher or ImageFetcher(
            settings.label_studio_url, settings.label_studio_api_key, allowed_hosts=settings.allowed_hosts,
            local_files_root=settings.local_files_root, max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout)
        self.gate = ModelGate()
        self._image_locks: dict[str, list] = {}  # key -> [lock, users]
        self._image_locks_guard = threading.Lock()
        self.counters = {"interactive": 0, "batch_tasks": 0, "errors": 0, "encoder_runs": 0}
        self.preencoder = BackgroundEncoder(self.image_key, self.store_embedding, settings.preencode_queue)
        self.everything_params = policy.everything_params(predictor.model_name, settings.everything_explicit(),
                                                          prelabel=True)
        self.run_params = {**self.everything_params, "mode": settings.everything_mode,
                           "min_region_area": settings.min_region_area, "max_regions": settings.max_regions,
                           "label": settings.batch_label}
        # Label Studio skips tasks that have a prediction of the `model_version` /setup returns: it names the
        # model, engine, precision and every batch setting, so a run with other settings is not skipped.
        self.model_version = policy.run_identity(predictor.model_version, "everything", self.run_params)
        log.info("model %s (%s), model_version %s, everything mode %s", predictor.model_name,
                 predictor.model_version, self.model_version, self.run_params)

    def describe(self) -> dict:
        """The model actually serving, and why, and the embedding counters (for /health)."""
        store = self.predictor.store
        return {"model": self.predictor.model_name, "model_requested": self.model_choice.requested,
                "model_note": self.model_choice.note, "everything": self.run_params,
                "embeddings": {"store": str(store.root) if store is not None else None,
                               "encoder_runs": self.counters["encoder_runs"],
                               "background": self.preencoder.describe()}}

    def close(self) -> None:
        self.preencoder.close()
        self.fetcher.close()

    # ------------------------------------------------------------------ setup
    def setup(self, schema: str | None, hostname: str | None, access_token: str | None) -> dict:
        """Validate the project's config; learn where Label Studio is if the environment did not say."""
        if schema:
            try:
                config = parse_label_config(schema)
            except LabelConfigError as exc:
                raise BadRequest(str(exc)) from exc
            for warning in unmatched_prompt_labels(config):
                log.warning("label config: %s", warning)
        if not self.settings.label_studio_url and hostname:
            # No LABEL_STUDIO_URL: trust Label Studio's own idea of its URL and the creator's token.
            if not isinstance(hostname, str) or not hostname.startswith(("http://", "https://")):
                raise BadRequest(f"hostname must be an http(s) URL, got {hostname!r}")
            key = self.settings.label_studio_api_key or access_token or ""
            current_key = self.fetcher.auth.api_key if self.fetcher.auth is not None else None
            if hostname.rstrip("/") != self.fetcher.label_studio_url or key != current_key:
                self.fetcher.configure(hostname, key)
        return {"model_version": self.model_version}

    # ----------------------------------------------------------------- images
    def _image_url(self, task: dict, config: LabelConfig, image_name: str) -> str:
        data = task.get("data")
        if not isinstance(data, dict):
            raise BadRequest(f"task {task.get('id')!r} has no 'data' object")
        key = config.image_key(image_name)
        if key not in data:
            raise BadRequest(f"task {task.get('id')!r} data has no {key!r} field (the <Image value=\"${key}\">)")
        return data[key]

    def image_key(self, task: dict, url_value: str) -> str:
        """The cache and store key of a task's image: its resolved URL (no download)."""
        try:
            return self.fetcher.resolve(url_value, task.get("id"))
        except ImageFetchError as exc:
            raise BadRequest(str(exc), exc.status_code) from exc

    @contextmanager
    def _one_at_a_time(self, key: str) -> Iterator[None]:
        """Serialises the download and encoding of one image: whoever asks second (a click, the background
        encoder, a batch) finds it embedded instead of downloading it again."""
        with self._image_locks_guard:
            entry = self._image_locks.setdefault(key, [threading.Lock(), 0])
            entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._image_locks_guard:
                entry[1] -= 1
                if not entry[1]:
                    del self._image_locks[key]

    def _embedding(self, task: dict, url_value: str, interactive: bool) -> ImageEmbedding:
        """Embedding of a task's image from memory or the store; fetch and encode only on a miss."""
        key = self.image_key(task, url_value)
        cached = self.predictor.cached(key)  # no download for an image whose embedding is cached or stored
        if cached is not None:
            return cached
        with self._one_at_a_time(key):
            cached = self.predictor.cached(key)
            if cached is not None:
                return cached
            image = self.load_task_image(task, url_value)
            with self.gate.hold(interactive):
                self.counters["encoder_runs"] += 1
                return self.predictor.embed(image, key=key)

    def store_embedding(self, task: dict, url_value: str) -> bool:
        """Encode a task's image into the cache and the store unless it is there already, as batch work (a click
        overtakes it). True when the encoder ran."""
        key = self.image_key(task, url_value)
        if self.predictor.has_embedding(key=key):
            return False
        with self._one_at_a_time(key):
            if self.predictor.has_embedding(key=key):
                return False
            image = self.load_task_image(task, url_value)
            with self.gate.hold(False):
                self.counters["encoder_runs"] += 1
                self.predictor.embed(image, key=key)
                return True

    def preencode(self, tasks: list, label_config: str) -> int:
        """Queue the images of `tasks` (a TASKS_CREATED webhook, an opened task) for background encoding; returns
        how many were queued. Answers at once: downloads and encoding happen in the worker thread."""
        if not isinstance(tasks, list):
            raise BadRequest("'tasks' must be a list of task objects")
        try:
            config = parse_label_config(label_config)
        except LabelConfigError as exc:
            raise BadRequest(str(exc)) from exc
        return self.preencoder.submit(tasks, config)

    def load_task_image(self, task: dict, url_value: str) -> np.ndarray:
        try:
            data = self.fetcher.fetch(url_value, task.get("id"))
        except ImageFetchError as exc:
            raise BadRequest(str(exc), exc.status_code) from exc
        try:
            return load_image(data, name=str(url_value)[:200])
        except ImageError as exc:
            raise BadRequest(str(exc)) from exc

    # -------------------------------------------------------------- predicting
    def predict(self, tasks: list, label_config: str, context: Any = None) -> dict:
        """Answer of /predict: one prediction per task (interactive with a context, everything-mode without)."""
        if not isinstance(tasks, list) or not tasks:
            raise BadRequest("'tasks' must be a non-empty list of task objects")
        if len(tasks) > self.settings.max_tasks_per_request:
            raise BadRequest(f"{len(tasks)} tasks in one request; the limit is "
                             f"{self.settings.max_tasks_per_request}", 413)
        for n, task in enumerate(tasks):
            if not isinstance(task, dict):
                raise BadRequest(f"tasks[{n}] must be an object, got {type(task).__name__}")
        try:
            config = parse_label_config(label_config)
        except LabelConfigError as exc:
            raise BadRequest(str(exc)) from exc
        prompt = parse_context(context, config, self.settings.max_context_regions)
        if context is not None:
            # Label Studio only reads results[0] of an interactive answer: prompt the first task only.
            return {"results": [self.predict_interactive(tasks[0], config, prompt)],
                    "model_version": self.model_version}
        # An opened task (or "Retrieve predictions"): its clicks will want the embedding, so it is encoded and
        # stored in the background too, even when everything-mode fails or Label Studio stops waiting for it.
        self.preencoder.submit(tasks, config)
        results = [self.predict_batch_task(task, config) for task in tasks]
        return {"results": results, "model_version": self.model_version}

    def predict_interactive(self, task: dict, config: LabelConfig, prompt: Prompt | None) -> dict:
        if prompt is None or prompt.is_empty():
            # e.g. a smart brush stroke: answer with an empty suggestion rather than an error
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        control = config.output_for(prompt.image_name)
        label = prompt_label(control, prompt.label)
        state = self._embedding(task, self._image_url(task, config, prompt.image_name), interactive=True)
        height, width = state.original_size
        points, labels, box = prompt_to_pixels(prompt, height, width)
        try:
            with self.gate.hold(True):
                low_res, raw_iou = self.predictor.segment_logits(
                    np.asarray(points, dtype=np.float64) if points else None,
                    np.asarray(labels, dtype=np.int64) if points else None,
                    np.asarray(box, dtype=np.float64) if box is not None else None, image_embedding=state)
        except PromptError as exc:
            raise BadRequest(str(exc)) from exc
        # upsampling needs no model: it runs outside the gate, beside other annotators' decoder calls
        mask = fit_to(self.predictor.masks_from_low_res(low_res, state)[0], prompt.original_size)
        score = policy.report_score(raw_iou)
        regions = mask_regions(mask, control, prompt.image_name, label, score)
        self.counters["interactive"] += 1
        return {"result": regions, "score": score, "model_version": self.model_version}

    def predict_batch_task(self, task: dict, config: LabelConfig) -> dict | list:
        """Everything-mode prediction of one task for /predict.

        A task that fails gets an answer without 'result', and a task where nothing was found an empty list
        of predictions: Label Studio stores neither, so neither counts as done and the next "Retrieve
        predictions" (or opening the task) tries again, while the other tasks of the batch are stored.
        """
        try:
            prediction = self.everything(task, config)
        except BadRequest as exc:
            self.counters["errors"] += 1
            log.warning("task %s: %s", task.get("id"), exc)
            return {"error": str(exc), "model_version": self.model_version}
        return prediction if prediction["result"] else []

    def batch_image_name(self, config: LabelConfig) -> str:
        """The image that batch pre-labelling segments: the first one a brush or polygon control points at."""
        return next(name for name in config.images if any(name in c.to_name for c in config.outputs))

    def batch_image_url(self, task: dict, config: LabelConfig) -> str:
        """The resolved URL of the image a task's batch prediction segments (no download)."""
        return self.image_key(task, self._image_url(task, config, self.batch_image_name(config)))

    def everything(self, task: dict, config: LabelConfig) -> dict:
        """Everything-mode regions of one task (the best `max_regions`, near-whole-image masks dropped)."""
        from tinysam_kit.inference.everything import generate_everything

        image_name = self.batch_image_name(config)
        state = self._embedding(task, self._image_url(task, config, image_name), interactive=False)
        try:
            with self.gate.hold(False):
                records = generate_everything(self.predictor, mode=self.settings.everything_mode,
                                              image_embedding=state, output_mode="binary_mask",
                                              **self.everything_params)
        except PromptError as exc:
            raise BadRequest(str(exc)) from exc
        return self.prediction_from_records(records, config)

    def prediction_from_records(self, records: list[dict], config: LabelConfig) -> dict:
        """A task's batch prediction from its everything-mode records (binary masks): regions of the best
        `max_regions` at least `min_region_area` pixels, labelled with the batch label, scores in [0, 1]."""
        image_name = self.batch_image_name(config)
        control = config.output_for(image_name)
        label = batch_label(control, self.settings.batch_label)
        s = self.settings
        records = [r for r in records if int(r["area"]) >= s.min_region_area]
        records.sort(key=lambda r: float(r["predicted_iou"]), reverse=True)
        regions = [region for r in records[: s.max_regions]
                   for region in mask_regions(np.asarray(r["segmentation"], dtype=bool), control, image_name, label,
                                              policy.report_score(r["predicted_iou"]))]
        score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
        self.counters["batch_tasks"] += 1
        return {"result": regions, "score": score, "model_version": self.model_version}
