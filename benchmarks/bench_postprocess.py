"""Post-processing of one click's mask at photo sizes: low-res logits → full-resolution mask → brush RLE.

The baseline is the reference path (SAM's two bilinear resizes of the whole image, then `> 0`); ours is
`mask_from_low_res` (the window where the mask can be true, and inside it interpolation only on the
boundary band when the photo is larger than the model's input). Masks are discs of several sizes (what a
trained model returns for an object) and random logits (a ragged worst case, as random weights give).
Both paths give the same pixels (asserted). Medians after warm-up; ratios are within one run.

    python benchmarks/bench_postprocess.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from tinysam_kit.data.preprocess import resized_shape
from tinysam_kit.inference.encodings.labelstudio import mask_to_rle
from tinysam_kit.inference.upsampling import mask_from_low_res, resize_logits

IMG_SIZE, LOW_RES = 1024, 256


def median_ms(fns, repeats: int) -> list[float]:
    """Median time of each function, called in turn (interleaved, so drifts of the machine hit all alike)."""
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]


def logits(kind: str, input_size: tuple[int, int]) -> torch.Tensor:
    if kind == "ragged":
        return torch.randn(LOW_RES, LOW_RES, generator=torch.Generator().manual_seed(0))
    fraction = {"small object": 0.02, "medium object": 0.15, "large object": 0.45}[kind]
    yy, xx = np.mgrid[0:LOW_RES, 0:LOW_RES].astype(np.float32)
    scale = LOW_RES / IMG_SIZE
    cy, cx = input_size[0] * scale * 0.45, input_size[1] * scale * 0.55
    radius = np.sqrt(fraction * input_size[0] * input_size[1] / np.pi) * scale
    return torch.from_numpy((radius - np.hypot(yy - cy, xx - cx)) * 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", default="1280x960,4000x3000", help="comma-separated WIDTHxHEIGHT photo sizes")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, model input {IMG_SIZE}, low-res {LOW_RES}²; medians of {args.repeats}")
    print(f"{'photo':>10s} {'mask':>14s} {'cover':>6s} {'reference ms':>13s} {'ours ms':>8s} {'speed-up':>8s} "
          f"{'brush RLE ms':>12s}")
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.lower().split("x"))
        input_size = resized_shape(h, w, IMG_SIZE)
        for kind in ("small object", "medium object", "large object", "ragged"):
            low = logits(kind, input_size)
            shape = (h, w)

            def reference(low=low, input_size=input_size, shape=shape):
                return (resize_logits(low[None], IMG_SIZE, input_size, shape)[0] > 0).numpy()

            def ours(low=low, input_size=input_size, shape=shape):
                return mask_from_low_res(low, IMG_SIZE, input_size, shape)

            mask = ours()
            if not np.array_equal(mask, reference()):
                raise SystemExit(f"{size} {kind}: masks differ from the reference")
            base, fast, rle = median_ms([reference, ours, lambda mask=mask: mask_to_rle(mask)], args.repeats)
            print(f"{size:>10s} {kind:>14s} {mask.mean():6.2f} {base:13.1f} {fast:8.1f} {base / fast:7.1f}× "
                  f"{rle:12.1f}")

if __name__ == "__main__":
    main()
