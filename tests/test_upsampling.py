"""Windowed mask upsampling equals thresholding the reference two-step bilinear resize, pixel for pixel,
at any threshold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinysam_kit.data.preprocess import resized_shape
from tinysam_kit.inference.upsampling import FullResolution, axis_map, mask_from_low_res, resize_logits


def _logits(seed: int, kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 256, generator=g) * 3 - 6
    if kind == "blob":
        cy, cx, r = (int(v) for v in torch.randint(0, 256, (3,), generator=g))
        x[max(0, cy - r % 60):cy + r % 60 + 1, max(0, cx - r % 60):cx + r % 60 + 1] += 8
    elif kind == "corner":
        x[:] = -1
        x[0, 0] = x[255, 255] = 2
    elif kind == "edge":
        x[:] = -3
        x[:, 250:] = 1
    elif kind == "smooth":  # many logits near zero: the threshold decides at the last bit
        yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
        x = torch.sin(yy / 17) * torch.cos(xx / 23) * 1e-3
    return x


@pytest.mark.parametrize("size", [(1024, 1024), (960, 1280), (1280, 960), (333, 517), (3000, 4000), (64, 64),
                                  (17, 2000)])
@pytest.mark.parametrize("kind", ["blob", "corner", "edge", "smooth", "empty"])
def test_window_equals_whole_image_resize(size, kind):
    h, w = size
    input_size = resized_shape(h, w, 1024)
    for seed in range(3):
        low = _logits(seed, kind) if kind != "empty" else torch.full((256, 256), -5.0)
        logits = resize_logits(low[None], 1024, input_size, size)[0]
        for threshold in (0.0, -1.0, 1.0):  # the mask, and the two of everything mode's stability score
            expected = (logits > threshold).numpy()
            got = mask_from_low_res(low, 1024, input_size, size, threshold)
            assert got.shape == size and got.dtype == bool
            assert np.array_equal(got, expected), (threshold, int((got != expected).sum()))
            assert FullResolution(low, 1024, input_size, size, threshold).count(threshold) == int(expected.sum())


def test_other_thresholds_and_a_non_square_input_frame():
    low = _logits(4, "blob")
    for threshold in (-0.5, 0.0, 1.5):
        expected = (resize_logits(low[None], 1024, (768, 1024), (480, 640))[0] > threshold).numpy()
        assert np.array_equal(mask_from_low_res(low, 1024, (768, 1024), (480, 640), threshold), expected)


@pytest.mark.parametrize("shape,out", [((1, 37), (1, 101)), ((50, 37), (80, 101)), ((256, 256), (1024, 1024)),
                                       ((768, 1024), (960, 1280)), ((1024, 683), (4000, 2667))])
def test_window_values_are_bit_identical_to_pytorch(shape, out):
    from tinysam_kit.inference.upsampling import _resize_window

    x = torch.randn(1, 1, *shape, generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.interpolate(x, out, mode="bilinear", align_corners=False)[0, 0]
    assert torch.equal(_resize_window(x[0, 0], axis_map(shape[0], out[0]), axis_map(shape[1], out[1]), 0, 0), ref)


def test_boundary_band_serves_compact_masks_and_the_whole_image_kernel_ragged_ones(monkeypatch):
    from tinysam_kit.inference import upsampling

    used = []
    band = upsampling._threshold_band
    monkeypatch.setattr(upsampling, "_threshold_band", lambda *a: used.append(a[-1].shape) or band(*a))
    size, input_size = (3000, 4000), (768, 1024)
    yy, xx = torch.meshgrid(torch.arange(256.0), torch.arange(256.0), indexing="ij")
    compact = 40 - torch.hypot(yy - 100, xx - 128)  # a large disc: most pixels are decided without arithmetic
    ragged = torch.randn(256, 256, generator=torch.Generator().manual_seed(5))
    for low in (compact, ragged):
        expected = (resize_logits(low[None], 1024, input_size, size)[0] > 0).numpy()
        assert np.array_equal(mask_from_low_res(low, 1024, input_size, size), expected)
    assert len(used) == 1  # the compact mask; the ragged one goes to the whole-image kernel
