"""Masks as polygons (outer contours and holes), for tools that store vector regions."""

from __future__ import annotations

import cv2
import numpy as np

# Douglas-Peucker tolerance in pixels: rasterised back, the polygons of a mask cover it at IoU >= 0.95, also for
# ragged masks (tests/test_encodings_coco.py; `python benchmarks/bench_polygons.py` prints IoU and sizes).
DEFAULT_TOLERANCE = 0.5
# Parts smaller than this many pixels are specks, not objects: they get no polygon.
MIN_PART_AREA = 16.0


def mask_to_polygons(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE, min_area: float = 1.0,
                     include_holes: bool = False) -> list[list[float]]:
    """Contours of a bool mask as flat [x0, y0, x1, y1, ...] pixel-coordinate lists (COCO polygon style).

    `tolerance` is the Douglas-Peucker simplification in pixels (0 keeps every boundary vertex); polygons
    enclosing less than `min_area` pixels are dropped. Holes come after the outer contours when requested.
    """
    mask = np.ascontiguousarray(mask, dtype=np.uint8)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    mode = cv2.RETR_CCOMP if include_holes else cv2.RETR_EXTERNAL
    contours, _ = cv2.findContours(mask, mode, cv2.CHAIN_APPROX_SIMPLE)
    polygons = []
    for contour in contours:
        if tolerance > 0:
            contour = cv2.approxPolyDP(contour, tolerance, True)
        if len(contour) < 3 or cv2.contourArea(contour) < min_area:
            continue
        polygons.append(contour.reshape(-1, 2).astype(float).ravel().tolist())
    return polygons


def polygons_to_mask(polygons: list[list[float]], height: int, width: int) -> np.ndarray:
    """Rasterise flat polygons (even-odd filling, so holes listed after their outer contour stay empty)."""
    canvas = np.zeros((height, width), np.uint8)
    for poly in polygons:
        pts = np.round(np.asarray(poly, dtype=np.float64).reshape(-1, 2)).astype(np.int32)
        layer = np.zeros_like(canvas)
        cv2.fillPoly(layer, [pts], 1)
        canvas ^= layer
    return canvas.astype(bool)


def mask_to_relative_polygons(mask: np.ndarray, **kwargs) -> list[list[tuple[float, float]]]:
    """Polygons as (x, y) pairs in [0, 1] relative to the image size (FiftyOne `Polyline` convention)."""
    h, w = mask.shape
    return [[(x / w, y / h) for x, y in zip(p[0::2], p[1::2])] for p in mask_to_polygons(mask, **kwargs)]


def mask_to_parts(mask: np.ndarray, tolerance: float = DEFAULT_TOLERANCE,
                  min_area: float = MIN_PART_AREA) -> list[list[float]]:
    """One closed polygon per connected part of the mask (flat pixel lists), largest part first.

    Holes are filled: COCO polygons, Label Studio polygon regions and filled FiftyOne polylines cannot express
    them (use RLE masks or brush regions where holes matter).
    """
    parts = mask_to_polygons(mask, tolerance=tolerance, min_area=min_area, include_holes=False)
    return sorted(parts, key=lambda p: -cv2.contourArea(np.asarray(p, np.float32).reshape(-1, 1, 2)))
