"""The plugin's operators, driven through FiftyOne's own executor and delegated-operation service, on a
real FiftyOne database (private mongod per test session)."""

from __future__ import annotations

import numpy as np
import pytest
from fiftyone_helpers import PLUGIN_URI, make_images, polylines_iou

FAST = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("fo_images"), 4)


@pytest.fixture(scope="module")
def predictor(tiny_random_checkpoint):
    from tinysam_kit.inference.policy import EngineOptions
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor

    return get_predictor(EngineOptions(model=str(tiny_random_checkpoint)))


@pytest.fixture
def dataset(fo, images):
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=str(p)) for p in images], progress=False)
    yield ds
    ds.delete()


def run(operator: str, dataset, params: dict, **ctx):
    from fiftyone.operators import execute_operator

    return execute_operator(f"{PLUGIN_URI}/{operator}", dataset=dataset, params=params, **ctx)


def everything_params(model, **extra):
    return {"model": str(model), "label_field": "sam", **FAST, **extra}


def full_mask(det, width, height):
    """The detection's mask pasted back into a full-image canvas."""
    x, y, w, h = det.bounding_box
    x0, y0 = round(x * width), round(y * height)
    mask = det.get_mask()
    canvas = np.zeros((height, width), dtype=bool)
    canvas[y0 : y0 + mask.shape[0], x0 : x0 + mask.shape[1]] = mask > 0
    assert mask.shape == (round(h * height), round(w * width))
    return canvas


def field_content(dataset, field):
    out = []
    for sample in dataset.sort_by("filepath"):
        dets = sample[field]
        out.append(None if dets is None else [
            (d.label, tuple(np.round(d.bounding_box, 9)), round(d.confidence, 6), d.get_mask().tobytes())
            for d in dets.detections])
    return out


def test_plugin_and_operators_are_discovered(fo):
    import fiftyone.plugins as fop
    from fiftyone.operators import list_operators

    assert PLUGIN_URI in [p.name for p in fop.list_plugins()]
    uris = {op.uri for op in list_operators()}
    for name in ("segment_everything", "segment_with_prompts", "segment_selected_labels", "show_run_summary"):
        assert f"{PLUGIN_URI}/{name}" in uris


def test_segment_everything_immediate_matches_core(dataset, tiny_random_checkpoint, predictor):
    from tinysam_kit.data.images import load_image
    from tinysam_kit.inference.everything import generate_everything
    from tinysam_kit.inference.policy import everything_params as policy_params
    from tinysam_kit.inference.policy import report_score

    result = run("segment_everything", dataset, everything_params(tiny_random_checkpoint, label="thing",
                                                                  instance_map_field="sam_ids"))
    assert result.error is None, result.error
    assert result.result["processed"] == 4 and result.result["failed"] == 0
    assert result.result["workers"] == 1  # `auto` keeps 4 images in the operation's own process
    params = policy_params(predictor.model_name, FAST, prelabel=True)  # pre-labelling drops near-whole masks
    assert params["max_area_fraction"] < 1
    for sample in dataset:
        image = load_image(sample.filepath)
        h, w = image.shape[:2]
        records = generate_everything(predictor, image, **params)
        dets = sample.sam.detections
        assert len(dets) == len(records) > 0
        for det, rec in zip(dets, records):
            assert det.label == "thing"
            assert det.confidence == pytest.approx(report_score(rec["predicted_iou"]), abs=1e-6)
            assert det.predicted_iou == pytest.approx(rec["predicted_iou"], abs=1e-6)
            assert 0 <= det.confidence <= 1
            np.testing.assert_array_equal(full_mask(det, w, h), rec["segmentation"])
        ids = sample.sam_ids.get_mask()
        assert ids.shape == (h, w) and ids.max() == len(dets)
    info = dataset.get_run_info("tinysam_sam").config.serialize()
    assert info["model_version"] == predictor.model_version
    assert info["precision"] == "fp32" and info["parameters"]["everything"]["points_per_side"] == 8


