"""A seeded synthetic world: images full of objects with exact instance masks.

No real data can be downloaded on the build machines, so training and quality tests use this world.
Each image is a pure function of (world seed, index): any image can be regenerated on any machine,
and held-out evaluation images are simply indices the training run never draws.

Objects are filled or textured shapes (ellipses, rotated rectangles, polygons and stars, rings with
holes, thin crosses and L-shapes), placed with bounded mutual occlusion on a cluttered background.
Ground truth is the *visible* part of each object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

SHAPES = ("ellipse", "rectangle", "polygon", "star", "ring", "cross", "ell")
FILLS = ("solid", "stripes", "checker", "gradient", "noise")


@dataclass(frozen=True)
class WorldConfig:
    size: int = 256
    min_objects: int = 3
    max_objects: int = 7
    min_extent: int = 44  # longest side of an object's bounding box, pixels
    max_extent: int = 120
    max_occlusion: float = 0.35  # an object may lose at most this fraction of its area to later ones
    min_visible_area: int = 400
    clutter: int = 24  # small background marks that are not objects
    noise_sigma: float = 4.0
    min_color_distance: float = 90.0  # RGB distance between an object and its surroundings

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    image: np.ndarray  # H×W×3 uint8 RGB
    masks: np.ndarray  # K×H×W bool, visible part of each object
    kinds: list[str]

    @property
    def boxes(self) -> np.ndarray:
        """(K, 4) x0, y0, x1, y1 of each mask, inclusive pixel extents as SAM's boxes are drawn."""
        return np.array([mask_box(m) for m in self.masks], dtype=np.float32).reshape(-1, 4)

    def resized(self, size: int) -> Sample:
        """The same scene at another resolution (area-resampled image, masks by pixel coverage ≥ 1/2);
        objects that vanish are dropped."""
        if size == self.image.shape[0]:
            return self
        image = cv2.resize(self.image, (size, size), interpolation=cv2.INTER_AREA)
        masks = [cv2.resize(m.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA) >= 0.5
                 for m in self.masks]
        keep = [i for i, m in enumerate(masks) if m.any()]
        stack = np.stack([masks[i] for i in keep]) if keep else np.zeros((0, size, size), bool)
        return Sample(image, stack, [self.kinds[i] for i in keep])

    @property
    def background(self) -> np.ndarray:
        return ~self.masks.any(axis=0) if len(self.masks) else np.ones(self.image.shape[:2], bool)


def mask_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max()), float(ys.max())


class SyntheticWorld:
    """`world[i]` is image i of the world with the given seed; deterministic across runs and machines."""

    def __init__(self, seed: int = 0, config: WorldConfig | None = None) -> None:
        self.seed = int(seed)
        self.config = config or WorldConfig()

    def __getitem__(self, index: int) -> Sample:
        rng = np.random.default_rng([self.seed, int(index)])
        return _generate(rng, self.config)

    def batch(self, indices) -> list[Sample]:
        return [self[i] for i in indices]


# ----------------------------------------------------------------------------------------- drawing
def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _distinct_color(rng: np.random.Generator, avoid: list[np.ndarray], min_dist: float) -> np.ndarray:
    """A color far from every color in `avoid`; the farthest of a few candidates when none is far enough."""
    best, best_d = None, -1.0
    for _ in range(24):
        c = _random_color(rng)
        d = min((float(np.linalg.norm(c - a)) for a in avoid), default=1e9)
        if d >= min_dist:
            return c
        if d > best_d:
            best, best_d = c, d
    return best


