"""`dataset.apply_model(TinySamModel, ...)` with FiftyOne SAM's prompt arguments, and the remote zoo source."""

from __future__ import annotations

import http.server
import shutil
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path

import numpy as np
import pytest
from fiftyone_helpers import ZOO_DIR, demo_model_available, make_images, polylines_iou

FAST = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("model_images"), 3, seed=5)


@pytest.fixture
def dataset(fo, images):
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=str(p)) for p in images], progress=False)
    for sample in ds:
        sample["gt"] = fo.Detections(detections=[fo.Detection(label="cat", bounding_box=[0.2, 0.1, 0.5, 0.6])])
        kp = fo.Keypoint(label="dog", points=[[0.4, 0.4], [0.8, 0.2]], sam_labels=[1, 0])
        sample["kps"] = fo.Keypoints(keypoints=[kp])
        sample.save()
    yield ds
    ds.delete()


@pytest.fixture(scope="module")
def model(fo, tiny_random_checkpoint):
    from tinysam_kit.integrations.fiftyone.model import TinySamModel

    return TinySamModel(model=str(tiny_random_checkpoint), everything=FAST)


def pasted(det, w, h):
    x, y = round(det.bounding_box[0] * w), round(det.bounding_box[1] * h)
    m = det.get_mask()
    out = np.zeros((h, w), dtype=bool)
    out[y : y + m.shape[0], x : x + m.shape[1]] = m
    return out


def test_apply_model_with_box_and_point_prompts_matches_predictor(dataset, model):
    from tinysam_kit.data.images import load_image

    assert not any(m.startswith("torchvision") for m in sys.modules)
    dataset.apply_model(model, "boxes_sam", box_prompt_field="gt", progress=False)
    dataset.apply_model(model, "points_sam", point_prompt_field="kps", progress=False)
    dataset.apply_model(model, "legacy_sam", prompt_field="gt", progress=False)
    p = model.predictor
    for sample in dataset:
        image = load_image(sample.filepath)
        h, w = image.shape[:2]
        x, y, bw, bh = sample.gt.detections[0].bounding_box
        mask, score, _ = p.segment(box=[x * w, y * h, (x + bw) * w, (y + bh) * h], image_embedding=p.embed(image))
        det = sample.boxes_sam.detections[0]
        assert det.label == "cat" and det.confidence == pytest.approx(score, abs=1e-6)
        np.testing.assert_array_equal(pasted(det, w, h), mask)
        np.testing.assert_array_equal(pasted(sample.legacy_sam.detections[0], w, h), mask)
        mask, _, _ = p.segment(point_coords=[[0.4 * w, 0.4 * h], [0.8 * w, 0.2 * h]], point_labels=[1, 0],
                               image_embedding=p.embed(image))
        np.testing.assert_array_equal(pasted(sample.points_sam.detections[0], w, h), mask)


def test_apply_model_without_prompts_segments_everything(dataset, model):
    from tinysam_kit.data.images import load_image
    from tinysam_kit.inference.everything import generate_everything
    from tinysam_kit.inference.policy import everything_params

    dataset.apply_model(model, "auto", progress=False)
    sample = dataset.first()
    params = everything_params(model.predictor.model_name, FAST, prelabel=True)
    records = generate_everything(model.predictor, load_image(sample.filepath), **params)
    assert [round(d.predicted_iou, 6) for d in sample.auto.detections] == [round(r["predicted_iou"], 6)
                                                                           for r in records]
    assert all(0 <= d.confidence <= 1 for d in sample.auto.detections)


def test_apply_model_writes_polylines(fo, dataset, tiny_random_checkpoint):
    from tinysam_kit.data.images import load_image
    from tinysam_kit.integrations.fiftyone.model import TinySamModel

    model = TinySamModel(model=str(tiny_random_checkpoint), output="polylines")
    dataset.apply_model(model, "outlines", box_prompt_field="gt", progress=False)
    p = model.predictor
    for sample in dataset:
        image = load_image(sample.filepath)
        h, w = image.shape[:2]
        x, y, bw, bh = sample.gt.detections[0].bounding_box
        mask, score, _ = p.segment(box=[x * w, y * h, (x + bw) * w, (y + bh) * h], image_embedding=p.embed(image))
        parts = sample.outlines.polylines
        assert parts and all(pl.closed and pl.filled and pl.label == "cat" for pl in parts)
        assert all(pl.confidence == pytest.approx(score, abs=1e-6) for pl in parts)
        assert polylines_iou(parts, mask) >= 0.95
    with pytest.raises(ValueError, match="output must be one of"):
        TinySamModel(model=str(tiny_random_checkpoint), output="masks")