@pytest.mark.slow
def test_segment_everything_in_model_processes_writes_what_one_process_writes(fo, images, tiny_random_checkpoint):
    """'Model processes' 2: two spawned processes compute, the operation's process alone writes; the labels
    equal a one-process run's."""
    datasets = [fo.Dataset() for _ in range(2)]
    try:
        for ds in datasets:
            ds.add_samples([fo.Sample(filepath=str(p)) for p in images], progress=False)
        one = run("segment_everything", datasets[0], everything_params(tiny_random_checkpoint, workers="1"))
        two = run("segment_everything", datasets[1], everything_params(tiny_random_checkpoint, workers="2"))
        assert one.error is None and two.error is None, (one.error, two.error)
        assert one.result["workers"] == 1 and two.result["workers"] == 2 and two.result["processed"] == 4
        assert field_content(datasets[0], "sam") == field_content(datasets[1], "sam")
        assert all(content for content in field_content(datasets[1], "sam"))
        with pytest.raises(Exception, match="model processes must be 'auto' or a positive integer"):
            run("segment_everything", datasets[1], everything_params(tiny_random_checkpoint, workers="two"))
    finally:
        for ds in datasets:
            ds.delete()


def test_everything_writes_masks_to_disk(dataset, tiny_random_checkpoint, tmp_path):
    params = everything_params(tiny_random_checkpoint, masks_on_disk=True, mask_dir=str(tmp_path / "masks"))
    result = run("segment_everything", dataset, params)
    assert result.error is None, result.error
    det = dataset.first().sam.detections[0]
    assert det.mask is None and det.mask_path.startswith(str(tmp_path / "masks" / "sam"))
    assert det.get_mask().any()


def test_max_masks_and_label_options(dataset, tiny_random_checkpoint):
    params = everything_params(tiny_random_checkpoint, max_masks=1, points_per_side=16, box_nms_thresh=1.0)
    assert run("segment_everything", dataset, params).error is None
    assert max(len(s.sam.detections) for s in dataset) == 1


def test_never_overwrites_an_existing_field(fo, dataset, tiny_random_checkpoint):
    for sample in dataset:
        sample["gt"] = fo.Detections(detections=[fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.5, 0.5])])
        sample.save()
    before = [s.to_dict() for s in dataset]
    with pytest.raises(Exception, match="already exists and was not written by TinySAM"):
        run("segment_everything", dataset, everything_params(tiny_random_checkpoint, label_field="gt"))
    assert [s.to_dict() for s in dataset] == before
    result = run("segment_everything", dataset, everything_params(tiny_random_checkpoint, label_field="gt",
                                                                  overwrite=True))
    assert result.error is None
    assert all(d.label == "object" for s in dataset for d in s.gt.detections)


def test_different_settings_refuse_to_mix_into_one_field(dataset, tiny_random_checkpoint):
    assert run("segment_everything", dataset, everything_params(tiny_random_checkpoint)).error is None
    with pytest.raises(Exception, match="different settings.*points_per_side|different settings"):
        run("segment_everything", dataset, everything_params(tiny_random_checkpoint, points_per_side=4))


def test_resume_skips_done_samples_and_equals_a_single_run(fo, dataset, tiny_random_checkpoint):
    reference = dataset.clone()
    try:
        assert run("segment_everything", reference, everything_params(tiny_random_checkpoint)).error is None
        first_two = dataset.limit(2).values("id")
        part = run("segment_everything", dataset, {**everything_params(tiny_random_checkpoint),
                                                   "view_target": "SELECTED_SAMPLES"}, selected=first_two)
        assert part.result["processed"] == 2
        rest = run("segment_everything", dataset, everything_params(tiny_random_checkpoint))
        assert rest.result["processed"] == 2 and rest.result["already_done"] == 2
        again = run("segment_everything", dataset, everything_params(tiny_random_checkpoint))
        assert again.result["processed"] == 0 and again.result["already_done"] == 4
        assert field_content(dataset, "sam") == field_content(reference, "sam")
    finally:
        reference.delete()


