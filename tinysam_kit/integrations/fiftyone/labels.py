"""Between TinySAM's outputs and FiftyOne labels: prompts in, `Detections` with instance masks (or filled
`Polylines`) out.

FiftyOne stores an instance mask cropped to its detection's box (relative [x, y, w, h]); we crop every
mask to its own tight box so the App draws it pixel-exact, whatever prompt produced it.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np

from tinysam_kit.inference.encodings.polygons import mask_to_parts
from tinysam_kit.inference.policy import report_score
from tinysam_kit.inference.predictor import PromptError, TinySamPredictor

# Decoder batches are chunked so that B prompts' full-resolution float32 masks (3 per prompt at most) stay
# below this.
PROMPT_BATCH_BYTES = 256 * 1024 * 1024
# How dataset-wide runs and `TinySamModel` write their masks: the FiftyOne label type of each.
OUTPUTS = {"detections": "Detections", "polylines": "Polylines"}
# FiftyOne's SAM integration reads per-point positive/negative labels from these keypoint attributes.
POINT_LABEL_ATTRIBUTES = ("sam_labels", "sam2_labels")


@dataclass
class Prompt:
    """One object to segment: a box (pixels XYXY) and/or points (pixels) with 1/0 labels."""

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    label: str | None = None
    source_id: str | None = None


@dataclass
class MaskResult:
    mask: np.ndarray  # full-image bool
    score: float
    label: str | None = None
    source_id: str | None = None
    attributes: dict = field(default_factory=dict)


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive pixel bounds (x0, y0, x1, y1) of the True pixels, None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])


def mask_to_detection(mask: np.ndarray, *, label: str | None, confidence: float | None,
                      mask_path: str | None = None, **attributes):
    """A `fo.Detection` whose mask is `mask` cropped to its tight box; None when the mask is empty.

    With `mask_path` the crop is written there as an 8-bit PNG (0/255) and only the path is stored,
    which keeps documents small for dataset-wide runs.
    """
    import fiftyone as fo

    bounds = tight_box(mask)
    if bounds is None:
        return None
    x0, y0, x1, y1 = bounds
    h, w = mask.shape
    crop = np.ascontiguousarray(mask[y0 : y1 + 1, x0 : x1 + 1])
    box = [x0 / w, y0 / h, (x1 - x0 + 1) / w, (y1 - y0 + 1) / h]
    kwargs = {"label": label, "bounding_box": box, "confidence": confidence, **attributes}
    if mask_path is not None:
        write_mask_png(crop, mask_path)
        return fo.Detection(mask_path=mask_path, **kwargs)
    return fo.Detection(mask=crop, **kwargs)


def write_mask_png(mask: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(tmp)
    os.replace(tmp, path)  # a reader never sees a half-written file


def results_to_detections(results: list[MaskResult], mask_dir: str | None = None):
    """`fo.Detections` for the non-empty masks, in the given order (mask files `<mask_dir>/<i>.png`)."""
    import fiftyone as fo

    detections = []
    for result in results:
        path = os.path.join(mask_dir, f"{len(detections)}.png") if mask_dir else None
        attributes = dict(result.attributes)
        if result.source_id is not None:
            attributes["prompt_id"] = result.source_id
        det = mask_to_detection(result.mask, label=result.label, confidence=result.score, mask_path=path,
                                **attributes)
        if det is not None:
            detections.append(det)
    return fo.Detections(detections=detections)


def results_to_polylines(results: list[MaskResult]):
    """`fo.Polylines`: one closed, filled `Polyline` per connected part of each mask (holes filled, specks
    dropped: `mask_to_parts`), in relative coordinates, with the label, confidence and attributes the
    detection would have."""
    import fiftyone as fo

    polylines = []
    for result in results:
        h, w = result.mask.shape
        attributes = dict(result.attributes)
        if result.source_id is not None:
            attributes["prompt_id"] = result.source_id
        for part in mask_to_parts(result.mask):
            points = [(x / w, y / h) for x, y in zip(part[0::2], part[1::2])]
            polylines.append(fo.Polyline(label=result.label, points=[points], closed=True, filled=True,
                                         confidence=result.score, **attributes))
    return fo.Polylines(polylines=polylines)


def results_to_labels(results: list[MaskResult], output: str = "detections", mask_dir: str | None = None):
    """The results as the `output` label type (see OUTPUTS)."""
    if output == "polylines":
        return results_to_polylines(results)
    return results_to_detections(results, mask_dir)


def label_count(labels) -> int:
    """How many objects a `Detections` / `Polylines` value holds."""
    return len(labels.polylines if hasattr(labels, "polylines") else labels.detections)


def instance_map(results: list[MaskResult], shape: tuple[int, int], mask_path: str | None = None):
    """`fo.Segmentation` whose pixel value k is the k-th result (1-based; 0 = background).

    Painted from the last result to the first so that, where masks overlap, the earlier (better-scored)
    one is visible.
    """
    import fiftyone as fo

    kept = [r for r in results if r.mask.any()]
    dtype = np.uint8 if len(kept) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for k in range(len(kept), 0, -1):
        out[kept[k - 1].mask] = k
    if mask_path is not None:
        from PIL import Image

        os.makedirs(os.path.dirname(mask_path) or ".", exist_ok=True)
        tmp = f"{mask_path}.tmp{os.getpid()}.png"
        Image.fromarray(out).save(tmp)
        os.replace(tmp, mask_path)
        return fo.Segmentation(mask_path=mask_path)
    return fo.Segmentation(mask=out)


# ------------------------------------------------------------------ prompts from FiftyOne labels
def _abs_box(bounding_box, width: int, height: int, where: str) -> np.ndarray:
    try:
        x, y, w, h = (float(v) for v in bounding_box)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{where}: bounding_box must be 4 numbers [x, y, w, h], got {bounding_box!r}") from exc
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        raise PromptError(f"{where}: bounding_box contains NaN or infinite values")
    box = np.array([x * width, y * height, (x + w) * width, (y + h) * height], dtype=np.float64)
    # Relative boxes that touch the border come back a hair outside it after the float round trip.
    tol = 1e-6 * max(width, height)
    limits = np.array([width, height, width, height], dtype=np.float64)
    return np.where((box > limits) & (box <= limits + tol), limits, np.where((box < 0) & (box >= -tol), 0, box))


def box_prompts(detections, width: int, height: int, field_name: str = "boxes") -> list[Prompt]:
    """One prompt per `Detection` (its label and id carried through)."""
    prompts = []
    for i, det in enumerate(getattr(detections, "detections", None) or []):
        where = f"{field_name}[{i}]" + (f" ({det.label})" if det.label else "")
        prompts.append(Prompt(box=_abs_box(det.bounding_box, width, height, where), label=det.label,
                              source_id=det.id))
    return prompts


def _point_labels(keypoint, n: int, where: str, label_attribute: str | None) -> np.ndarray:
    names = (label_attribute,) if label_attribute else POINT_LABEL_ATTRIBUTES
    values = None
    for name in names:
        if name in keypoint and keypoint[name] is not None:
            values = keypoint[name]
            break
    if values is None:
        return np.ones(n, dtype=np.float64)  # FiftyOne's convention: unlabeled points are positive
    try:
        arr = np.asarray(values, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{where}: point labels must be numbers 0/1, got {values!r}") from exc
    if arr.size != n:
        raise PromptError(f"{where}: {arr.size} point labels for {n} points")
    if not np.isin(arr, (0, 1)).all():
        raise PromptError(f"{where}: point labels must be 1 (foreground) or 0 (background), got {values!r}")
    return arr


def point_prompts(keypoints, width: int, height: int, field_name: str = "points",
                  label_attribute: str | None = None) -> list[Prompt]:
    """One prompt per `Keypoint`; NaN points (FiftyOne's "not visible") are dropped."""
    prompts = []
    for i, kp in enumerate(getattr(keypoints, "keypoints", None) or []):
        where = f"{field_name}[{i}]" + (f" ({kp.label})" if kp.label else "")
        try:
            pts = np.asarray(kp.points, dtype=np.float64).reshape(-1, 2)
        except (TypeError, ValueError) as exc:
            raise PromptError(f"{where}: points must be [[x, y], ...] in [0, 1], got {kp.points!r}") from exc
        labels = _point_labels(kp, len(pts), where, label_attribute)
        visible = ~np.isnan(pts).any(axis=1)
        if not visible.any():
            raise PromptError(f"{where}: every point is NaN (not visible); nothing to prompt with")
        pts, labels = pts[visible], labels[visible]
        prompts.append(Prompt(points=pts * np.array([[width, height]]), point_labels=labels, label=kp.label,
                              source_id=kp.id))
    return prompts


def combine_prompts(boxes: list[Prompt], points: list[Prompt]) -> list[Prompt]:
    """Boxes alone, points alone, or box i refined by keypoint i (FiftyOne SAM's pairing)."""
    if not boxes or not points:
        return boxes or points
    if len(boxes) != len(points):
        raise PromptError(f"box and point prompts are paired by position: got {len(boxes)} boxes and "
                          f"{len(points)} keypoints; use one prompt field or make the counts match")
    return [Prompt(box=b.box, points=p.points, point_labels=p.point_labels, label=b.label or p.label,
                   source_id=b.source_id) for b, p in zip(boxes, points)]


def segment_prompts(predictor: TinySamPredictor, state, prompts: list[Prompt]) -> list[MaskResult]:
    """Every prompt answered as the predictor answers it alone (`TinySamPredictor.segment`: one mask rule
    everywhere); score in [0, 1], the raw predicted IoU kept as the `predicted_iou` attribute.

    Prompts of the same shape go through the decoder together, in chunks bounded in memory.
    """
    results: list[MaskResult | None] = [None] * len(prompts)
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(prompts):
        if p.box is None and p.points is None:
            raise PromptError(f"prompt {i} has neither a box nor points")
        groups.setdefault((p.box is not None, None if p.points is None else len(p.points)), []).append(i)
    h, w = state.original_size
    chunk = max(1, PROMPT_BATCH_BYTES // (3 * 4 * h * w))
    for (has_box, n_points), members in groups.items():
        for start in range(0, len(members), chunk):
            idx = members[start : start + chunk]
            kwargs = {}
            if has_box:
                kwargs["boxes"] = np.stack([prompts[i].box for i in idx])
            if n_points is not None:
                kwargs["point_coords"] = np.stack([prompts[i].points for i in idx])
                kwargs["point_labels"] = np.stack([prompts[i].point_labels for i in idx])
            masks, scores, raw = predictor.segment_batch(image_embedding=state, **kwargs)
            for row, i in enumerate(idx):
                results[i] = MaskResult(masks[row], float(scores[row]), prompts[i].label, prompts[i].source_id,
                                        attributes={"predicted_iou": float(raw[row])})
    return results


def everything_results(records: list[dict], label: str) -> list[MaskResult]:
    """`generate_everything` records (binary masks, best first) as results; score in [0, 1], the raw
    predicted IoU kept as the `predicted_iou` attribute."""
    return [MaskResult(np.asarray(r["segmentation"], dtype=bool), report_score(r["predicted_iou"]), label,
                       attributes={"predicted_iou": float(r["predicted_iou"]),
                                   "stability_score": float(r["stability_score"]), "area": int(r["area"])})
            for r in records]