def test_compute_embeddings_gives_the_pooled_image_embedding(dataset, model):
    from tinysam_kit.data.images import load_image

    assert model.has_embeddings
    embeddings = dataset.compute_embeddings(model, progress=False)
    raw = model.predictor.embed(load_image(dataset.first().filepath), cache=False).embedding
    raw = raw.float().cpu().numpy() if hasattr(raw, "cpu") else np.asarray(raw)
    assert embeddings.shape == (len(dataset), raw.shape[-3])
    np.testing.assert_allclose(embeddings[0], raw.reshape(raw.shape[-3], -1).mean(axis=1), rtol=1e-5, atol=1e-6)
    dataset.compute_embeddings(model, embeddings_field="tinysam_embedding", progress=False)
    np.testing.assert_allclose(dataset.first().tinysam_embedding, embeddings[0], rtol=1e-6)


def test_brain_similarity_with_tinysam_embeddings(dataset, model):
    brain = pytest.importorskip("fiftyone.brain", reason="fiftyone-brain is not installed")
    pytest.importorskip("sklearn", reason="the Brain's default similarity backend needs scikit-learn")
    index = brain.compute_similarity(dataset, model=model, brain_key="tinysam_sim", backend="sklearn")
    assert index.total_index_size == len(dataset) == 3
    query = dataset.first().id
    nearest = dataset.sort_by_similarity(query, k=3, brain_key="tinysam_sim").values("id")
    assert nearest[0] == query and len(nearest) == 3


def test_apply_model_rejects_unknown_arguments(dataset, model):
    with pytest.raises(ValueError, match="unsupported argument"):
        dataset.apply_model(model, "x", mask_prompt_field="gt", progress=False)


def test_zoo_source_registers_and_loads(fo, tmp_path, tiny_random_checkpoint, dataset, monkeypatch):
    """Register the zoo folder the way users do (an archive URL), served from 127.0.0.1."""
    import importlib.metadata

    import fiftyone.zoo as foz

    try:
        importlib.metadata.version("tinysam-kit")
    except importlib.metadata.PackageNotFoundError:
        # Running from a source checkout that is importable but not pip-installed: the manifest's
        # requirement check cannot see it (CI installs the package, so there the check runs for real).
        monkeypatch.setattr(fo.config, "requirement_error_level", 1)

    archive = tmp_path / "tinysam-zoo.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in ZOO_DIR.iterdir():
            if f.is_file():
                zf.write(f, f"tinysam-zoo/{f.name}")
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/tinysam-zoo.zip"
    try:
        foz.register_zoo_model_source(url)
        names = foz.list_zoo_models(source=url)
        assert {"tinysam", "tinysam-v1", "tinysam-demo"} <= set(names)
        if demo_model_available():
            model = foz.load_zoo_model("tinysam-demo", everything=FAST)
        else:
            # No trained weights offline: place the small test checkpoint where the zoo keeps "tinysam"
            # so the rest of FiftyOne's path (manifest → our load_model → TinySamModel) runs for real.
            zoo_dir = Path(fo.config.model_zoo_dir) / "tinysam-kit" / "tinysam"
            shutil.copy(tiny_random_checkpoint, zoo_dir / "tinysam_42.3.pth")
            shutil.copy(f"{tiny_random_checkpoint}.json", zoo_dir / "tinysam_42.3.pth.json")
            model = foz.load_zoo_model("tinysam", everything=FAST)
        from tinysam_kit.integrations.fiftyone.model import TinySamModel

        assert isinstance(model, TinySamModel)
        dataset.apply_model(model, "zoo_masks", box_prompt_field="gt", progress=False)
        assert len(dataset.exists("zoo_masks")) == len(dataset)
    finally:
        server.shutdown()
        server.server_close()
        foz.delete_zoo_model_source(url)


def test_zoo_download_uses_the_registry(fo, tmp_path):
    """download_model records the registered model at FiftyOne's model path; load_model resolves it through
    the registry (and still takes weights placed there by hand)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("tinysam_zoo_source", ZOO_DIR / "__init__.py")
    zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(zoo)
    with pytest.raises(ValueError, match="unknown TinySAM zoo model"):
        zoo.download_model("sam-huge", str(tmp_path / "x.pth"))
    assert demo_model_available(), "the demo model is committed with the package"
    target = tmp_path / "m" / "tinysam_demo.pth"
    zoo.download_model("tinysam-demo", str(target))
    assert target.is_file()
    model = zoo.load_model("tinysam-demo", str(target))
    assert model.model_choice.name == "demo" and model.predictor.model_name == "demo"
