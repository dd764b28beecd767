"""Everything mode reproduces the official generators (../shared/reference/set_a/everything_A.*)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinysam_kit.inference.encodings.coco import uncompressed_rle_to_mask
from tinysam_kit.inference.everything import build_point_grid, generate_everything, stage2_points
from tinysam_kit.inference.nms import single_class_nms

RUNS = ["hierarchical_default", "dense_amg_default", "hierarchical_tuned", "dense_amg_tuned"]


@pytest.fixture(scope="module")
def runs(reference_dir):
    return json.loads((reference_dir / "everything_A.json").read_text())["runs"]


@pytest.fixture(scope="module")
def unions(reference_dir):
    return np.load(reference_dir / "everything_A.npz")


def test_stage1_grid(runs):
    grid = build_point_grid(8)
    np.testing.assert_array_equal(grid, runs["hierarchical_default"]["stage1"]["points_normalized"])


@pytest.mark.parametrize("name", ["hierarchical_default", "hierarchical_tuned"])
def test_stage2_points_from_stored_union(runs, unions, name):
    union = np.unpackbits(unions[f"{name}__stage1_high_conf_union_HxW_packed"], count=480 * 640)
    union = union.reshape(480, 640).astype(bool)
    points = stage2_points(build_point_grid(8), union, 32)
    np.testing.assert_array_equal(points, runs[name]["stage2"]["points_normalized"])


def test_stage2_is_empty_when_everything_is_covered():
    assert stage2_points(build_point_grid(8), np.ones((480, 640), bool), 32).shape == (0, 2)


@pytest.mark.parametrize("name", RUNS)
def test_nms_keep_list_from_stored_boxes(runs, name):
    nms = runs[name]["nms"]
    keep = single_class_nms(torch.tensor(nms["boxes_xyxy"], dtype=torch.float32),
                            torch.tensor(nms["scores"], dtype=torch.float32), nms["iou_threshold"])
    assert keep.tolist() == nms["keep"]


@pytest.fixture(scope="module")
def state(reference_predictor, reference_image):
    return reference_predictor.embed(reference_image)


@pytest.mark.slow
@pytest.mark.parametrize("name", RUNS)
def test_everything_records_match(reference_predictor, state, runs, name):
    run = runs[name]
    mode = "dense" if run["generator"].startswith("dense") or "amg" in name else "hierarchical"
    records, stats = generate_everything(reference_predictor, image_embedding=state, mode=mode,
                                         output_mode="uncompressed_rle", return_stats=True, **run["params"])
    assert stats["prompts_decoded"] == run["n_decoder_point_prompts_total"]
    assert stats["candidates"] == len(run["nms"]["scores"])
    if mode == "hierarchical":
        assert stats["stage2_points"] == run["stage2"]["n_points"]
        assert stats["stage1_masks"] == run["stage1"]["n_masks_after_iou_stability_filters"]
    assert len(records) == len(run["records"])
    unmatched = list(run["records"])
    for rec in records:
        mask = uncompressed_rle_to_mask(rec["segmentation"])
        for j, ref in enumerate(unmatched):
            if ref["point_coords"] != rec["point_coords"]:
                continue
            ref_mask = uncompressed_rle_to_mask(ref["segmentation_rle"])
            iou = (mask & ref_mask).sum() / max(1, (mask | ref_mask).sum())
            if iou >= 0.999:
                assert rec["bbox"] == ref["bbox"]
                assert abs(rec["predicted_iou"] - ref["predicted_iou"]) <= 1e-4
                assert abs(rec["stability_score"] - ref["stability_score"]) <= 1e-3
                assert abs(rec["area"] - ref["area"]) <= 5
                if mode == "dense":
                    assert rec["crop_box"] == ref["crop_box"]
                else:
                    assert "crop_box" not in rec
                unmatched.pop(j)
                break
        else:
            pytest.fail(f"record at {rec['point_coords']} (iou {rec['predicted_iou']:.4f}) has no reference twin")
    assert not unmatched
