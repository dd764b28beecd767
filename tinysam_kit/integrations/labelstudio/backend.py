"""The model side of the backend: Label Studio tasks and contexts in, brush predictions out.

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
import torch

from tinysam_kit.data.images import ImageError, load_image
from tinysam_kit.inference.encodings.labelstudio import mask_to_rle
from tinysam_kit.inference.predictor import (
    BEST_MULTIMASK,
    SINGLE_MASK_TOKENS,
    ImageEmbedding,
    PromptError,
    TinySamPredictor,
)
from tinysam_kit.integrations.labelstudio.fetch import ImageFetcher, ImageFetchError
from tinysam_kit.integrations.labelstudio.label_config import Control, LabelConfig, LabelConfigError, parse_label_config
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


def choose_label(control: Control, wanted: str | None, fallback: str = "") -> str | None:
    """The brush label for a region: the prompt's own label when the brush control has it."""
    if not control.labels:
        return wanted
    if wanted in control.labels:
        return wanted
    if fallback in control.labels:
        return fallback
    return control.labels[0]


def brush_region(mask: np.ndarray, control: Control, image_name: str, label: str | None,
                 score: float) -> dict:
    height, width = mask.shape
    value: dict[str, Any] = {"format": "rle", "rle": mask_to_rle(mask)}
    if control.tag == "brushlabels":
        value["brushlabels"] = [label] if label else []
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


def decode_prompt(predictor: TinySamPredictor, state: ImageEmbedding, points_px, labels, box_px):
    """Low-resolution logits (1, s, s) of TinySAM's answer to one smart-tool prompt, and its predicted IoU.

    A single click is ambiguous (part or whole?), so the best of the three multimask outputs is used;
    several clicks or a box pin the object down, where SAM's single-mask output is the better answer.
    """
    single_click = box_px is None and len(points_px) == 1
    coords, point_labels, boxes, _ = predictor.prepare_prompts(
        state,
        np.asarray(points_px, dtype=np.float64) if points_px else None,
        np.asarray(labels, dtype=np.int64) if points_px else None,
        np.asarray(box_px, dtype=np.float64) if box_px is not None else None)
    low_res, iou = predictor.decode(state, coords, point_labels, boxes, None,
                                    tokens=(BEST_MULTIMASK,) if single_click else SINGLE_MASK_TOKENS)
    return low_res[0], float(iou[0, 0])


def full_mask(predictor: TinySamPredictor, state: ImageEmbedding, low_res: torch.Tensor) -> np.ndarray:
    """Upsample only the chosen mask, only where it can be true: it needs no model, so it runs outside
    the model gate, in parallel with other annotators' decoder calls."""
    return predictor.masks_from_low_res(low_res, state)[0]