def _background(rng: np.random.Generator, cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    s = cfg.size
    c0, c1 = _random_color(rng), _random_color(rng)
    # keep the background low-contrast so objects stand out against all of it
    c1 = c0 + (c1 - c0) * rng.uniform(0.1, 0.35)
    angle = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    t = np.cos(angle) * xx + np.sin(angle) * yy
    t = (t - t.min()) / max(float(np.ptp(t)), 1e-6)
    img = (c0[None, None, :] * (1 - t[..., None]) + c1[None, None, :] * t[..., None]).astype(np.float32)
    if rng.random() < 0.5:  # faint large-scale texture
        period = rng.uniform(12, 40)
        img += rng.uniform(4, 12) * np.sin(2 * math.pi * (xx * s * np.cos(angle + 1) + yy * s * np.sin(angle + 1))
                                           / period)[..., None]
    mean = img.reshape(-1, 3).mean(0)
    for _ in range(cfg.clutter):
        color = np.clip(mean + rng.normal(0, 30, 3), 0, 255)
        x, y = (int(v) for v in rng.integers(0, s, 2))
        if rng.random() < 0.5:
            cv2.circle(img, (x, y), int(rng.integers(1, 4)), color.tolist(), -1)
        else:
            dx, dy = (int(v) for v in rng.integers(-10, 11, 2))
            cv2.line(img, (x, y), (x + dx, y + dy), color.tolist(), 1)
    return img, mean


def _shape_mask(rng: np.random.Generator, kind: str, cfg: WorldConfig) -> np.ndarray:
    s = cfg.size
    extent = rng.uniform(cfg.min_extent, cfg.max_extent)
    cx, cy = rng.uniform(extent * 0.35, s - extent * 0.35, 2)
    angle = rng.uniform(0, 180)
    mask = np.zeros((s, s), np.uint8)
    center = (float(cx), float(cy))
    if kind == "ellipse":
        axes = (extent / 2, extent / 2 * rng.uniform(0.45, 1.0))
        cv2.ellipse(mask, (center, (axes[0] * 2, axes[1] * 2), angle), 1, -1)
    elif kind == "rectangle":
        box = cv2.boxPoints((center, (extent, extent * rng.uniform(0.4, 1.0)), angle))
        cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    elif kind in ("polygon", "star"):
        n = int(rng.integers(3, 8)) if kind == "polygon" else int(rng.integers(4, 7))
        radius = extent / 2
        pts = []
        for i in range(n * (2 if kind == "star" else 1)):
            r = radius if (kind == "polygon" or i % 2 == 0) else radius * rng.uniform(0.45, 0.6)
            if kind == "polygon":
                r *= rng.uniform(0.8, 1.0)
            a = math.radians(angle) + 2 * math.pi * i / (n * (2 if kind == "star" else 1))
            pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
        cv2.fillPoly(mask, [np.round(np.array(pts)).astype(np.int32)], 1)
    elif kind == "ring":
        outer = extent / 2
        cv2.ellipse(mask, (center, (outer * 2, outer * 2 * rng.uniform(0.7, 1.0)), angle), 1, -1)
        hole = np.zeros_like(mask)
        cv2.ellipse(hole, (center, (outer * 2 * rng.uniform(0.35, 0.55), outer * 2 * rng.uniform(0.3, 0.5)),
                           angle), 1, -1)
        mask &= 1 - hole
    else:  # thin parts: a cross or an L made of bars 7-14 px wide
        width = rng.uniform(7, 14)
        bars = [(0.0, 0.0, extent, width), (0.0, 0.0, width, extent)] if kind == "cross" else \
            [(-extent / 2 + width / 2, 0.0, width, extent), (0.0, extent / 2 - width / 2, extent, width)]
        rot = math.radians(angle)
        for ox, oy, w, h in bars:
            px = cx + ox * math.cos(rot) - oy * math.sin(rot)
            py = cy + ox * math.sin(rot) + oy * math.cos(rot)
            box = cv2.boxPoints(((px, py), (w, h), angle))
            cv2.fillPoly(mask, [np.round(box).astype(np.int32)], 1)
    return mask.astype(bool)


def _paint(rng: np.random.Generator, img: np.ndarray, mask: np.ndarray, color: np.ndarray) -> None:
    """Fill `mask` with a solid color or a texture of one color family (computed on its pixels only)."""
    fill = FILLS[int(rng.integers(len(FILLS)))]
    ys, xs = np.nonzero(mask)
    if fill == "solid":
        img[ys, xs] = color
        return
    second = color + rng.normal(0, 1, 3) * 25
    x, y = xs.astype(np.float32), ys.astype(np.float32)
    if fill == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(6, 16)
        t = (np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period) > 0).astype(np.float32)
    elif fill == "checker":
        cell = rng.uniform(5, 12)
        t = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    elif fill == "gradient":
        t = (x - x.min()) / max(1.0, float(np.ptp(x)))
    else:
        t = rng.random(len(xs)).astype(np.float32)
    img[ys, xs] = color[None] * (1 - t[:, None]) + second[None] * t[:, None]


def _generate(rng: np.random.Generator, cfg: WorldConfig) -> Sample:
    img, bg_mean = _background(rng, cfg)
    n_target = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    masks: list[np.ndarray] = []
    kinds: list[str] = []
    colors: list[np.ndarray] = []
    attempts = 0
    while len(masks) < n_target and attempts < n_target * 12:
        attempts += 1
        kind = SHAPES[int(rng.integers(len(SHAPES)))]
        shape = _shape_mask(rng, kind, cfg)
        area = int(shape.sum())
        if area < cfg.min_visible_area:
            continue
        # bounded occlusion of the objects already placed, and of this one by nothing (it is on top)
        if any((m & shape).sum() > cfg.max_occlusion * m.sum() or (m & ~shape).sum() < cfg.min_visible_area
               for m in masks):
            continue
        neighbours = [colors[i] for i, m in enumerate(masks) if _touches(m, shape)] + [bg_mean]
        color = _distinct_color(rng, neighbours, cfg.min_color_distance)
        _paint(rng, img, shape, color)
        masks = [m & ~shape for m in masks]
        masks.append(shape)
        kinds.append(kind)
        colors.append(color)
    if cfg.noise_sigma > 0:
        img += rng.standard_normal(img.shape, dtype=np.float32) * cfg.noise_sigma
    image = np.clip(np.round(img), 0, 255).astype(np.uint8)
    stack = np.stack(masks) if masks else np.zeros((0, cfg.size, cfg.size), bool)
    return Sample(image, stack, kinds)


def _touches(a: np.ndarray, b: np.ndarray) -> bool:
    ys, xs = np.nonzero(b)
    y0, y1, x0, x1 = max(ys.min() - 3, 0), ys.max() + 4, max(xs.min() - 3, 0), xs.max() + 4
    return bool(a[y0:y1, x0:x1].any())
