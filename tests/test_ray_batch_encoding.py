"""The throughput path under the Ray pipeline: batched encoding in both engines gives the per-image
embeddings and records, the COCO sink is atomic, idempotent and resumable, and Ray stays optional."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tinysam_kit.inference.batch import CocoFolderSink, PrelabelResult, coco_key, embed_many, run_everything
from tinysam_kit.inference.predictor import TinySamPredictor
from tinysam_kit.runtime import create_engine

LOOSE = {"points_per_side": 8, "pred_iou_thresh": 0, "stability_score_thresh": 0, "output_mode": "coco_rle"}


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(1)
    out = []
    for i in range(3):
        img = np.full((40 + 12 * i, 64, 3), 20, np.uint8)
        img[5:30, 8 + 3 * i: 50] = rng.integers(90, 255, 3)
        out.append(img)
    return out


@pytest.fixture(scope="module")
def predictor(tiny_random_checkpoint):
    return TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu")


def assert_batch_matches_single(engine, images, predictor):
    batch = torch.cat([predictor.preprocess(image)[0] for image in images])
    together = engine.encode_batch(batch)
    alone = [engine.encode(batch[i: i + 1]) for i in range(len(images))]
    assert len(together) == len(images)
    for a, b in zip(together, alone):
        a, b = torch.as_tensor(np.asarray(a)), torch.as_tensor(np.asarray(b))
        assert a.shape == b.shape and a.shape[0] == 1
        assert (a - b).abs().max() <= 1e-5 * max(1.0, float(b.abs().max()))


@pytest.mark.parametrize("exact", [False, True])
def test_torch_encode_batch_equals_per_image_encode(tiny_random_checkpoint, images, predictor, exact):
    engine = create_engine(str(tiny_random_checkpoint), engine="torch", device="cpu", exact=exact)
    assert_batch_matches_single(engine, images, predictor)


def test_onnx_encode_batch_equals_per_image_encode(tiny_random_checkpoint, images, predictor):
    pytest.importorskip("onnxruntime")
    engine = create_engine(str(tiny_random_checkpoint), engine="onnx", device="cpu")
    assert_batch_matches_single(engine, images, predictor)


@pytest.fixture(scope="module")
def demo_predictor():
    return TinySamPredictor.from_pretrained("demo", device="cpu")


def test_batched_run_gives_the_per_image_records(demo_predictor, images, tmp_path):
    """With the bundled model, batched encoding is bit-identical on CPU, so the records are too."""
    predictor = demo_predictor
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"nope")
    paths.insert(1, tmp_path / "bad.png")
    one = list(run_everything(predictor, paths, batch_size=1, points_per_side=8, output_mode="coco_rle"))
    three = list(run_everything(predictor, paths, batch_size=3, points_per_side=8, output_mode="coco_rle"))
    assert [r.item for r in one] == [r.item for r in three] == paths
    assert one[1].error and three[1].error and "bad.png" in three[1].error
    assert [r.records for r in one] == [r.records for r in three]
    assert all(r.records for r in three if r.error is None)
    states = embed_many(predictor, images)
    for image, state in zip(images, states):
        single = predictor.embed(image, cache=False)
        assert state.original_size == single.original_size and state.input_size == single.input_size
        assert torch.equal(torch.as_tensor(state.embedding), torch.as_tensor(single.embedding))


def test_coco_sink_is_atomic_idempotent_and_resumable(predictor, images, tmp_path):
    root = tmp_path / "imgs"
    (root / "sub").mkdir(parents=True)
    paths = [root / "a.png", root / "sub" / "b.png"]
    for path, image in zip(paths, images):
        Image.fromarray(image).save(path)
    keys = [coco_key(p, root) for p in paths]
    assert keys == ["a", "sub__b"]
    sink = CocoFolderSink(tmp_path / "out", root, info={"mode": "hierarchical"}, order=keys[::-1])
    assert sink.done_keys() == set()
    results = list(run_everything(predictor, paths, **LOOSE))
    for key, res in zip(keys, results):
        sink.write(key, res)
    first = (tmp_path / "out" / "a.json").read_bytes()
    sink.write("a", results[0])  # a second delivery leaves one identical file
    assert (tmp_path / "out" / "a.json").read_bytes() == first
    assert sink.done_keys() == set(keys)
    assert not list((tmp_path / "out").glob("*.tmp"))
    merged = sink.close()
    assert [i["file_name"] for i in merged["images"]] == ["sub/b.png", "a.png"]  # in the given order
    assert json.loads((tmp_path / "out" / "annotations.json").read_text()) == merged
    doc = json.loads(first)
    assert doc["info"]["model_version"] == predictor.model_version and doc["info"]["mode"] == "hierarchical"
    assert isinstance(sink, __import__("tinysam_kit.inference.batch", fromlist=["Sink"]).Sink)
    assert isinstance(results[0], PrelabelResult)


def test_ray_is_optional_and_its_absence_is_one_clear_line(tmp_path, tiny_random_checkpoint):
    """Without ray, importing the integration works, and `--ray` fails with an install hint (exit 2)."""
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "x.png")
    code = (
        "import sys; sys.modules['ray'] = None\n"
        "import tinysam_kit.integrations.ray as r\n"
        "from tinysam_kit.cli import main\n"
        f"sys.exit(main(['everything', {str(tmp_path)!r}, '--out', {str(tmp_path / 'o')!r}, '--model', "
        f"{str(tiny_random_checkpoint)!r}, '--ray', 'auto']))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "pip install 'tinysam-kit[ray]'" in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 2


def test_background_writer_writes_everything_and_reports_errors():
    from tinysam_kit.inference.batch import BackgroundWriter

    class ListSink:
        def __init__(self):
            self.written = []

        def done_keys(self):
            return {k for k, _ in self.written}

        def write(self, key, result):
            if key == "bad":
                raise OSError("disk full")
            self.written.append((key, result))

    sink = ListSink()
    writer = BackgroundWriter(sink, depth=1)
    for i in range(5):
        writer.write(str(i), PrelabelResult(i, [], None))
    writer.flush()
    assert [k for k, _ in sink.written] == ["0", "1", "2", "3", "4"] and writer.done_keys() == set("01234")
    failing = BackgroundWriter(ListSink())
    failing.write("bad", PrelabelResult(0, [], None))
    with pytest.raises(OSError, match="disk full"):
        failing.close()
