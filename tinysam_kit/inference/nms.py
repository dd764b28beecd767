"""Box utilities for everything mode with torchvision's exact NMS semantics (no torchvision needed)."""

from __future__ import annotations

import numpy as np
import torch

# torchvision.ops.batched_nms switches to its per-category path above this many CPU box coordinates.
_VANILLA_PATH_NUMEL = 4000


def masks_to_boxes(masks) -> torch.Tensor:
    """(N, H, W) bool array/tensor → (N, 4) int64 inclusive XYXY tight boxes; empty masks give [0, 0, 0, 0]."""
    masks = masks.numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64)
    rows = masks.any(axis=2)
    cols = masks.any(axis=1)
    top = rows.argmax(axis=1)
    bottom = h - 1 - rows[:, ::-1].argmax(axis=1)
    left = cols.argmax(axis=1)
    right = w - 1 - cols[:, ::-1].argmax(axis=1)
    boxes = np.stack([left, top, right, bottom], axis=1).astype(np.int64)
    boxes[~rows.any(axis=1)] = 0
    return torch.from_numpy(boxes)


def nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Greedy NMS, float32 IoU as torchvision computes it; keep order = descending score."""
    if boxes.shape[0] == 0:
        return torch.zeros((0,), dtype=torch.int64)
    b = boxes.to(torch.float32).numpy()
    x1, y1, x2, y2 = b[:, 0], b[:, 1], b[:, 2], b[:, 3]
    areas = (x2 - x1) * (y2 - y1)
    order = torch.sort(scores, stable=True, descending=True).indices.numpy()
    suppressed = np.zeros(len(order), dtype=bool)
    keep = []
    thr = np.float32(iou_threshold)
    for pos, i in enumerate(order):
        if suppressed[i]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        rest = rest[~suppressed[rest]]
        if rest.size == 0:
            continue
        w = np.maximum(np.float32(0), np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]))
        h = np.maximum(np.float32(0), np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]))
        inter = w * h
        with np.errstate(invalid="ignore", divide="ignore"):
            ovr = inter / (areas[i] + areas[rest] - inter)
        suppressed[rest[ovr > thr]] = True
    return torch.as_tensor(np.array(keep, dtype=np.int64))


def single_class_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """`torchvision.ops.batched_nms(boxes, scores, zeros, thr)`, including its large-input path's re-sort."""
    keep = nms(boxes, scores, iou_threshold)
    if boxes.numel() > _VANILLA_PATH_NUMEL:
        keep = torch.sort(keep).values
        keep = keep[scores[keep].sort(descending=True)[1]]
    return keep
