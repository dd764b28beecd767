"""COCO RLE: round trips, SAM's conventions, and byte-for-byte agreement with pycocotools when installed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinysam_kit.inference.encodings.coco import (
    coco_rle_to_mask,
    decode_counts,
    mask_to_coco_rle,
    mask_to_uncompressed_rle,
    masks_to_uncompressed_rle,
    rle_area,
    uncompressed_rle_to_mask,
)
from tinysam_kit.inference.nms import masks_to_boxes


def random_masks(seed=0, n=40):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        h, w = rng.integers(1, 50, size=2)
        yield rng.random((h, w)) < rng.random()


def test_round_trips():
    for mask in random_masks():
        rle = mask_to_uncompressed_rle(mask)
        assert sum(rle["counts"]) == mask.size and rle_area(rle) == mask.sum()
        assert np.array_equal(uncompressed_rle_to_mask(rle), mask)
        coco = mask_to_coco_rle(mask)
        assert decode_counts(coco["counts"]) == rle["counts"]
        assert np.array_equal(coco_rle_to_mask(coco), mask)


def test_column_major_and_leading_zero_run():
    mask = np.array([[1, 0], [1, 1]], bool)
    assert mask_to_uncompressed_rle(mask)["counts"] == [0, 2, 1, 1]
    assert mask_to_uncompressed_rle(~mask)["counts"] == [2, 1, 1]


def test_batched_encoding_matches_single():
    masks = torch.from_numpy(np.random.default_rng(1).random((6, 13, 17)) < 0.4)
    batched = masks_to_uncompressed_rle(masks)
    assert batched == [mask_to_uncompressed_rle(m.numpy()) for m in masks]


def test_same_bytes_as_pycocotools():
    mask_utils = pytest.importorskip("pycocotools.mask", reason="pycocotools not installed (dev extra)")
    for mask in random_masks(5):
        ours = mask_to_coco_rle(mask)
        theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert ours["counts"] == theirs["counts"].decode("ascii")
        assert ours["size"] == list(theirs["size"])
        assert rle_area(ours) == int(mask_utils.area(theirs))


def test_masks_to_boxes():
    masks = torch.zeros((3, 10, 12), dtype=torch.bool)
    masks[0, 2:5, 3:9] = True
    masks[1, 7, 11] = True
    assert masks_to_boxes(masks).tolist() == [[3, 2, 8, 4], [11, 7, 11, 7], [0, 0, 0, 0]]


def test_polygons_round_trip():
    from tinysam_kit.inference.encodings.polygons import mask_to_polygons, polygons_to_mask

    mask = np.zeros((40, 50), bool)
    mask[5:30, 8:40] = True
    mask[12:20, 15:25] = False  # a hole
    mask[33:38, 2:6] = True  # a second island
    polys = mask_to_polygons(mask, tolerance=0, include_holes=True)
    assert len(polys) == 3
    back = polygons_to_mask(polys, 40, 50)
    # Contours run through boundary pixel centres, so rasterising them back is exact up to the outline.
    assert (back != mask).sum() <= 0.1 * mask.sum()
    assert not back[16, 20] and back[6, 9] and back[35, 3]
    assert len(mask_to_polygons(mask, include_holes=False)) == 2


def _filled(mask):
    from tinysam_kit.inference.encodings.polygons import mask_to_parts, polygons_to_mask

    return polygons_to_mask(mask_to_parts(mask, tolerance=0, min_area=0), *mask.shape) | mask


def _polygon_iou(mask) -> float:
    from tinysam_kit.inference.encodings.polygons import mask_to_parts, polygons_to_mask

    drawn = polygons_to_mask(mask_to_parts(mask, min_area=0), *mask.shape)  # the default tolerance
    solid = _filled(mask)
    return (solid & drawn).sum() / max((solid | drawn).sum(), 1)


def test_polygons_at_the_default_tolerance_cover_demo_model_masks():
    from tinysam_kit import TinySamPredictor, generate_everything
    from tinysam_kit.data.synthetic import SyntheticWorld

    predictor = TinySamPredictor.from_pretrained("demo", device="cpu")
    masks = [r["segmentation"] for i in range(2)
             for r in generate_everything(predictor, SyntheticWorld(seed=5)[i].image, points_per_side=16)]
    assert len(masks) >= 5
    assert min(_polygon_iou(m) for m in masks if m.sum() >= 256) >= 0.95


def test_polygons_at_the_default_tolerance_cover_ragged_masks():
    import cv2

    rng = np.random.default_rng(0)
    for sigma in (2, 6, 20):
        noise = cv2.GaussianBlur(rng.standard_normal((300, 400)).astype(np.float32), (0, 0), sigma)
        mask = noise > 0.3 * noise.std()
        assert _polygon_iou(mask) >= 0.95


def test_mask_to_parts_one_polygon_per_part_largest_first_without_specks():
    from tinysam_kit.inference.encodings.polygons import mask_to_parts

    mask = np.zeros((60, 80), bool)
    mask[5:15, 5:15] = True  # 100 px
    mask[20:50, 30:70] = True  # 1200 px, with a hole that polygons cannot hold
    mask[30:35, 40:45] = False
    mask[55, 2] = True  # a speck
    parts = mask_to_parts(mask)
    assert len(parts) == 2
    xs = parts[0][0::2]
    assert min(xs) >= 29 and max(xs) <= 70  # the big part comes first
