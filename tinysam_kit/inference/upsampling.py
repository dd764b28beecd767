"""Binary masks from low-resolution logits, computing only the region where a mask can be true.

SAM turns (s, s) logits into a mask of the user's image with two bilinear resizes (to the padded input
size, crop, to the original size) and a `> 0` threshold. Bilinear interpolation is a convex combination of
at most 2×2 source values, so an output pixel can only be positive where one of its sources is: every
pixel outside the rows and columns reached from the bounding box of the positive low-resolution logits
is certainly false. Only that window is interpolated — with the source indices, weights and rounding of
PyTorch's `align_corners=False` CPU kernel, separably (columns, then rows), so the values are bit-identical
(tested) — and a click on a small object in a 12-megapixel photo costs a few thousand interpolated
pixels instead of twelve million.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F


@lru_cache(maxsize=64)
def axis_map(in_size: int, out_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and the weight of i1 for every output position, as PyTorch computes them
    for bilinear resizing with align_corners=False."""
    scale = np.float32(in_size) / np.float32(out_size)
    # float scale, source position in double rounded to float: the arithmetic of ATen's CPU kernel
    src = (float(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(np.float32)
    src = np.maximum(src, np.float32(0))
    i0 = src.astype(np.int64)  # non-negative: truncation is floor
    lam = np.minimum(src - i0.astype(np.float32), np.float32(1))
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return torch.from_numpy(i0), torch.from_numpy(i1), torch.from_numpy(lam.astype(np.float32))


def reached(i0: torch.Tensor, i1: torch.Tensor, lo: int, hi: int, limit: int) -> tuple[int, int] | None:
    """Output positions [a, b) (below `limit`) whose sources touch source positions [lo, hi]."""
    hit = torch.nonzero((i0[:limit] <= hi) & (i1[:limit] >= lo))
    if len(hit) == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1


def _blend(first: torch.Tensor, second: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """first·(1-λ) + second·λ rounded as ATen's kernel rounds it (one fused multiply-add over the rounded
    second product), so windowed values are bit-identical to whole-image ones."""
    return (first.double() * (1 - lam).double() + second * lam).float()


def _resize_window(x: torch.Tensor, rows: tuple[torch.Tensor, ...], cols: tuple[torch.Tensor, ...],
                   row_offset: int, col_offset: int) -> torch.Tensor:
    """Bilinear values of output rows/cols given by their (i0, i1, λ) maps, from the source window `x`
    whose first row/column is source position (row_offset, col_offset); columns first, then rows."""
    r0, r1, rl = rows
    c0, c1, cl = cols
    horizontal = _blend(x[:, c0 - col_offset], x[:, c1 - col_offset], cl)
    return _blend(horizontal[r0 - row_offset], horizontal[r1 - row_offset], rl[:, None])


def mask_from_low_res(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                      original_size: tuple[int, int], threshold: float = 0.0,
                      out: np.ndarray | None = None) -> np.ndarray:
    """(s, s) logits → (H, W) bool mask equal to `resize(resize(low_res)[:h, :w]) > threshold`, written into
    `out` when given."""
    return FullResolution(low_res, img_size, input_size, original_size, threshold).mask(threshold, out)


class FullResolution:
    """One (s, s) logit map as it would be at the user's image size, thresholded on demand at any threshold
    ≥ `floor`, computing only what can be true.

    Pixels outside the window reached from the low-res logits above `floor` are false at every such
    threshold: each is a convex combination of low-res logits all ≤ floor, and rounding never lifts such a
    blend above it (both resizes round to nearest from a double sum within half an ulp). The work that does
    not depend on the threshold — that window, the choice between it and the whole-image resize (cost model
    below), the first resize's exact values or the whole-image logits — is done once, on first use.
    """

    def __init__(self, low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                 original_size: tuple[int, int], floor: float = 0.0) -> None:
        self.low_res, self.img_size, self.floor = low_res, img_size, floor
        self.input_size, self.original_size = tuple(input_size), tuple(original_size)
        self.resized = self.input_size != self.original_size
        positive = low_res.float().numpy() > floor  # where the window and its cost estimate both start
        self.window = _true_window(positive, img_size, input_size, original_size)
        self.whole = self.window != () and _window_cost_ns(positive, self.window, img_size, original_size) > \
            _whole_cost_ns(img_size, original_size, self.resized)
        self._cache: dict[str, object] = {}

    def above(self, threshold: float):
        """(rows [a, b), cols [a, b), bool mask of that window) of the pixels above `threshold`, or None when
        none can be."""
        if threshold < self.floor:
            raise ValueError(f"threshold {threshold} is below this map's floor {self.floor}")
        if self.window == ():
            return None
        h, w = self.original_size
        if self.whole:
            if "logits" not in self._cache:
                self._cache["logits"] = resize_logits(self.low_res[None], self.img_size, self.input_size,
                                                      self.original_size)[0].numpy()
            return (0, h), (0, w), self._cache["logits"] > threshold
        rows, cols, stage1_rows, stage1_cols = self.window
        shape = (rows[1] - rows[0], cols[1] - cols[0])
        if "patch" not in self._cache:
            maps1 = axis_map(self.low_res.shape[-1], self.img_size)
            sel_r = tuple(m[stage1_rows[0]:stage1_rows[1]] for m in maps1)
            sel_c = tuple(m[stage1_cols[0]:stage1_cols[1]] for m in maps1)
            src_r, src_c = int(sel_r[0][0]), int(sel_c[0][0])
            patch = self.low_res[src_r:int(sel_r[1][-1]) + 1, src_c:int(sel_c[1][-1]) + 1].float()
            self._cache["patch"] = patch, sel_r, sel_c, src_r, src_c
        patch, sel_r, sel_c, src_r, src_c = self._cache["patch"]
        if not self.resized:  # the first resize is the last one: only its boundary band needs arithmetic
            target = np.empty(shape, dtype=bool)
            _threshold_band(patch, sel_r, sel_c, src_r, src_c, threshold, target)
            return rows, cols, target
        if "stage1" not in self._cache:
            values = _resize_window(patch, sel_r, sel_c, src_r, src_c)
            sel2_r = tuple(m[rows[0]:rows[1]] for m in axis_map(self.input_size[0], h))
            sel2_c = tuple(m[cols[0]:cols[1]] for m in axis_map(self.input_size[1], w))
            shrinking = h < self.input_size[0] or w < self.input_size[1]
            if shrinking:  # fewer output pixels than values: interpolate every one, once
                values = _resize_window(values, sel2_r, sel2_c, stage1_rows[0], stage1_cols[0])
            self._cache["stage1"] = values, sel2_r, sel2_c, shrinking
        values, sel2_r, sel2_c, shrinking = self._cache["stage1"]
        if shrinking:
            return rows, cols, (values > threshold).numpy()
        target = np.empty(shape, dtype=bool)
        _threshold_band(values, sel2_r, sel2_c, stage1_rows[0], stage1_cols[0], threshold, target)
        return rows, cols, target

    def count(self, threshold: float) -> int:
        part = self.above(threshold)
        return 0 if part is None else int(np.count_nonzero(part[2]))

    def mask(self, threshold: float, out: np.ndarray | None = None) -> np.ndarray:
        h, w = self.original_size
        if out is None:
            out = np.empty((h, w), dtype=bool)
        part = self.above(threshold)
        if part is None:
            out[:] = False
            return out
        (r0, r1), (c0, c1), values = part
        # the window is written last; clear only around it
        out[:r0] = False
        out[r1:] = False
        out[r0:r1, :c0] = False
        out[r0:r1, c1:] = False
        out[r0:r1, c0:c1] = values
        return out


# What each path costs, in ns on the build machine (benchmarks/bench_postprocess.py; only the ratios matter):
# PyTorch's whole-image resize per stage-1 and per stage-2 output pixel; the windowed path's fixed overhead,
# per value computed with exact rounding, per value of the block grid, per pixel filled from the grid or
# cleared outside the window, and per boundary pixel interpolated pointwise.
WHOLE_STAGE1_NS, WHOLE_STAGE2_NS = 3.0, 4.0
WINDOW_FIXED_NS, EXACT_VALUE_NS, GRID_VALUE_NS, FILL_NS, CLEAR_NS, BAND_PIXEL_NS = 1e6, 15.0, 10.0, 1.5, 0.3, 40.0


def whole_resize_is_cheap(img_size: int, input_size: tuple[int, int], original_size: tuple[int, int]) -> bool:
    """Whether the whole-image resize costs less than the windowed path's fixed overhead alone (small images:
    batch whole resizes instead of going mask by mask)."""
    return _whole_cost_ns(img_size, original_size, tuple(input_size) != tuple(original_size)) < WINDOW_FIXED_NS


def _whole_cost_ns(img_size: int, original_size: tuple[int, int], resized: bool) -> float:
    h, w = original_size
    return WHOLE_STAGE1_NS * img_size * img_size + (WHOLE_STAGE2_NS * h * w if resized else 0.0)


def _window_cost_ns(positive: np.ndarray, window, img_size: int, original_size: tuple[int, int]) -> float:
    """Estimated time of the windowed path: the block grid, the fill and the boundary band of the last
    (enlarging) resize — the band's size bounded by the low-res sign changes times the output pixels per
    low-res cell (ragged masks have many) — after exact stage-1 values when there are two resizes; exact
    values for both when the second one shrinks."""
    rows, cols, stage1_rows, stage1_cols = window
    stage1 = (stage1_rows[1] - stage1_rows[0]) * (stage1_cols[1] - stage1_cols[0])
    output = (rows[1] - rows[0]) * (cols[1] - cols[0])
    cost = WINDOW_FIXED_NS + CLEAR_NS * (original_size[0] * original_size[1] - output)
    if output < stage1:
        return cost + EXACT_VALUE_NS * (stage1 + output)
    changes = int((positive[1:] != positive[:-1]).sum() + (positive[:, 1:] != positive[:, :-1]).sum())
    cell = (img_size / positive.shape[-1]) ** 2  # stage-1 pixels per low-res cell
    per_cell = output / stage1 * cell  # output pixels per low-res cell
    if output == stage1:  # no second resize: the band runs on the first one, over low-res blocks
        grid = stage1 / cell
        return cost + GRID_VALUE_NS * grid + FILL_NS * output + BAND_PIXEL_NS * changes * per_cell
    return cost + (EXACT_VALUE_NS + GRID_VALUE_NS) * stage1 + FILL_NS * output + BAND_PIXEL_NS * changes * per_cell


def _threshold_band(values: torch.Tensor, rows: tuple[torch.Tensor, ...], cols: tuple[torch.Tensor, ...],
                    row_offset: int, col_offset: int, threshold: float, out: np.ndarray) -> None:
    """`out[:] = _resize_window(values, rows, cols, ...) > threshold` for an enlarging resize, interpolating
    only near the boundary.

    An output pixel is a convex combination of a 2×2 block of `values`: where all four are clearly above
    (below) the threshold it is true (false) without arithmetic, and the output pixels that share a block
    (runs of identical rows and columns: several per source pixel when enlarging) are filled at once. Only
    pixels of blocks that straddle the threshold are interpolated, pointwise with `_blend`'s rounding, so
    the result is the whole-window one bit for bit.
    """
    r0, r1, rl = (m.numpy() for m in rows)
    c0, c1, cl = (m.numpy() for m in cols)
    r0, r1, c0, c1 = r0 - row_offset, r1 - row_offset, c0 - col_offset, c1 - col_offset
    v = values.numpy()
    # enlarging: every source row/col of the window is the first source of a run of output rows/cols, so
    # the blocks are consecutive source pairs (edge-replicated: a superset of what the last run reads)
    if r0[0] or c0[0] or (np.diff(r0) > 1).any() or (np.diff(c0) > 1).any():
        raise ValueError("_threshold_band needs an enlarging resize over the whole source window")
    below = np.concatenate([v[1:], v[-1:]])
    lo, hi = np.minimum(v, below), np.maximum(v, below)
    lo = np.minimum(lo, np.concatenate([lo[:, 1:], lo[:, -1:]], axis=1))
    hi = np.maximum(hi, np.concatenate([hi[:, 1:], hi[:, -1:]], axis=1))
    # blending rounds each step to float32: stay clear of the threshold by far more than that error
    margin = 1e-6 * max(1.0, abs(threshold), float(np.abs(v).max()))
    certain = lo > threshold + margin
    unsure = ~certain & (hi > threshold - margin)
    row_len = np.bincount(r0, minlength=v.shape[0])
    col_len = np.bincount(c0, minlength=v.shape[1])
    cell_r, cell_c = np.nonzero(unsure)
    sizes = row_len[cell_r] * col_len[cell_c]
    total = int(sizes.sum())
    out[:] = np.repeat(certain, col_len, axis=1)[r0]
    if total == 0:
        return
    # the pixels of the unsure blocks, block after block, each row-major
    row_start, col_start = np.cumsum(row_len) - row_len, np.cumsum(col_len) - col_len
    offset = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    width = np.repeat(col_len[cell_c], sizes)
    y = np.repeat(row_start[cell_r], sizes) + offset // width
    x = np.repeat(col_start[cell_c], sizes) + offset % width
    lam_c = cl[x]
    top = _blend_np(v[r0[y], c0[x]], v[r0[y], c1[x]], lam_c)
    bottom = _blend_np(v[r1[y], c0[x]], v[r1[y], c1[x]], lam_c)
    out[y, x] = _blend_np(top, bottom, rl[y]) > threshold


def _blend_np(first: np.ndarray, second: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """`_blend` in NumPy (same IEEE operations in the same order, so the same bits), for small gathers."""
    return (first.astype(np.float64) * (np.float32(1) - lam).astype(np.float64) + second * lam).astype(np.float32)


def _true_window(positive: np.ndarray, img_size: int, input_size: tuple[int, int],
                 original_size: tuple[int, int]):
    """Where a mask whose low-res logits exceed the threshold at `positive` can be true: (output rows, output
    cols, stage-1 rows, stage-1 cols) as [a, b) ranges; () when nowhere."""
    h, w = original_size
    nh, nw = input_size
    ys = np.flatnonzero(positive.any(axis=1))
    if len(ys) == 0:
        return ()
    xs = np.flatnonzero(positive.any(axis=0))
    maps1 = axis_map(positive.shape[-1], img_size)
    rows = reached(*maps1[:2], int(ys[0]), int(ys[-1]), nh)
    cols = reached(*maps1[:2], int(xs[0]), int(xs[-1]), nw)
    if rows is None or cols is None:
        return ()
    stage1_rows, stage1_cols = rows, cols
    if (nh, nw) != (h, w):
        maps_r, maps_c = axis_map(nh, h), axis_map(nw, w)
        rows = reached(*maps_r[:2], rows[0], rows[1] - 1, h)
        cols = reached(*maps_c[:2], cols[0], cols[1] - 1, w)
        if rows is None or cols is None:
            return ()
        # the stage-1 positions the stage-2 window reads (a superset of the positive ones near the edges)
        stage1_rows = (int(maps_r[0][rows[0]]), int(maps_r[1][rows[1] - 1]) + 1)
        stage1_cols = (int(maps_c[0][cols[0]]), int(maps_c[1][cols[1] - 1]) + 1)
    return rows, cols, stage1_rows, stage1_cols


def resize_logits(low_res: torch.Tensor, img_size: int, input_size: tuple[int, int],
                  original_size: tuple[int, int]) -> torch.Tensor:
    """The reference resize of (K, s, s) logits to (K, H, W): bilinear to the padded input size, crop,
    bilinear to the original size (skipped when it is the identity)."""
    x = F.interpolate(low_res[:, None].float(), (img_size, img_size), mode="bilinear", align_corners=False)
    x = x[..., : input_size[0], : input_size[1]]
    if tuple(input_size) != tuple(original_size):
        x = F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)
    return x[:, 0]
