"""Everything mode behaviour beyond the reference runs: parameters, crops, output modes, robustness."""

from __future__ import annotations

import numpy as np
import pytest

from tinysam_kit.inference.encodings.coco import coco_rle_to_mask, uncompressed_rle_to_mask
from tinysam_kit.inference.everything import EverythingGenerator, generate_crop_boxes, generate_everything
from tinysam_kit.inference.predictor import TinySamPredictor

LOOSE = dict(pred_iou_thresh=0.0, stability_score_thresh=0.0, points_per_side=8)


@pytest.fixture(scope="module")
def predictor(tiny_random_checkpoint):
    return TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(1)
    img = np.full((90, 120, 3), 40, np.uint8)
    img[20:60, 30:80] = (200, 60, 60)
    img[50:85, 70:115] = (40, 180, 90)
    return (img + rng.integers(0, 10, img.shape)).astype(np.uint8)


def test_output_modes_agree(predictor, image):
    binary = generate_everything(predictor, image, **LOOSE)
    coco = generate_everything(predictor, image, output_mode="coco_rle", **LOOSE)
    raw = generate_everything(predictor, image, output_mode="uncompressed_rle", **LOOSE)
    assert len(binary) == len(coco) == len(raw) > 0
    for b, c, r in zip(binary, coco, raw):
        assert b["segmentation"].shape == (90, 120)
        assert np.array_equal(b["segmentation"], coco_rle_to_mask(c["segmentation"]))
        assert np.array_equal(b["segmentation"], uncompressed_rle_to_mask(r["segmentation"]))
        assert b["area"] == int(b["segmentation"].sum())
        x, y, w, h = b["bbox"]
        if b["area"]:
            ys, xs = np.nonzero(b["segmentation"])
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max(), ys.max())
    scores = [r["predicted_iou"] for r in binary]
    assert scores == sorted(scores, reverse=True)


def test_max_masks_and_min_area(predictor, image):
    full = generate_everything(predictor, image, **LOOSE)
    capped = generate_everything(predictor, image, max_masks=2, **LOOSE)
    assert [r["predicted_iou"] for r in capped] == [r["predicted_iou"] for r in full[:2]]
    cleaned = generate_everything(predictor, image, min_mask_region_area=30, **LOOSE)
    assert 0 < len(cleaned) <= len(full)


def test_thresholds_that_reject_everything_give_no_records(predictor, image):
    records, stats = generate_everything(predictor, image, pred_iou_thresh=50.0, return_stats=True)
    assert records == [] and stats["stage2_points"] >= 0
    assert generate_everything(predictor, image, mode="dense", pred_iou_thresh=50.0) == []


def test_hierarchical_decodes_fewer_prompts_than_dense(predictor, image):
    gen_h = EverythingGenerator(predictor, "hierarchical", **LOOSE)
    gen_h.generate(image)
    gen_d = EverythingGenerator(predictor, "dense", **LOOSE)
    gen_d.generate(image)
    assert gen_d.stats["prompts_decoded"] == 64
    assert gen_h.stats["prompts_decoded"] == 4 + gen_h.stats["stage2_points"]


def test_crop_layers(predictor, image):
    crops = generate_crop_boxes(90, 120, 1, 512 / 1500)
    assert crops[0] == ([0, 0, 120, 90], 0) and len(crops) == 5
    assert all(c[2] <= 120 and c[3] <= 90 for c, _ in crops)
    records = generate_everything(predictor, image, mode="dense", crop_n_layers=1, **LOOSE)
    assert records
    boxes = {tuple(r["crop_box"]) for r in records}
    assert all(len(b) == 4 for b in boxes)
    for r in records:
        assert r["segmentation"].shape == (90, 120)


def test_bad_parameters_are_rejected(predictor, image):
    with pytest.raises(TypeError, match="unknown everything-mode parameter"):
        generate_everything(predictor, image, points_per_sid=4)
    with pytest.raises(ValueError, match="mode must be"):
        generate_everything(predictor, image, mode="sparse")
    with pytest.raises(ValueError, match="output_mode"):
        generate_everything(predictor, image, output_mode="png")
    with pytest.raises(ValueError, match="points_per_side"):
        generate_everything(predictor, image, points_per_side=1)


