"""Polygons against brush RLE: how faithful (IoU of the rasterised polygons with their mask) and how large
(JSON bytes a tool receives), at several simplification tolerances, on the demo model's everything-mode masks
of a 12-MP photo-sized scene and on ragged masks.

    python benchmarks/bench_polygons.py [--tolerances 0.5,1,2]
"""

from __future__ import annotations

import argparse
import json

import cv2
import numpy as np

from tinysam_kit import TinySamPredictor, generate_everything
from tinysam_kit.data.synthetic import SyntheticWorld
from tinysam_kit.inference.encodings.labelstudio import mask_to_rle
from tinysam_kit.inference.encodings.polygons import mask_to_parts, polygons_to_mask

SIZE = (3000, 4000)  # 12 MP


def demo_masks() -> list[np.ndarray]:
    predictor = TinySamPredictor.from_pretrained("demo", device="cpu")
    scene = cv2.resize(SyntheticWorld(seed=5)[0].image, SIZE[::-1], interpolation=cv2.INTER_LINEAR)
    return [r["segmentation"] for r in generate_everything(predictor, scene, points_per_side=16)]


def ragged_masks(count: int = 3) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for sigma in (10, 30, 60)[:count]:
        noise = cv2.GaussianBlur(rng.standard_normal(SIZE).astype(np.float32), (0, 0), sigma)
        out.append(noise > 0.3 * noise.std())
    return out


def measure(name: str, masks: list[np.ndarray], tolerances: list[float]) -> None:
    rle_bytes = sum(len(json.dumps(mask_to_rle(m))) for m in masks)
    print(f"{name}: {len(masks)} masks of {SIZE[1]}×{SIZE[0]}; brush RLE {rle_bytes / 1e3:.0f} kB")
    for tol in tolerances:
        ious, with_holes, size = [], [], 0
        for m in masks:
            parts = mask_to_parts(m, tolerance=tol, min_area=0)
            size += len(json.dumps([[round(v, 2) for v in p] for p in parts]))
            drawn = polygons_to_mask(parts, *m.shape)
            # polygon formats cannot hold holes: compare with the mask whose holes are filled, and say what
            # the holes cost separately
            solid = polygons_to_mask(mask_to_parts(m, tolerance=0, min_area=0), *m.shape) | m
            ious.append((solid & drawn).sum() / max((solid | drawn).sum(), 1))
            with_holes.append((m & drawn).sum() / max((m | drawn).sum(), 1))
        print(f"  tolerance {tol:g} px: polygons {size / 1e3:.0f} kB ({size / rle_bytes:.2f}× RLE), "
              f"IoU with the hole-filled mask mean {np.mean(ious):.4f} min {np.min(ious):.4f}; "
              f"with the mask itself (holes count as errors) min {np.min(with_holes):.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tolerances", default="0.5,1,2")
    args = parser.parse_args()
    tolerances = [float(t) for t in args.tolerances.split(",")]
    measure("demo model, everything mode", demo_masks(), tolerances)
    measure("ragged (thresholded noise)", ragged_masks(), tolerances)


if __name__ == "__main__":
    main()
