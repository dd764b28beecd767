"""Device-resident everything-mode post-processing (`inference.device_masks`), run on the CPU: the code a GPU runs
gives exactly the host path's records."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinysam_kit.inference import device_masks
from tinysam_kit.inference.encodings.coco import masks_to_uncompressed_rle
from tinysam_kit.inference.everything import EverythingGenerator
from tinysam_kit.inference.nms import masks_to_boxes
from tinysam_kit.inference.policy import PolicyError, postprocess_on_device
from tinysam_kit.inference.predictor import TinySamPredictor
from tinysam_kit.runtime.base import MULTIMASK_TOKENS, EngineInfo


def edge_case_masks() -> np.ndarray:
    rng = np.random.default_rng(3)
    masks = rng.random((9, 13, 17)) > 0.6
    masks[0] = False  # empty
    masks[1] = True  # full
    masks[2] = False
    masks[2, 0, 0] = True  # only the first pixel
    masks[3] = False
    masks[3, -1, -1] = True  # only the last pixel
    masks[4] = False
    masks[4, :, 5:9] = True  # a column band: runs cross column ends
    return masks


def test_boxes_and_rle_equal_the_host_functions():
    masks = edge_case_masks()
    tensor = torch.from_numpy(masks)
    assert torch.equal(device_masks.masks_to_boxes(tensor), masks_to_boxes(masks))
    assert device_masks.masks_to_uncompressed_rle(tensor) == masks_to_uncompressed_rle(masks)
    assert device_masks.masks_to_uncompressed_rle(tensor[:0]) == []
    assert device_masks.masks_to_boxes(tensor[:0]).shape == (0, 4)


def test_padding_places_crop_masks():
    masks = torch.from_numpy(edge_case_masks())
    keep = torch.ones(9, dtype=torch.bool)
    keep[1] = False
    padded = device_masks.pad_to(masks, keep, (20, 30), x0=4, y0=2)
    assert padded.shape == (8, 20, 30) and int(padded.sum()) == int(masks[keep].sum())
    assert torch.equal(padded[:, 2:15, 4:21], masks[keep])


def test_chunks_are_bounded_by_the_pixel_budget():
    assert device_masks.masks_per_chunk(1024, (1024, 1024)) == 64
    assert device_masks.masks_per_chunk(1024, (3000, 4000)) == device_masks.DEVICE_PIXEL_BUDGET // 12_000_000
    assert device_masks.masks_per_chunk(1024, (20_000, 20_000)) == 1


def test_policy_puts_post_processing_on_accelerators_only():
    def info(engine, device):
        return EngineInfo(engine, "fp32", device, "m", None, 1024, 256)

    assert postprocess_on_device(info("torch", "cuda")) and postprocess_on_device(info("torch", "cuda:1"))
    assert not postprocess_on_device(info("torch", "cpu"))
    assert not postprocess_on_device(info("onnx", "cuda"))  # ONNX Runtime hands back host arrays
    assert postprocess_on_device(info("torch", "cpu"), "device")
    assert not postprocess_on_device(info("torch", "cuda"), "host")
    with pytest.raises(PolicyError, match="postprocess must be one of"):
        postprocess_on_device(info("torch", "cpu"), "gpu")


def test_engines_keep_outputs_on_device_on_request(reference_predictor, reference_image):
    state = reference_predictor.embed(reference_image)
    coords = torch.tensor([[[100.0, 200.0]], [[400.0, 300.0]]])
    labels = torch.ones((2, 1))
    host = reference_predictor.decode(state, coords, labels, tokens=MULTIMASK_TOKENS)
    kept = reference_predictor.decode(state, coords, labels, tokens=MULTIMASK_TOKENS, keep_on_device=True)
    assert torch.equal(host[0], kept[0].float().cpu()) and torch.equal(host[1], kept[1].cpu())


def generate_both(predictor, image, mode="hierarchical", **params):
    embedding = predictor.embed(image)
    out = {}
    for where in ("host", "device"):
        generator = EverythingGenerator(predictor, mode, postprocess=where, output_mode="coco_rle", **params)
        out[where] = (generator.generate(image, image_embedding=embedding), dict(generator.stats))
        out[where][1].pop("seconds")
    assert generator.on_device
    return out["host"], out["device"]


def test_hierarchical_records_identical_on_the_reference_model(reference_predictor, reference_image):
    (host, host_stats), (device, device_stats) = generate_both(
        reference_predictor, reference_image, points_per_side=16, pred_iou_thresh=0.0, stability_score_thresh=0.0,
        box_nms_thresh=1.0)
    assert len(host) > 10 and device == host
    assert device_stats == host_stats  # same stage-1 coverage, so the same stage-2 prompts


@pytest.fixture(scope="module")
def demo_predictor():
    return TinySamPredictor.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def large_photo():
    """Not square and larger than the model input: the host path takes its windowed resize, the device path
    the whole one."""
    rng = np.random.default_rng(0)
    image = np.full((750, 1000, 3), 30, np.uint8)
    for _ in range(12):
        y, x = rng.integers(0, 700), rng.integers(0, 950)
        image[y : y + rng.integers(30, 300), x : x + rng.integers(30, 300)] = rng.integers(60, 255, 3)
    return image


def test_hierarchical_records_identical_on_a_large_photo(demo_predictor, large_photo):
    (host, host_stats), (device, device_stats) = generate_both(demo_predictor, large_photo)
    assert len(host) >= 5 and device == host and device_stats == host_stats
    assert host_stats["stage2_points"] > 0 and host_stats["candidates"] > len(host)


def test_dense_crops_and_small_region_removal_identical(demo_predictor, large_photo):
    (host, _), (device, _) = generate_both(demo_predictor, large_photo, "dense", crop_n_layers=1,
                                           points_per_side=8, min_mask_region_area=200)
    assert len(host) >= 5 and device == host
    assert {tuple(r["crop_box"]) for r in host} != {(0.0, 0.0, 1000.0, 750.0)}  # crop masks are among them