def test_max_area_fraction_drops_only_masks_larger_than_the_fraction(image):
    demo = TinySamPredictor.from_pretrained("demo", device="cpu")
    options = dict(mode="dense", points_per_side=8, pred_iou_thresh=0.0, stability_score_thresh=0.0)
    everything = generate_everything(demo, image, **options)
    h, w = image.shape[:2]
    areas = sorted(r["area"] for r in everything)
    assert len(areas) >= 2 and areas[-1] > areas[0]
    limit = (areas[-1] - 1) / (h * w)
    kept = generate_everything(demo, image, **options, max_area_fraction=limit)
    assert kept and all(r["area"] <= limit * h * w for r in kept)
    assert [r["area"] for r in kept] == [r["area"] for r in everything if r["area"] <= limit * h * w]


def test_policy_everything_params_explicit_beats_registered_beats_default():
    from tinysam_kit.inference.policy import MAX_AREA_FRACTION, everything_params

    demo = everything_params("demo", {"pred_iou_thresh": None, "stability_score_thresh": 0.7}, prelabel=True)
    assert demo["pred_iou_thresh"] == 0.5 and demo["stability_score_thresh"] == 0.7  # registered, explicit
    assert demo["max_area_fraction"] == MAX_AREA_FRACTION and demo["box_nms_thresh"] == 0.7  # front-end default
    assert everything_params("tinysam", {}, prelabel=True)["pred_iou_thresh"] == 0.88  # SAM's
    assert "max_area_fraction" not in everything_params("tinysam", {})  # the Python API keeps SAM's behaviour


def test_registered_models_bring_their_everything_thresholds():
    from tinysam_kit.models.registry import MODELS

    demo = TinySamPredictor.from_pretrained("demo", device="cpu")
    gen = EverythingGenerator(demo)
    assert gen.params.pred_iou_thresh == MODELS["demo"].everything_defaults["pred_iou_thresh"]
    assert EverythingGenerator(demo, pred_iou_thresh=0.9).params.pred_iou_thresh == 0.9  # the caller wins


@pytest.mark.parametrize("mode", ["hierarchical", "dense"])
def test_windowed_full_resolution_gives_the_batched_resize_records(mode, monkeypatch):
    """On a photo larger than the model input, compact candidates are scored and made window by window and
    ragged ones resized whole: the records must equal those of resizing every candidate whole."""
    import cv2

    from tinysam_kit.data.synthetic import SyntheticWorld
    from tinysam_kit.evaluation.quality import held_out_indices
    from tinysam_kit.inference import everything
    from tinysam_kit.inference.policy import registered_everything_params

    demo = TinySamPredictor.from_pretrained("demo", device="cpu")
    photo = cv2.resize(SyntheticWorld(0)[held_out_indices(1, start=100)[0]].image, (1200, 900),
                       interpolation=cv2.INTER_LINEAR)
    options = dict(registered_everything_params("demo"), points_per_side=12, mode=mode,
                   output_mode="uncompressed_rle")
    windows = []

    class Recorded(everything.FullResolution):
        def __init__(self, *args):
            super().__init__(*args)
            windows.append(self.window != () and not self.whole)

    monkeypatch.setattr(everything, "FullResolution", Recorded)
    ours = generate_everything(demo, photo, **options)
    assert any(windows), "no candidate took the windowed path"
    monkeypatch.setattr(everything, "whole_resize_is_cheap", lambda *a: True)
    batched = generate_everything(demo, photo, **options)
    assert len(ours) == len(batched) > 0
    for a, b in zip(ours, batched):
        assert a["segmentation"] == b["segmentation"] and a["bbox"] == b["bbox"]
        assert a["predicted_iou"] == b["predicted_iou"] and a["stability_score"] == b["stability_score"]


def test_preview_overlay_blends_each_mask_largest_first():
    """The preview tints each mask's pixels with its own colour, largest mask first (smaller ones stay visible
    on top), leaving other pixels untouched."""
    from tinysam_kit.inference.batch import overlay

    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    big, small = np.zeros((40, 50), bool), np.zeros((40, 50), bool)
    big[5:35, 5:45] = True
    small[10:15, 10:15] = True
    out = overlay(image, [small, big])
    colours = np.random.default_rng(0).integers(40, 256, size=(2, 3)).astype(np.float32)  # big's, then small's
    want = image.astype(np.float32)
    want[big] = want[big] * 0.5 + colours[0] * 0.5
    want[small] = want[small] * 0.5 + colours[1] * 0.5
    assert np.array_equal(out, want.clip(0, 255).astype(np.uint8))
    assert np.array_equal(out[~big], image[~big])
