"""Prompt sampling for training: clicks inside objects, jittered boxes, corrective clicks on errors.

All functions take an explicit numpy Generator so a training step's prompts are a pure function of
(seed, step) and a resumed run sees exactly the prompts an uninterrupted one would.
"""

from __future__ import annotations

import numpy as np


def sample_point(rng: np.random.Generator, mask: np.ndarray) -> tuple[float, float]:
    """A uniformly random pixel of `mask` as (x, y); SAM samples its training clicks the same way."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("cannot sample a point from an empty mask")
    i = int(rng.integers(len(xs)))
    return float(xs[i]), float(ys[i])


def jitter_box(rng: np.random.Generator, box: np.ndarray, size: tuple[int, int], scale: float = 0.1,
               max_shift: float = 20.0) -> np.ndarray:
    """SAM's box noise: each side moves by N(0, scale * side length), at most `max_shift` pixels."""
    x0, y0, x1, y1 = (float(v) for v in box)
    w, h = x1 - x0, y1 - y0
    noise = rng.normal(0.0, 1.0, 4) * scale * np.array([w, h, w, h])
    noise = np.clip(noise, -max_shift, max_shift)
    out = np.array([x0, y0, x1, y1]) + noise
    height, width = size
    out[[0, 2]] = np.clip(out[[0, 2]], 0, width - 1)
    out[[1, 3]] = np.clip(out[[1, 3]], 0, height - 1)
    if out[2] < out[0]:
        out[[0, 2]] = out[[2, 0]]
    if out[3] < out[1]:
        out[[1, 3]] = out[[3, 1]]
    return out.astype(np.float32)


def correction_click(rng: np.random.Generator, predicted: np.ndarray, target: np.ndarray
                     ) -> tuple[tuple[float, float], int] | None:
    """SAM's iterative training click: uniformly from the error region, positive on a missed pixel,
    negative on a false positive (the larger kind of error wins). None when the mask is perfect."""
    missed = target & ~predicted
    extra = predicted & ~target
    if not missed.any() and not extra.any():
        return None
    region, label = (missed, 1) if missed.sum() >= extra.sum() else (extra, 0)
    return sample_point(rng, region), label


def disagreement_click(rng: np.random.Generator, student: np.ndarray, teacher: np.ndarray
                       ) -> tuple[tuple[float, float], int] | None:
    """TinySAM's online hard prompt sampling: a new click where the student still disagrees with the
    teacher, labelled with the teacher's answer there."""
    diff = student ^ teacher
    if not diff.any():
        return None
    x, y = sample_point(rng, diff)
    return (x, y), int(teacher[int(y), int(x)])
