"""Everything-mode post-processing in PyTorch on the engine's device, so that only compact results leave it.

On a GPU the decoder's low-resolution logits stay where they were made: the resize to the user's image, the
stability score, the stage-1 coverage map, the binary masks, their boxes and the run-length change points
are computed there, and what is copied to the host is one float per mask, four box coordinates per mask and
the positions where each mask's column-major pixels change value. The functions work on any device; on the
CPU they give exactly what the host path (`upsampling`, `nms.masks_to_boxes`, `encodings.coco`) gives, which
is how they are tested here.
"""

from __future__ import annotations

import torch

from tinysam_kit.inference.upsampling import resize_logits
from tinysam_kit.runtime.base import EngineInfo

# Full-resolution float32 logits of one chunk of masks on the device, in pixels (256 MiB, plus one byte per
# pixel for each boolean temporary): large enough to keep a GPU busy with a whole prompt batch of 1024-px
# images, small enough for any card this runs on.
DEVICE_PIXEL_BUDGET = 64 * 1024 * 1024


def masks_per_chunk(img_size: int, original_size: tuple[int, int], budget: int = DEVICE_PIXEL_BUDGET) -> int:
    """How many masks one chunk may hold: their logits exist at the padded input size and at the image size."""
    h, w = original_size
    return max(1, budget // max(h * w, img_size * img_size))


def coverage_map(size: tuple[int, int], info: EngineInfo) -> torch.Tensor:
    """An all-false bool map of the image where a PyTorch engine's logits are (ONNX Runtime returns host
    arrays whatever its provider)."""
    device = torch.device(info.device) if info.engine == "torch" else torch.device("cpu")
    return torch.zeros(size, dtype=torch.bool, device=device)


def on_host(coverage: torch.Tensor):
    """The coverage map as a NumPy array (stage 2 proposes its points from it once per image)."""
    return coverage.cpu().numpy()


def stability_and_masks(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                        original_size: tuple[int, int], offset: float, stability_thresh: float,
                        union: torch.Tensor | None = None, high_score_thresh: float = 0.0
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's stability score of every (s, s) logit map at full resolution (host float32 tensor) and the
    binary masks of those scoring at least `stability_thresh` (device bool tensor, in order); `union` (a
    device bool map of the image) gains their pixels above `high_score_thresh`."""
    logits = resize_logits(low_res, img_size, input_size, original_size)
    inter = (logits > offset).sum(dim=(1, 2), dtype=torch.int64)
    outer = (logits > -offset).sum(dim=(1, 2), dtype=torch.int64)
    # float32 ratio of pixel counts, as SAM and the host path compute it (0/0 gives NaN there too)
    stability = (inter.to(torch.float32) / outer.to(torch.float32)).cpu()
    passing = stability >= stability_thresh if stability_thresh > 0.0 else torch.ones_like(stability, dtype=torch.bool)
    kept = logits[passing.to(logits.device)]
    if union is not None and kept.shape[0]:
        union |= (kept > high_score_thresh).any(dim=0).to(union.device)
    return stability, kept > 0.0


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool tensor on any device → (N, 4) int64 inclusive XYXY boxes on the host; empty masks give
    [0, 0, 0, 0] (the host path's convention)."""
    n, h, w = masks.shape
    if n == 0:
        return torch.zeros((0, 4), dtype=torch.int64)
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    row_ids = torch.arange(h, device=masks.device)
    col_ids = torch.arange(w, device=masks.device)
    top = torch.where(rows, row_ids, h).amin(dim=1)
    bottom = torch.where(rows, row_ids, -1).amax(dim=1)
    left = torch.where(cols, col_ids, w).amin(dim=1)
    right = torch.where(cols, col_ids, -1).amax(dim=1)
    boxes = torch.stack([left, top, right, bottom], dim=1)
    boxes[~rows.any(dim=1)] = 0
    return boxes.cpu()


def pad_to(masks: torch.Tensor, keep: torch.Tensor, full_size: tuple[int, int], x0: int, y0: int
           ) -> torch.Tensor:
    """The crop masks selected by the host bool tensor `keep`, placed at (x0, y0) in an all-false image of
    `full_size`."""
    kept = masks[keep.to(masks.device)]
    n, h, w = kept.shape
    out = torch.zeros((n, *full_size), dtype=torch.bool, device=masks.device)
    out[:, y0 : y0 + h, x0 : x0 + w] = kept
    return out


def masks_to_uncompressed_rle(masks: torch.Tensor) -> list[dict]:
    """(N, H, W) bool tensor on any device → COCO uncompressed RLEs, equal to
    `encodings.coco.masks_to_uncompressed_rle`; only the change points and first pixels are copied to the host."""
    n, h, w = masks.shape
    if n == 0:
        return []
    flat = masks.transpose(1, 2).reshape(n, h * w)  # column-major, as COCO counts run
    changes = (flat[:, 1:] != flat[:, :-1]).nonzero().cpu()
    first = flat[:, 0].cpu().tolist()
    per_mask = torch.bincount(changes[:, 0], minlength=n).tolist()
    edges = (changes[:, 1] + 1).split(per_mask)
    out = []
    for starts_true, mask_edges in zip(first, edges):
        bounds = torch.cat([torch.zeros(1, dtype=torch.int64), mask_edges, torch.tensor([h * w])])
        counts = bounds.diff().tolist()
        out.append({"size": [h, w], "counts": [0, *counts] if starts_true else counts})
    return out
