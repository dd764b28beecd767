"""The `tinysam` command: everything over a folder (valid COCO JSON), segment, models, clear failures."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from tinysam_kit.cli import main
from tinysam_kit.data.images import load_image
from tinysam_kit.inference.encodings.coco import coco_rle_to_mask
from tinysam_kit.inference.everything import generate_everything
from tinysam_kit.inference.predictor import TinySamPredictor

LOOSE = ["--pred-iou-thresh", "0", "--stability-score-thresh", "0", "--points-per-side", "8"]


@pytest.fixture()
def folder(tmp_path):
    rng = np.random.default_rng(0)
    d = tmp_path / "images"
    (d / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.jpg", "sub/c.png"]):
        img = np.full((48 + 8 * i, 64, 3), 30, np.uint8)
        img[10:30, 10 + i * 5 : 40] = rng.integers(100, 255, 3)
        Image.fromarray(img).save(d / name)
    return d


def test_everything_folder_writes_valid_coco(folder, tmp_path, tiny_random_checkpoint, capsys):
    out = tmp_path / "out"
    code = main(["everything", str(folder), "--out", str(out), "--model", str(tiny_random_checkpoint), *LOOSE])
    assert code == 0
    merged = json.loads((out / "annotations.json").read_text())
    assert len(merged["images"]) == 3
    assert len({a["id"] for a in merged["annotations"]}) == len(merged["annotations"]) > 0
    predictor = TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu")
    for image in merged["images"]:
        path = folder / image["file_name"]
        doc = json.loads((out / (image["file_name"].rsplit(".", 1)[0].replace("/", "__") + ".json")).read_text())
        expected = generate_everything(predictor, load_image(path), pred_iou_thresh=0, stability_score_thresh=0,
                                       points_per_side=8)
        anns = doc["annotations"]
        assert len(anns) == len(expected)
        for ann, rec in zip(anns, expected):
            mask = coco_rle_to_mask(ann["segmentation"])
            assert mask.shape == (image["height"], image["width"])
            assert np.array_equal(mask, rec["segmentation"])
            assert ann["area"] == int(mask.sum()) and ann["bbox"] == rec["bbox"]
        assert (out / (image["file_name"].rsplit(".", 1)[0].replace("/", "__") + "_overlay.png")).is_file()


def test_everything_polygons_cover_the_rle_masks(folder, tmp_path, capsys):
    from tinysam_kit.inference.encodings.polygons import mask_to_parts, polygons_to_mask

    rle_out, poly_out = tmp_path / "rle", tmp_path / "poly"
    common = [str(folder), "--model", "demo", "--no-preview", "--points-per-side", "8"]
    assert main(["everything", *common, "--out", str(rle_out)]) == 0
    assert main(["everything", *common, "--out", str(poly_out), "--polygons"]) == 0
    rle = json.loads((rle_out / "annotations.json").read_text())
    poly = json.loads((poly_out / "annotations.json").read_text())
    assert len(poly["annotations"]) == len(rle["annotations"]) > 0
    sizes = {img["id"]: (img["height"], img["width"]) for img in poly["images"]}
    for a, b in zip(rle["annotations"], poly["annotations"]):
        assert isinstance(b["segmentation"], list) and all(len(part) >= 6 for part in b["segmentation"])
        mask = coco_rle_to_mask(a["segmentation"])
        solid = polygons_to_mask(mask_to_parts(mask, tolerance=0, min_area=0), *mask.shape) | mask
        drawn = polygons_to_mask(b["segmentation"], *sizes[b["image_id"]])
        iou = (solid & drawn).sum() / max((solid | drawn).sum(), 1)
        # boundary pixels weigh more in small masks, and specks below the part minimum get no polygon
        assert iou >= (0.95 if mask.sum() >= 1000 else 0.85), (int(mask.sum()), iou)
        assert b["area"] == a["area"] and b["bbox"] == a["bbox"]
    assert json.loads(next(poly_out.glob("a.json")).read_text())["info"]["segmentation"]["format"] == "polygons"
    assert main(["everything", *common, "--out", str(tmp_path / "x"), "--polygon-tolerance", "1"]) == 2
    assert "--polygon-tolerance needs --polygons" in capsys.readouterr().err


def test_everything_resumes_and_reports_bad_images(folder, tmp_path, tiny_random_checkpoint, capsys):
    out = tmp_path / "out"
    args = ["everything", str(folder), "--out", str(out), "--model", str(tiny_random_checkpoint), "--no-preview"]
    assert main(args) == 0
    first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "annotations.json"}
    (folder / "broken.png").write_bytes(b"garbage")
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "3 image(s) already done" in err and "broken.png" in err
    again = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "annotations.json"}
    assert again == first  # finished images were not recomputed


def test_everything_reads_a_list_file(folder, tmp_path, tiny_random_checkpoint, capsys):
    """A list file names images anywhere (relative to the list or absolute); a missing one is reported as a
    failure, the others are done, with keys relative to the deepest folder holding them all."""
    from tinysam_kit.cli.common import images_root, list_images

    listing = folder / "batch.txt"
    listing.write_text(f"# tonight's batch\nsub/c.png\n\n{folder / 'a.png'}\nsub/c.png\ngone.png\n")
    images = list_images(listing)
    assert images == [folder / "sub" / "c.png", folder / "a.png", folder / "gone.png"]  # in order, each once
    assert images_root(listing, images) == folder
    assert images_root(folder / "sub" / "c.png", [folder / "sub" / "c.png"]) == folder / "sub"
    out = tmp_path / "out"
    code = main(["everything", str(listing), "--out", str(out), "--model", str(tiny_random_checkpoint), "--no-preview",
                 *LOOSE])
    assert code == 1 and "gone.png" in capsys.readouterr().err
    merged = json.loads((out / "annotations.json").read_text())
    assert [i["file_name"] for i in merged["images"]] == ["sub/c.png", "a.png"]
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "annotations.json", "sub__c.json"]
    (folder / "empty.txt").write_text("# nothing\n")
    assert main(["everything", str(folder / "empty.txt"), "--out", str(out)]) == 2
    assert "the list names no images" in capsys.readouterr().err


def test_segment_writes_mask(folder, tmp_path, tiny_random_checkpoint, capsys):
    out = tmp_path / "mask.png"
    code = main(["segment", str(folder / "a.png"), "--point", "20,20", "--point", "5,5,0", "--box", "5,5,45,35",
                 "--out", str(out), "--model", str(tiny_random_checkpoint), "--all-masks"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    mask = np.asarray(Image.open(out))
    assert mask.shape == (48, 64) and set(np.unique(mask)) <= {0, 255}
    assert summary["area"] == int((mask > 0).sum())
    assert all((tmp_path / f"mask_{i}.png").is_file() for i in range(3))


def test_segment_errors_are_one_line(folder, tmp_path, tiny_random_checkpoint, capsys):
    model = ["--model", str(tiny_random_checkpoint)]
    assert main(["segment", str(folder / "a.png"), "--point", "500,5", "--out", str(tmp_path / "m.png"), *model]) == 2
    assert "outside the 64×48 image" in capsys.readouterr().err
    assert main(["segment", str(tmp_path / "nope.png"), "--point", "1,1", "--out", str(tmp_path / "m.png"),
                 *model]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", str(folder / "a.png"), "--out", str(tmp_path / "m.png"), *model]) == 2
    assert "at least one --point" in capsys.readouterr().err
    assert main(["everything", str(tmp_path / "none"), "--out", str(tmp_path / "o"), *model]) == 2


def test_models_list(capsys):
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "tinysam" in out and "mobilesam" in out and "tinysam-v1" in out


def test_official_weights_unavailable_is_a_clear_message(tmp_path, monkeypatch, capsys):
    from tinysam_kit.inference import policy
    from tinysam_kit.models import registry

    policy._resolve_auto.cache_clear()  # `auto` is decided once per process: decide it again for this registry

    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path))
    spec = registry.MODELS["tinysam"]
    monkeypatch.setitem(registry.MODELS, "tinysam",
                        registry.ModelSpec(spec.name, spec.filename, "http://127.0.0.1:9/tinysam_42.3.pth",
                                           None, spec.config))
    monkeypatch.delitem(registry.MODELS, "demo", raising=False)
    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)
    assert main(["everything", str(img), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "tinysam_42.3.pth" in err and str(tmp_path / "tinysam_42.3.pth") in err
    assert "Traceback" not in err
    policy._resolve_auto.cache_clear()  # nor may this registry's answer outlive the test


def test_a_model_loads_under_one_name_everywhere(tiny_random_checkpoint):
    """The name that picks a model's registered everything-mode values: the same for the loaded engine and for
    the commands that only pass the model on (worker processes, Ray actors)."""
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.models.registry import model_name_of

    assert model_name_of("demo") == "demo"
    assert model_name_of(tiny_random_checkpoint) == tiny_random_checkpoint.stem
    assert TinySamPredictor.from_pretrained(str(tiny_random_checkpoint), device="cpu").model_name == \
        model_name_of(tiny_random_checkpoint)