def test_missing_and_corrupt_files_are_reported_and_skipped(fo, dataset, tiny_random_checkpoint, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    dataset.add_samples([fo.Sample(filepath=str(tmp_path / "missing.jpg")), fo.Sample(filepath=str(corrupt))],
                        progress=False)
    result = run("segment_everything", dataset, everything_params(tiny_random_checkpoint))
    assert result.error is None
    assert result.result["processed"] == 4 and result.result["failed"] == 2
    errors = {e["filepath"]: e["error"] for e in result.result["errors"]}
    assert "does not exist" in errors[str(tmp_path / "missing.jpg")]
    assert str(corrupt) in errors
    assert len(dataset.exists("sam")) == 4
    assert "2 failed" in result.result["message"]
    from tinysam_kit.integrations.fiftyone.runner import load_summary

    assert load_summary(dataset, "sam")["status"] == "completed_with_errors"


def test_video_dataset_gets_a_clear_message(fo, tmp_path, tiny_random_checkpoint):
    video = fo.Dataset()
    try:
        video.add_sample(fo.Sample(filepath=str(tmp_path / "clip.mp4")))
        with pytest.raises(Exception, match="segments images.*'video'"):
            run("segment_everything", video, everything_params(tiny_random_checkpoint))
    finally:
        video.delete()


# ---------------------------------------------------------------------------------------- prompts
def add_prompts(fo, dataset, with_negative=True):
    for sample in dataset:
        sample["gt"] = fo.Detections(detections=[
            fo.Detection(label="box_a", bounding_box=[0.1, 0.1, 0.4, 0.5]),
            fo.Detection(label="box_b", bounding_box=[0.5, 0.3, 0.45, 0.6]),
        ])
        kp = fo.Keypoint(label="pts", points=[[0.3, 0.3], [0.7, 0.6], [float("nan"), float("nan")]])
        if with_negative:
            kp["sam_labels"] = [1, 0, 1]
        sample["clicks"] = fo.Keypoints(keypoints=[kp, fo.Keypoint(label="one", points=[[0.5, 0.5]])])
        sample.save()


def test_segment_from_prompts_matches_predictor(fo, dataset, tiny_random_checkpoint, predictor):
    from tinysam_kit.data.images import load_image

    add_prompts(fo, dataset)
    result = run("segment_with_prompts", dataset, {"model": str(tiny_random_checkpoint), "box_field": "gt",
                                                   "label_field": "masks"})
    assert result.error is None, result.error
    result = run("segment_with_prompts", dataset, {"model": str(tiny_random_checkpoint),
                                                   "point_field": "clicks", "label_field": "pmasks"})
    assert result.error is None, result.error
    for sample in dataset:
        image = load_image(sample.filepath)
        h, w = image.shape[:2]
        state = predictor.embed(image)
        by_prompt = {d.prompt_id: d for d in sample.masks.detections}
        for box in sample.gt.detections:
            x, y, bw, bh = box.bounding_box
            mask, score, _ = predictor.segment(box=[x * w, y * h, (x + bw) * w, (y + bh) * h],
                                               image_embedding=state)
            det = by_prompt[box.id]
            assert det.label == box.label and det.confidence == pytest.approx(score, abs=1e-6)
            np.testing.assert_array_equal(full_mask(det, w, h), mask)
        by_prompt = {d.prompt_id: d for d in sample.pmasks.detections}
        kp = sample.clicks.keypoints[0]
        mask, score, _ = predictor.segment(point_coords=[[0.3 * w, 0.3 * h], [0.7 * w, 0.6 * h]],
                                           point_labels=[1, 0], image_embedding=state)
        np.testing.assert_array_equal(full_mask(by_prompt[kp.id], w, h), mask)


def test_prompt_field_errors_are_clear(fo, dataset, tiny_random_checkpoint):
    base = {"model": str(tiny_random_checkpoint), "label_field": "masks"}
    with pytest.raises(Exception, match="box_field. Reason: Invalid enum value"):  # the form only offers real fields
        run("segment_with_prompts", dataset, {**base, "box_field": "nope"})
    from tinysam_kit.integrations.fiftyone.runner import RunError, RunSpec, validate_spec

    with pytest.raises(RunError, match="prompt field 'nope' does not exist"):
        validate_spec(dataset, RunSpec("prompts", "masks", box_field="nope"))
    dataset.add_sample_field("empty_boxes", fo.EmbeddedDocumentField, embedded_doc_type=fo.Detections)
    with pytest.raises(Exception, match="hold no labels"):
        run("segment_with_prompts", dataset, {**base, "box_field": "empty_boxes"})
    with pytest.raises(Exception, match="box prompt field"):
        run("segment_with_prompts", dataset, base)
    # A box reaching outside its image fails that sample only, with the reason.
    add_prompts(fo, dataset)
    bad = dataset.first()
    bad.gt.detections[0].bounding_box = [0.8, 0.8, 0.5, 0.5]
    bad.save()
    result = run("segment_with_prompts", dataset, {**base, "box_field": "gt"})
    assert result.result["failed"] == 1 and "outside" in result.result["errors"][0]["error"]
    assert dataset.first().masks is None and len(dataset.exists("masks")) == 3


def test_segment_selected_labels_is_immediate_and_cached(fo, dataset, tiny_random_checkpoint, predictor):
    from tinysam_kit.data.images import load_image

    add_prompts(fo, dataset)
    sample = dataset.first()
    box = sample.gt.detections[1]
    selected = [{"label_id": box.id, "sample_id": sample.id, "field": "gt"},
                {"label_id": sample.clicks.keypoints[1].id, "sample_id": sample.id, "field": "clicks"}]
    params = {"model": str(tiny_random_checkpoint), "label_field": "picked"}
    result = run("segment_selected_labels", dataset, params, selected_labels=selected)
    assert result.error is None and result.result["masks"] == 2
    hits = predictor.cache.hits
    result = run("segment_selected_labels", dataset, params, selected_labels=selected[:1])
    assert predictor.cache.hits == hits + 1  # same image: the embedding came from the cache
    sample.reload()
    assert len(sample.picked.detections) == 2  # re-segmenting a prompt replaces its mask
    image = load_image(sample.filepath)
    h, w = image.shape[:2]
    x, y, bw, bh = box.bounding_box
    mask, _, _ = predictor.segment(box=[x * w, y * h, (x + bw) * w, (y + bh) * h],
                                   image_embedding=predictor.embed(image))
    det = next(d for d in sample.picked.detections if d.prompt_id == box.id)
    np.testing.assert_array_equal(full_mask(det, w, h), mask)
    with pytest.raises(Exception, match="no usable selection"):
        run("segment_selected_labels", dataset, params, selected_labels=[])


def test_polylines_output_covers_the_masks(fo, dataset, tiny_random_checkpoint, predictor):
    from tinysam_kit.data.images import load_image

    add_prompts(fo, dataset)
    params = {"model": str(tiny_random_checkpoint), "box_field": "gt", "label_field": "outlines",
              "output": "polylines"}
    result = run("segment_with_prompts", dataset, params)
    assert result.error is None, result.error
    assert dataset.get_field("outlines").document_type is fo.Polylines
    for sample in dataset:
        image = load_image(sample.filepath)
        h, w = image.shape[:2]
        state = predictor.embed(image)
        for box in sample.gt.detections:
            x, y, bw, bh = box.bounding_box
            mask, score, _ = predictor.segment(box=[x * w, y * h, (x + bw) * w, (y + bh) * h],
                                               image_embedding=state)
            parts = [p for p in sample.outlines.polylines if p.prompt_id == box.id]
            assert parts and all(p.closed and p.filled and p.label == box.label for p in parts)
            assert all(p.confidence == pytest.approx(score, abs=1e-6) for p in parts)
            assert polylines_iou(parts, mask) >= 0.95
    result = run("segment_everything", dataset, everything_params(tiny_random_checkpoint, output="polylines",
                                                                   label_field="auto_outlines"))
    assert result.error is None and result.result["masks"] == dataset.count("auto_outlines.polylines") > 0
    from tinysam_kit.integrations.fiftyone.runner import RunError, RunSpec, run_segmentation

    with pytest.raises(RunError, match="masks on disk apply to Detections"):
        run_segmentation(dataset, RunSpec("prompts", "y", box_field="gt", output="polylines", mask_dir="/tmp/y"))
    with pytest.raises(Exception, match="different settings \\(output: 'polylines'"):
        run("segment_with_prompts", dataset, {**params, "output": "detections"})
    with pytest.raises(Exception, match="already exists as Polylines"):
        run("segment_with_prompts", dataset, {**params, "output": "detections", "overwrite": True})


# -------------------------------------------------------------------------------------- delegated
def test_delegated_run_through_the_service(dataset, tiny_random_checkpoint):
    from fiftyone.operators.delegated import DelegatedOperationService
    from fiftyone.operators.executor import ExecutionRunState

    uri = f"{PLUGIN_URI}/segment_everything"
    queued = run("segment_everything", dataset, everything_params(tiny_random_checkpoint), request_delegation=True)
    assert queued.delegated
    assert not dataset.has_field("sam")  # nothing happens until a worker picks it up
    service = DelegatedOperationService()
    results = service.execute_queued_operations(operator=uri, dataset_name=dataset.name)
    assert len(results) == 1 and results[0].error is None, results[0].error
    ops = service.list_operations(operator=uri, dataset_name=dataset.name)
    assert ops[0].run_state == ExecutionRunState.COMPLETED
    assert ops[0].status.progress == pytest.approx(1.0)
    assert len(dataset.exists("sam")) == 4


def test_long_operators_default_to_delegation(fo, dataset):
    from fiftyone.operators import get_operator

    for name in ("segment_everything", "segment_with_prompts"):
        op = get_operator(f"{PLUGIN_URI}/{name}")
        assert op.config.allow_delegated_execution and op.config.default_choice_to_delegated
        assert op.config.allow_immediate_execution
    interactive = get_operator(f"{PLUGIN_URI}/segment_selected_labels").config
    assert interactive.allow_immediate_execution and not interactive.default_choice_to_delegated


def test_prompt_operators_run_delegated_too(fo, dataset, tiny_random_checkpoint):
    from fiftyone.operators.delegated import DelegatedOperationService

    add_prompts(fo, dataset)
    sample = dataset.first()
    params = {"model": str(tiny_random_checkpoint), "box_field": "gt", "label_field": "dmasks"}
    assert run("segment_with_prompts", dataset, params, request_delegation=True).delegated
    selected = [{"label_id": sample.gt.detections[0].id, "sample_id": sample.id, "field": "gt"}]
    assert run("segment_selected_labels", dataset, {"model": str(tiny_random_checkpoint), "label_field": "dsel"},
               selected_labels=selected, request_delegation=True).delegated
    results = DelegatedOperationService().execute_queued_operations(dataset_name=dataset.name)
    assert len(results) == 2 and all(r.error is None for r in results), [r.error for r in results]
    assert len(dataset.exists("dmasks")) == 4
    sample.reload()
    assert [d.prompt_id for d in sample.dsel.detections] == [sample.gt.detections[0].id]
    assert [d.get_mask().tobytes() for d in sample.dsel.detections] == \
        [sample.dmasks.detections[0].get_mask().tobytes()]


# ------------------------------------------------------------------------------------------ quality
def test_demo_model_masks_fit_the_objects(fo, tmp_path):
    """With the trained demo model, a box around an object gives that object's mask."""
    from fiftyone_helpers import demo_model_available
    from PIL import Image

    assert demo_model_available(), "the demo model is committed with the package"
    rng = np.random.default_rng(1)
    img = rng.normal(100, 8, (240, 320, 3)).clip(0, 255).astype(np.uint8)
    truth = np.zeros((240, 320), dtype=bool)
    truth[60:160, 90:230] = True
    img[truth] = (230, 60, 40)
    Image.fromarray(img).save(tmp_path / "rect.png")
    ds = fo.Dataset()
    try:
        ds.add_sample(fo.Sample(filepath=str(tmp_path / "rect.png"),
                                gt=fo.Detections(detections=[fo.Detection(
                                    label="rect", bounding_box=[85 / 320, 55 / 240, 150 / 320, 110 / 240])])))
        result = run("segment_with_prompts", ds, {"model": "demo", "box_field": "gt", "label_field": "m"})
        assert result.error is None, result.error
        mask = full_mask(ds.first().m.detections[0], 320, 240)
        iou = (mask & truth).sum() / (mask | truth).sum()
        assert iou > 0.8, f"box prompt IoU {iou:.2f}"
        # The small demo model's IoU head is not calibrated like TinySAM's: its predictions rarely pass the
        # default 0.88 threshold, so the everything run uses looser thresholds (see docs/training.md).
        result = run("segment_everything", ds, {"model": "demo", "label_field": "auto", "pred_iou_thresh": 0.5,
                                                "stability_score_thresh": 0.8})
        assert result.error is None, result.error
        best = max(((full_mask(d, 320, 240) & truth).sum() / (full_mask(d, 320, 240) | truth).sum())
                   for d in ds.first().auto.detections)
        assert best > 0.8, f"best everything-mode IoU {best:.2f}"
    finally:
        ds.delete()
