"""The predictor reproduces the official implementation's numbers (../shared/reference/set_a)."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image

from tinysam_kit.data.preprocess import resized_shape


@pytest.fixture(scope="module")
def ref(reference_dir):
    return np.load(reference_dir / "predictor_A.npz"), json.loads((reference_dir / "predictor_A.json").read_text())


@pytest.fixture(scope="module")
def state(reference_predictor, reference_image):
    return reference_predictor.set_image(reference_image)


def unpack(packed, shape):
    return np.unpackbits(packed, count=int(np.prod(shape))).reshape(shape).astype(bool)


def test_resize_is_bit_exact(reference_image, ref):
    _, meta = ref
    h, w = reference_image.shape[:2]
    nh, nw = resized_shape(h, w, 1024)
    resized = np.asarray(Image.fromarray(reference_image).resize((nw, nh), Image.BILINEAR))
    assert list(resized.shape) == meta["meta"]["resized_image_shape"]
    assert hashlib.sha256(resized.tobytes()).hexdigest() == meta["meta"]["resized_image_sha256"]


def test_image_embedding(state, ref):
    arrays, _ = ref
    assert np.abs(state.embedding.numpy() - arrays["image_embedding"]).max() <= 1e-3
    assert state.input_size == (768, 1024)


def _case_inputs(meta, arrays, name, predictor, state):
    case = meta["prompts"]["cases"][name]
    mask_input = None
    if case.get("mask_input_from"):
        _, _, logits = predictor.predict(case["point_coords"], case["point_labels"], image_embedding=state)
        mask_input = logits[2][None]
        np.testing.assert_allclose(logits, arrays["point1__all4_low_res_logits"][1:], atol=1e-3, rtol=1e-5)
    return case["point_coords"], case["point_labels"], case["box"], mask_input


@pytest.mark.parametrize("name", ["point1", "points2", "box", "box_point", "point1_mask_input"])
def test_prompt_cases(reference_predictor, state, ref, name):
    arrays, meta = ref
    coords, labels, box, mask_input = _case_inputs(meta, arrays, name, reference_predictor, state)
    masks, ious, logits = reference_predictor.predict(coords, labels, box, mask_input, image_embedding=state)
    case_meta = meta["meta"]["cases"][name]
    if coords is not None:
        np.testing.assert_array_equal(
            reference_predictor.transform_coords(np.array(coords), state), case_meta["transformed_point_coords"]
        )
    ref_logits = arrays[f"{name}__low_res_logits"] if name != "point1" else arrays["point1__all4_low_res_logits"][1:]
    assert np.all(np.abs(logits - ref_logits) <= 1e-3 + 1e-5 * np.abs(ref_logits))
    assert np.abs(ious - arrays[f"{name}__iou_predictions"]).max() <= 1e-4
    ref_masks = unpack(arrays[f"{name}__masks_packed"], case_meta["masks_shape"])
    assert masks.shape == ref_masks.shape
    for m, r in zip(masks, ref_masks):
        assert (m != r).sum() <= 5, f"{(m != r).sum()} differing mask pixels"


@pytest.mark.parametrize("name", ["point1", "points2"])
def test_single_mask_token(reference_predictor, state, ref, name):
    arrays, meta = ref
    case = meta["prompts"]["cases"][name]
    masks, ious, logits = reference_predictor.predict(case["point_coords"], case["point_labels"],
                                                      multimask_output=False, image_embedding=state)
    assert masks.shape == (1, 480, 640)
    assert abs(ious[0] - arrays[f"{name}__single_mask_iou_prediction"][0]) <= 1e-4
    ref_mask = unpack(arrays[f"{name}__single_mask_packed"], (1, 480, 640))
    assert (masks != ref_mask).sum() <= 5
    if name == "points2":
        assert np.abs(logits - arrays["points2__single_mask_low_res_logits"]).max() <= 1e-3 + 1e-5 * 500


def test_sparse_embeddings(reference_predictor, state, ref):
    arrays, meta = ref
    for name in ["point1", "points2", "box", "box_point"]:
        case = meta["prompts"]["cases"][name]
        coords, labels, boxes, _ = reference_predictor.prepare_prompts(
            state, case["point_coords"], case["point_labels"], case["box"])
        pe = reference_predictor.engine.model.prompt_encoder
        points = (coords, labels) if coords is not None else None
        sparse, _ = pe(points, boxes, None)
        np.testing.assert_allclose(sparse.detach().numpy(), arrays[f"{name}__sparse_embeddings"], atol=1e-5)


def test_batched_matches_single(reference_predictor, state):
    coords = np.array([[[250, 180]], [[431.5, 300.25]]])
    labels = np.ones((2, 1))
    masks, ious, _ = reference_predictor.predict_batch(coords, labels, image_embedding=state)
    for i in range(2):
        m1, s1, _ = reference_predictor.predict(coords[i], labels[i], image_embedding=state)
        assert np.abs(s1 - ious[i]).max() < 1e-5
        assert (m1 != masks[i]).sum() <= 5
