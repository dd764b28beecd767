"""Mask quality on held-out synthetic images, measured through the public predictor API.

A click is the pixel deepest inside the object (what an annotator aims for) or a uniformly random
object pixel; a box is the object's tight box. The mask kept is the one with the highest predicted
IoU, as `predict_best` does. Everything mode is judged by object recall at IoU ≥ 0.5.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from tinysam_kit.data.synthetic import SyntheticWorld
from tinysam_kit.training.supervised import HELD_OUT_START


def interior_point(mask: np.ndarray) -> tuple[float, float]:
    """The object pixel farthest from its boundary (x, y)."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, 5)[1:-1, 1:-1]
    y, x = np.unravel_index(int(np.argmax(dist)), dist.shape)
    return float(x), float(y)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


PROMPT_KINDS = ("point_center", "point_random", "box")


def _mean(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


@dataclass
class PromptQuality:
    """Per-object IoUs, in the same object order for every prompt kind; `shapes` names each object's
    shape and `areas` its pixel count, so the mean can be broken down where a model falls short."""

    point_center: list[float] = field(default_factory=list)
    point_random: list[float] = field(default_factory=list)
    box: list[float] = field(default_factory=list)
    shapes: list[str] = field(default_factory=list)
    areas: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {f"{k}_miou": _mean(getattr(self, k)) for k in PROMPT_KINDS} | {"objects": len(self.box)}

    def breakdown(self, area_edges: tuple[int, ...] = (1000, 3000)) -> dict[str, dict]:
        """Mean IoU of each prompt kind per object shape and per area class (pixels, split at `area_edges`)."""
        groups: dict[str, dict[str, np.ndarray]] = {"by_shape": {}, "by_area": {}}
        shapes, areas = np.array(self.shapes), np.array(self.areas)
        for shape in sorted(set(self.shapes)):
            groups["by_shape"][shape] = shapes == shape
        bounds = (0, *area_edges, None)
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            name = f"{lo}-{hi}" if hi is not None else f">={lo}"
            groups["by_area"][name] = (areas >= lo) & (areas < hi if hi is not None else True)
        return {group: {name: {f"{k}_miou": round(_mean(np.array(getattr(self, k))[sel]), 4) for k in PROMPT_KINDS}
                        | {"objects": int(sel.sum())} for name, sel in selections.items() if sel.any()}
                for group, selections in groups.items()}


def held_out_indices(count: int, start: int = 0) -> list[int]:
    return list(range(HELD_OUT_START + start, HELD_OUT_START + start + count))


def _best(masks: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return masks[np.arange(len(masks)), scores.argmax(axis=1)]


def evaluate_prompts(predictor, world: SyntheticWorld, indices, seed: int = 0) -> PromptQuality:
    """Per-object IoUs of one-click and box prompts on the given world images."""
    rng = np.random.default_rng(seed)
    quality = PromptQuality()
    for index in indices:
        sample = world[index]
        if len(sample.masks) == 0:
            continue
        state = predictor.embed(sample.image)
        gts = sample.masks
        center = np.array([[interior_point(m)] for m in gts], np.float32)
        random = np.array([[_random_pixel(rng, m)] for m in gts], np.float32)
        labels = np.ones((len(gts), 1), np.float32)
        for coords, out in ((center, quality.point_center), (random, quality.point_random)):
            masks, scores, _ = predictor.predict_batch(point_coords=coords, point_labels=labels,
                                                       image_embedding=state)
            out.extend(iou(m, g) for m, g in zip(_best(masks, scores), gts))
        masks, scores, _ = predictor.predict_batch(boxes=sample.boxes, image_embedding=state)
        quality.box.extend(iou(m, g) for m, g in zip(_best(masks, scores), gts))
        quality.shapes.extend(sample.kinds)
        quality.areas.extend(int(g.sum()) for g in gts)
    return quality


def _random_pixel(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def evaluate_everything(predictor, world: SyntheticWorld, indices, iou_threshold: float = 0.5,
                        **options) -> dict[str, float]:
    """Fraction of ground-truth objects that everything mode returns with IoU ≥ `iou_threshold`."""
    from tinysam_kit.inference.everything import generate_everything

    found = total = produced = 0
    for index in indices:
        sample = world[index]
        records = generate_everything(predictor, sample.image, output_mode="binary_mask", **options)
        produced += len(records)
        preds = [r["segmentation"] for r in records]
        for gt in sample.masks:
            total += 1
            if any(iou(p, gt) >= iou_threshold for p in preds):
                found += 1
    return {"recall": found / max(1, total), "objects": total, "masks": produced}
