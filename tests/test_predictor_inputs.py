"""Images of every kind users have, precise prompt errors, and the embedding cache."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tinysam_kit.data.images import ImageError, load_image, to_rgb_uint8
from tinysam_kit.inference.predictor import EmbeddingCache, ImageEmbedding, PromptError, TinySamPredictor


@pytest.fixture(scope="module")
def predictor(tiny_random_checkpoint):
    return TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu")


@pytest.fixture(scope="module")
def rgb():
    rng = np.random.default_rng(3)
    return rng.integers(0, 256, size=(60, 80, 3), dtype=np.uint8)


class CountingEngine:
    """Wraps a real engine to count encoder runs."""

    def __init__(self, engine):
        self.inner = engine
        self.info = engine.info
        self.encodes = 0

    def encode(self, image):
        self.encodes += 1
        return self.inner.encode(image)

    def decode(self, *args, **kwargs):
        return self.inner.decode(*args, **kwargs)

    def embedding_nbytes(self, emb):
        return self.inner.embedding_nbytes(emb)


# ---------------------------------------------------------------- image kinds
def test_gray_rgba_16bit_float_bgr(rgb):
    gray = rgb[:, :, 0]
    assert np.array_equal(to_rgb_uint8(gray), np.repeat(gray[:, :, None], 3, axis=2))
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 7, np.uint8)])
    assert np.array_equal(to_rgb_uint8(rgba), rgb)
    assert np.array_equal(to_rgb_uint8(rgb[:, :, ::-1], "BGR"), rgb)
    sixteen = rgb.astype(np.uint16) * 257
    assert np.array_equal(to_rgb_uint8(sixteen), rgb)
    assert np.array_equal(to_rgb_uint8(rgb / 255.0), rgb)
    assert to_rgb_uint8(np.ones((4, 5), bool)).max() == 255


def test_files_of_every_mode(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgb[:, :, 0]).save(tmp_path / "gray.png")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(rgb[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "gray16.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    for name in ["rgb.png", "gray.png", "rgba.png", "gray16.png", "palette.png", "cmyk.jpg"]:
        arr = load_image(tmp_path / name)
        assert arr.shape == (60, 80, 3) and arr.dtype == np.uint8, name
    assert np.array_equal(load_image(tmp_path / "rgba.png"), rgb)
    assert np.array_equal(load_image(tmp_path / "gray16.png")[:, :, 0], rgb[:, :, 0])


def test_exif_rotation_is_applied(rgb):
    img = Image.fromarray(rgb)
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise for display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif, quality=95)
    arr = load_image(buf.getvalue())
    assert arr.shape == (80, 60, 3)


def test_bad_images_are_precise(tmp_path):
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(b"not an image at all")
    with pytest.raises(ImageError, match="cannot decode"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(ImageError, match="zero size"):
        to_rgb_uint8(np.zeros((0, 10, 3), np.uint8))
    with pytest.raises(ImageError, match="expected"):
        to_rgb_uint8(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(ImageError, match="NaN"):
        to_rgb_uint8(np.full((4, 4), np.nan))


# -------------------------------------------------------------------- prompts
def test_prompt_errors(predictor, rgb):
    state = predictor.set_image(rgb)
    cases = [
        (dict(point_coords=[[100, 10]], point_labels=[1]), "outside the 80×60 image"),
        (dict(point_coords=[[np.nan, 10]], point_labels=[1]), "NaN"),
        (dict(point_coords=[[1, 2, 3]], point_labels=[1]), r"shape \(N, 2\)"),
        (dict(point_coords=[[1, 2]], point_labels=[2]), "must be 0 .background. or 1"),
        (dict(point_coords=[[1, 2]], point_labels=[1, 0]), "does not match"),
        (dict(point_coords=[[1, 2]]), "point_labels are required"),
        (dict(point_labels=[1]), "without point_coords"),
        (dict(), "empty prompt"),
        (dict(point_coords=np.zeros((0, 2)), point_labels=[]), "empty"),
        (dict(box=[10, 10, 5, 20]), "x0 <= x1"),
        (dict(box=[0, 0, 200, 20]), "outside"),
        (dict(box=[0, 0, 20]), "4 numbers"),
        (dict(box=["a", 0, 1, 1]), "numeric"),
        (dict(mask_input=np.zeros((10, 10))), "low-resolution logits"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PromptError, match=message):
            predictor.predict(image_embedding=state, **kwargs)


def test_predict_before_set_image(tiny_random_checkpoint):
    fresh = TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu")
    with pytest.raises(PromptError, match="no image set"):
        fresh.predict([[1, 1]], [1])


def test_shapes_and_best(predictor, rgb):
    state = predictor.set_image(rgb)
    masks, ious, low = predictor.predict([[10, 10], [40, 30]], [1, 0], image_embedding=state)
    assert masks.shape == (3, 60, 80) and masks.dtype == bool and ious.shape == (3,) and low.shape == (3, 64, 64)
    single, iou1, _ = predictor.predict([[10, 10]], [1], multimask_output=False)
    assert single.shape == (1, 60, 80)
    best, score = predictor.predict_best(box=[5, 5, 50, 40])
    masks, ious, _ = predictor.predict(box=[5, 5, 50, 40])
    assert score == pytest.approx(float(ious.max())) and np.array_equal(best, masks[int(np.argmax(ious))])
    masks, ious, _ = predictor.predict(point_coords=[[10, 10]], point_labels=[1], mask_input=low[0])
    assert masks.shape == (3, 60, 80)
    # masks (upsampled only where they can be true) are the thresholded full-resolution logits
    logits, _, _ = predictor.predict(point_coords=[[10, 10]], point_labels=[1], mask_input=low[0],
                                     return_logits=True)
    assert logits.dtype == np.float32 and np.array_equal(masks, logits > 0)


def test_batched_boxes_and_points(predictor, rgb):
    state = predictor.set_image(rgb)
    boxes = np.array([[5, 5, 30, 30], [20, 10, 70, 50], [0, 0, 80, 60]], float)
    masks, ious, _ = predictor.predict_batch(boxes=boxes, image_embedding=state)
    assert masks.shape == (3, 3, 60, 80) and ious.shape == (3, 3)
    for i, box in enumerate(boxes):
        m, s, _ = predictor.predict(box=box, image_embedding=state)
        np.testing.assert_allclose(s, ious[i], atol=1e-5)
    pts = np.array([[[10, 10], [50, 40]], [[60, 20], [5, 5]]], float)
    labels = np.array([[1, 0], [1, 1]])
    masks, ious, _ = predictor.predict_batch(pts, labels, image_embedding=state)
    assert masks.shape == (2, 3, 60, 80)
    with pytest.raises(PromptError, match="2 boxes but 3 point sets"):
        predictor.predict_batch(np.zeros((3, 1, 2)), np.ones((3, 1)), boxes=boxes[:2])


# ---------------------------------------------------------------------- cache
def test_repeated_clicks_never_reencode(predictor, rgb):
    counting = CountingEngine(predictor.engine)
    p = TinySamPredictor(counting)
    p.set_image(rgb)
    for x in range(5, 50, 5):
        p.predict([[x, 10]], [1])
    p.set_image(rgb.copy())  # same content, new array: the content key hits
    p.set_image(rgb, key="task-1")
    p.set_image(np.zeros_like(rgb), key="task-1")  # the caller's key wins over content
    assert counting.encodes == 2
    assert p.cache.hits >= 2


def test_cache_is_bounded_in_bytes():
    cache = EmbeddingCache(max_bytes=250)
    for i in range(5):
        cache.put(ImageEmbedding(f"k{i}", None, (1, 1), (1, 1), 100))
    assert len(cache) == 2 and cache.nbytes == 200
    assert "k4" in cache and "k3" in cache and "k0" not in cache
    cache.get("k3")
    cache.put(ImageEmbedding("k5", None, (1, 1), (1, 1), 100))
    assert "k3" in cache and "k4" not in cache
    cache.put(ImageEmbedding("huge", None, (1, 1), (1, 1), 1000))
    assert "huge" not in cache


def test_same_size_upsampling_shortcut_is_exact():
    import torch
    import torch.nn.functional as F

    x = torch.randn(3, 1, 96, 128) * 50
    assert torch.equal(F.interpolate(x, (96, 128), mode="bilinear", align_corners=False), x)
