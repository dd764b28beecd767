"""COCO run-length encodings of binary masks (column-major, as pycocotools and SAM use them)."""

from __future__ import annotations

import numpy as np


def masks_to_uncompressed_rle(masks) -> list[dict]:
    """(N, H, W) bool array or tensor → [{"size": [H, W], "counts": [...]}], runs of 0s first (maybe empty)."""
    masks = masks.numpy() if hasattr(masks, "numpy") else np.asarray(masks)
    n, h, w = masks.shape
    out = []
    for mask in masks:
        edges = column_major_changes(mask) + 1
        counts = np.diff(np.concatenate(([0], edges, [h * w])))
        if mask.size and mask[0, 0]:
            counts = np.concatenate(([0], counts))
        out.append({"size": [h, w], "counts": counts.tolist()})
    return out


def column_major_changes(mask: np.ndarray) -> np.ndarray:
    """Positions i of the column-major flattening with flat[i] != flat[i + 1], ascending, without making
    that (transposed) copy: changes down each column, plus from a column's last pixel to the next one's
    first. Comparing rows of the row-major mask is several times faster than transposing 12 megapixels."""
    h, w = mask.shape
    rows, cols = np.divmod(np.flatnonzero(mask[1:] != mask[:-1]), w)
    within = cols * h + rows
    across = np.flatnonzero(mask[-1, :-1] != mask[0, 1:]).astype(np.int64) * h + (h - 1)
    return np.sort(np.concatenate([within, across]))


def mask_to_uncompressed_rle(mask: np.ndarray) -> dict:
    return masks_to_uncompressed_rle(np.asarray(mask, dtype=bool)[None])[0]


def uncompressed_rle_to_mask(rle: dict) -> np.ndarray:
    h, w = rle["size"]
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"RLE counts sum to {counts.sum()}, expected {h * w} for size {h}×{w}")
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    return flat.reshape(w, h).T.copy()


def rle_area(rle: dict) -> int:
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        counts = decode_counts(counts)
    return int(sum(counts[1::2]))


def encode_counts(counts) -> str:
    """pycocotools' compressed counts string: 5-bit groups, +48, with differences from the run 2 back."""
    out = []
    for i, value in enumerate(counts):
        x = int(value)
        if i > 2:
            x -= int(counts[i - 2])
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = not ((c & 0x10) == 0 and x == 0) and not ((c & 0x10) != 0 and x == -1)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_counts(s: str | bytes) -> list[int]:
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            c = ord(s[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def to_coco_rle(rle: dict) -> dict:
    """Uncompressed → compressed COCO RLE ({"size": [H, W], "counts": str}), as pycocotools writes JSON."""
    return {"size": list(rle["size"]), "counts": encode_counts(rle["counts"])}


def coco_rle_to_mask(rle: dict) -> np.ndarray:
    """Compressed or uncompressed COCO RLE → H×W bool mask."""
    counts = rle["counts"]
    if isinstance(counts, (str, bytes)):
        rle = {"size": rle["size"], "counts": decode_counts(counts)}
    return uncompressed_rle_to_mask(rle)


def mask_to_coco_rle(mask: np.ndarray) -> dict:
    return to_coco_rle(mask_to_uncompressed_rle(mask))


def with_binary_masks(records: list[dict]) -> list[dict]:
    """Everything-mode records whose `segmentation` is RLE (compressed or not), as records with H×W bool
    masks (what the "binary_mask" output mode gives)."""
    return [{**r, "segmentation": coco_rle_to_mask(r["segmentation"])} for r in records]
