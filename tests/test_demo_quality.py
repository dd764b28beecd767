"""The bundled `demo` model segments what it is asked to, on held-out synthetic images.

Thresholds are the acceptance criteria of the demo model: one click inside an object → that object
(mean IoU ≥ 0.85), its box → that object (mean IoU ≥ 0.9), everything mode finds ≥ 80 % of the
objects at IoU ≥ 0.5. World indices from HELD_OUT_START on are never drawn by training.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tinysam_kit.models.registry import MODELS, PACKAGE_WEIGHTS, infer_config, sha256_file
from tinysam_kit.training.evaluate import evaluate_everything, evaluate_prompts, held_out_indices
from tinysam_kit.training.synthetic import SyntheticWorld

DEMO_FILE = PACKAGE_WEIGHTS / MODELS["demo"].filename if "demo" in MODELS else None
pytestmark = pytest.mark.skipif(DEMO_FILE is None or not DEMO_FILE.is_file(),
                                reason="the demo model is not registered/bundled in this checkout")


@pytest.fixture(scope="module")
def predictor():
    from tinysam_kit.operators.predictor import TinySamPredictor

    return TinySamPredictor.from_pretrained("demo", device="cpu")


@pytest.fixture(scope="module")
def prompt_quality(predictor):
    return evaluate_prompts(predictor, SyntheticWorld(seed=0), held_out_indices(16)).summary()


def test_demo_file_is_small_verified_and_in_the_official_layout():
    from tinysam_kit.models.checkpoint import read_state_dict
    from tinysam_kit.models.sam import build_model

    spec = MODELS["demo"]
    assert spec.bundled and DEMO_FILE.stat().st_size <= 8 * 1024 * 1024
    assert sha256_file(DEMO_FILE) == spec.sha256
    state = read_state_dict(DEMO_FILE)
    expected = build_model(spec.config).state_dict()
    assert list(state) == list(expected)
    assert all(state[k].shape == v.shape and state[k].dtype == v.dtype for k, v in expected.items())
    # the architecture is recoverable from the weights (input size, decoder heads and the unused
    # head count of the convolutional stage 0 aside)
    inferred, declared = infer_config(state, img_size=spec.config.img_size).encoder, spec.config.encoder
    assert (inferred.embed_dims, inferred.depths, inferred.num_heads[1:], inferred.window_sizes[1:]) == \
        (declared.embed_dims, declared.depths, declared.num_heads[1:], declared.window_sizes[1:])
    assert inferred.mbconv_expand_ratio == declared.mbconv_expand_ratio
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_one_click_inside_an_object_returns_that_object(prompt_quality):
    assert prompt_quality["objects"] >= 50
    assert prompt_quality["point_center_miou"] >= 0.85, prompt_quality


def test_a_box_returns_its_object(prompt_quality):
    assert prompt_quality["box_miou"] >= 0.9, prompt_quality


def test_everything_mode_recovers_most_objects(predictor):
    result = evaluate_everything(predictor, SyntheticWorld(seed=0), held_out_indices(6, start=100))
    assert result["objects"] >= 20
    assert result["recall"] >= 0.8, result


def test_a_click_on_one_object_does_not_spill_onto_its_neighbours(predictor):
    world = SyntheticWorld(seed=0)
    sample = world[held_out_indices(1, start=200)[0]]
    state = predictor.embed(sample.image)
    from tinysam_kit.training.evaluate import interior_point

    for k, gt in enumerate(sample.masks):
        mask, _ = predictor.predict_best(point_coords=[interior_point(gt)], point_labels=[1],
                                         image_embedding=state)
        others = np.delete(sample.masks, k, axis=0).any(axis=0)
        assert (mask & others).sum() <= 0.1 * gt.sum()