def segment(predictor: TinySamPredictor, state: ImageEmbedding, points_px, labels, box_px):
    """Full-resolution mask and predicted IoU for one smart-tool prompt (what a click is answered with)."""
    low_res, score = decode_prompt(predictor, state, points_px, labels, box_px)
    return full_mask(predictor, state, low_res), score


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
            predictor = TinySamPredictor.from_pretrained(
                settings.model, engine=settings.engine, precision=settings.precision, device=settings.device,
                threads=settings.threads or None, cache_bytes=settings.cache_bytes)
        self.predictor = predictor
        self.fetcher = fetcher or ImageFetcher(
            settings.label_studio_url, settings.label_studio_api_key, allowed_hosts=settings.allowed_hosts,
            local_files_root=settings.local_files_root, max_bytes=settings.max_image_bytes,
            timeout=settings.fetch_timeout)
        self.gate = ModelGate()
        self.counters = {"interactive": 0, "batch_tasks": 0, "errors": 0}

    @property
    def model_version(self) -> str:
        return self.predictor.model_version

    def close(self) -> None:
        self.fetcher.close()

    # ------------------------------------------------------------------ setup
    def setup(self, schema: str | None, hostname: str | None, access_token: str | None) -> dict:
        """Validate the project's config; learn where Label Studio is if the environment did not say."""
        if schema:
            try:
                parse_label_config(schema)
            except LabelConfigError as exc:
                raise BadRequest(str(exc)) from exc
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

    def _embedding(self, task: dict, url_value: str, interactive: bool) -> ImageEmbedding:
        """Cached embedding of a task's image, keyed by its URL; fetch and encode only on a miss."""
        try:
            key = self.fetcher.resolve(url_value, task.get("id"))
        except ImageFetchError as exc:
            raise BadRequest(str(exc), exc.status_code) from exc
        # TinySamPredictor.embed keys user-supplied cache keys as "user:<key>"; looking it up first avoids
        # downloading an image whose embedding is already cached.
        cached = self.predictor.cache.get(f"user:{key}")
        if cached is not None:
            return cached
        image = self.load_task_image(task, url_value)
        with self.gate.hold(interactive):
            # another request may have encoded the same image while this one was downloading it
            return self.predictor.cache.get(f"user:{key}") or self.predictor.embed(image, key=key)

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
        try:
            from tinysam_kit.inference.everything import generate_everything  # noqa: F401
        except ImportError as exc:
            raise BadRequest(f"batch pre-labelling needs everything mode, which is not available here ({exc})",
                             503) from exc
        results = [self.predict_batch_task(task, config) for task in tasks]
        return {"results": results, "model_version": self.model_version}

    def predict_interactive(self, task: dict, config: LabelConfig, prompt: Prompt | None) -> dict:
        if prompt is None or prompt.is_empty():
            # e.g. a smart brush stroke: answer with an empty suggestion rather than an error
            return {"result": [], "score": 0.0, "model_version": self.model_version}
        control = config.brush_for(prompt.image_name)
        state = self._embedding(task, self._image_url(task, config, prompt.image_name), interactive=True)
        height, width = state.original_size
        points, labels, box = prompt_to_pixels(prompt, height, width)
        try:
            with self.gate.hold(True):
                low_res, score = decode_prompt(self.predictor, state, points, labels, box)
        except PromptError as exc:
            raise BadRequest(str(exc)) from exc
        mask = fit_to(full_mask(self.predictor, state, low_res), prompt.original_size)
        label = choose_label(control, prompt.label)
        region = brush_region(mask, control, prompt.image_name, label, score)
        self.counters["interactive"] += 1
        return {"result": [region], "score": score, "model_version": self.model_version}

    def predict_batch_task(self, task: dict, config: LabelConfig) -> dict:
        """Everything-mode regions for one task; a task that fails gets an answer without 'result',
        which Label Studio skips (so "Retrieve predictions" retries it later) instead of failing all."""
        try:
            return self.everything(task, config)
        except BadRequest as exc:
            self.counters["errors"] += 1
            log.warning("task %s: %s", task.get("id"), exc)
            return {"error": str(exc), "model_version": self.model_version}

    def everything(self, task: dict, config: LabelConfig) -> dict:
        from tinysam_kit.inference.everything import generate_everything

        image_name = next(name for name in config.images if any(name in b.to_name for b in config.brushes))
        control = config.brush_for(image_name)
        state = self._embedding(task, self._image_url(task, config, image_name), interactive=False)
        s = self.settings
        try:
            with self.gate.hold(False):
                records = generate_everything(
                    self.predictor, mode=s.everything_mode, image_embedding=state, output_mode="binary_mask",
                    points_per_side=s.points_per_side, pred_iou_thresh=s.pred_iou_thresh,
                    stability_score_thresh=s.stability_score_thresh)
        except PromptError as exc:
            raise BadRequest(str(exc)) from exc
        records = [r for r in records if int(r["area"]) >= s.min_region_area]
        records.sort(key=lambda r: float(r["predicted_iou"]), reverse=True)
        records = records[: s.max_regions]
        label = choose_label(control, s.batch_label or None)
        regions = [brush_region(np.asarray(r["segmentation"], dtype=bool), control, image_name, label,
                                float(r["predicted_iou"])) for r in records]
        score = float(np.mean([r["score"] for r in regions])) if regions else 0.0
        self.counters["batch_tasks"] += 1
        return {"result": regions, "score": score, "model_version": self.model_version}
