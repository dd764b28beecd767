"""What the App's forms say and allow (resolved through FiftyOne's own `resolve_type`, as the App asks for them),
what immediate runs stream to the App, and what a run records about the model it used."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from fiftyone_helpers import PLUGIN_URI, demo_model_available, fiftyone_env, make_images

FAST = {"points_per_side": 8, "pred_iou_thresh": 0.0, "stability_score_thresh": 0.0}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("form_images"), 3, seed=2)


@pytest.fixture
def dataset(fo, images):
    ds = fo.Dataset()
    ds.add_samples([fo.Sample(filepath=str(p)) for p in images], progress=False)
    for sample in ds:
        sample["gt"] = fo.Detections(detections=[fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.4, 0.5]),
                                                 fo.Detection(label="b", bounding_box=[0.5, 0.3, 0.4, 0.6])])
        sample["kind"] = fo.Classification(label="scene")
        sample.save()
    yield ds
    ds.delete()


def request(dataset, params: dict, **ctx) -> dict:
    from fiftyone.operators.executor import _parse_ctx

    return _parse_ctx(dataset=dataset, params=dict(params), **ctx)


def form(operator: str, dataset, params: dict, **ctx) -> dict:
    """The operator's input form as the App receives it (JSON), for these parameters and selections."""
    from fiftyone.operators.executor import resolve_type
    from fiftyone.operators.registry import OperatorRegistry

    prop = asyncio.run(resolve_type(OperatorRegistry(), f"{PLUGIN_URI}/{operator}", request(dataset, params, **ctx)))
    assert not hasattr(prop, "error"), getattr(prop, "error", None)
    return prop.to_json()["type"]["properties"]


def texts(props: dict) -> str:
    return "\n".join(str(p["view"].get("label", "")) for p in props.values() if p.get("view"))


def run(operator: str, dataset, params: dict, **ctx):
    from fiftyone.operators import execute_operator

    return execute_operator(f"{PLUGIN_URI}/{operator}", dataset=dataset, params=params, **ctx)


def form_defaults(props: dict) -> dict:
    """What the App sends when the user changes nothing: the defaults of the visible fields."""
    return {name: p["default"] for name, p in props.items() if p.get("default") is not None}


# ------------------------------------------------------------------------------- 1: everything defaults
@pytest.mark.slow
def test_everything_form_defaults_to_the_models_own_values(fo, dataset):
    from tinysam_kit.inference.policy import everything_summary

    assert demo_model_available()
    props = form("segment_everything", dataset, {"model": "demo"})
    for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh", "box_nms_thresh",
                 "min_mask_region_area", "max_masks", "max_area_fraction"):
        assert name in props and props[name]["default"] is None, name  # empty = the model's own
    own = everything_summary("demo")
    assert own["pred_iou_thresh"] < 0.88  # the demo model registers its own, looser thresholds
    assert f"demo's own ({own['pred_iou_thresh']})" in props["pred_iou_thresh"]["view"]["description"]
    used = texts(props)
    assert f"pred_iou_thresh {own['pred_iou_thresh']}" in used and "max_area_fraction 0.8" in used
    # An explicit value is what the notice then shows.
    assert "pred_iou_thresh 0.7" in texts(form("segment_everything", dataset, {"model": "demo",
                                                                               "pred_iou_thresh": 0.7}))

    # The form's defaults as the App sends them give masks with the demo model (they gave none when the form
    # always sent SAM's 0.88 / 0.95), and no mask covers nearly the whole image.
    one = dataset.limit(1)
    params = {**form_defaults(props), "model": "demo", "label_field": "auto",
              "view_target": "SELECTED_SAMPLES"}
    result = run("segment_everything", dataset, params, selected=one.values("id"))
    assert result.error is None, result.error
    assert result.result["masks"] > 0, result.result["message"]
    sample = dataset[one.first().id]
    for det in sample.auto.detections:
        assert det.area <= 0.8 * sample.metadata.width * sample.metadata.height
    config = dataset.get_run_info("tinysam_auto").config.serialize()
    assert config["parameters"]["everything"]["pred_iou_thresh"] == own["pred_iou_thresh"]


# --------------------------------------------------------------------------- 5: prompts need a field
def test_prompt_form_without_a_prompt_field_cannot_run(fo, dataset, tiny_random_checkpoint):
    from fiftyone.operators import get_operator
    from fiftyone.operators.executor import ExecutionContext

    from tinysam_kit.integrations.fiftyone.runner import RunError

    params = {"model": str(tiny_random_checkpoint), "label_field": "masks"}
    props = form("segment_with_prompts", dataset, params)
    assert props["box_field"]["invalid"] and props["point_field"]["invalid"]
    assert "Choose a box prompt field and/or a point prompt field" in texts(props)
    with pytest.raises(Exception, match="Validation error.*box_field"):
        run("segment_with_prompts", dataset, params)
    with pytest.raises(Exception, match="Validation error.*box_field"):  # nor can it be scheduled
        run("segment_with_prompts", dataset, params, request_delegation=True)
    operator = get_operator(f"{PLUGIN_URI}/segment_with_prompts")
    with pytest.raises(RunError, match="box prompt field"):  # the worker refuses it too
        operator.execute(ExecutionContext(request(dataset, params)))
    assert not form("segment_with_prompts", dataset, {**params, "box_field": "gt"})["box_field"]["invalid"]


# ------------------------------------------------------------------------ 6: which settings differ
def test_changed_settings_are_named_while_the_form_is_filled_in(fo, dataset, tiny_random_checkpoint):
    params = {"model": str(tiny_random_checkpoint), "label_field": "sam", **FAST}
    assert run("segment_everything", dataset, params).error is None
    props = form("segment_everything", dataset, params)
    assert not props["label_field"]["invalid"]
    assert "samples already done are skipped" in texts(props)

    changed = {**params, "points_per_side": 4, "mode": "dense"}
    props = form("segment_everything", dataset, changed)
    message = props["label_field"]["error_message"]
    assert props["label_field"]["invalid"]
    assert "everything.points_per_side: 8 → 4" in message and "mode: 'hierarchical' → 'dense'" in message
    assert "choose another output field or tick Overwrite" in message
    with pytest.raises(Exception, match="everything.points_per_side: 8 → 4"):
        run("segment_everything", dataset, changed)
    assert not form("segment_everything", dataset, {**changed, "overwrite": True})["label_field"]["invalid"]


# ----------------------------------------------------------------------- 7: what a selection covers
def test_selected_labels_form_says_what_it_will_segment(fo, dataset, tiny_random_checkpoint):
    first, second = dataset.limit(2)
    selected = [{"label_id": d.id, "sample_id": first.id, "field": "gt"} for d in first.gt.detections]
    selected += [{"label_id": second.gt.detections[0].id, "sample_id": second.id, "field": "gt"},
                 {"label_id": second.kind.id, "sample_id": second.id, "field": "kind"}]
    params = {"model": str(tiny_random_checkpoint)}
    props = form("segment_selected_labels", dataset, params, selected_labels=selected)
    assert ("Will segment 3 selected label(s) on 2 sample(s); 1 other selected label(s) ignored "
            "(not boxes/keypoints)") in texts(props)
    props = form("segment_selected_labels", dataset, params, selected_labels=selected[-1:])
    assert "Select boxes (Detections) or keypoints in the App first (1 selected label(s) are neither)" in texts(props)
    props = form("segment_selected_labels", dataset, {**params, "label_field": "gt"}, selected_labels=selected)
    assert props["label_field"]["invalid"] and "not written by TinySAM" in props["label_field"]["error_message"]
    result = run("segment_selected_labels", dataset, {**params, "label_field": "picked"}, selected_labels=selected)
    assert result.result["message"].startswith("3 mask(s) written to 'picked' from 3 selected label(s) on 2 sample(s)")


# ------------------------------------------------------------------- 3: progress of immediate runs
def test_immediate_run_from_the_app_streams_its_progress(fo, dataset, tiny_random_checkpoint):
    """From the App (or with `stream_progress`), `execute` yields FiftyOne's progress, a notification, a reload
    and the summary, the way the App's generator endpoint passes them on."""
    from fiftyone.operators import get_operator
    from fiftyone.operators.executor import ExecutionContext, Executor

    operator = get_operator(f"{PLUGIN_URI}/segment_everything")
    assert operator.config.execute_as_generator
    params = {"model": str(tiny_random_checkpoint), "label_field": "sam", "stream_progress": True, **FAST}
    ctx = ExecutionContext(request(dataset, params), executor=Executor())
    messages = [m.body.to_json() for m in operator.execute(ctx)]
    names = [m["operator_uri"] for m in messages]
    progress = [m["params"].get("progress") for m in messages if m["operator_uri"] == "set_progress"]
    assert names[0] == "set_progress" and names[-3:] == ["notify", "reload_dataset", "show_output"]
    assert progress[-1] == 1.0 and [p for p in progress if p is not None] == sorted(p for p in progress if p)
    assert any("3/3 images segmented" in m["params"].get("label", "") for m in messages)
    assert messages[-1]["params"]["results"]["processed"] == 3
    assert len(dataset.exists("sam")) == 3


def test_output_as_polylines_in_the_forms(fo, dataset):
    for operator in ("segment_everything", "segment_with_prompts"):
        props = form(operator, dataset, {})
        output = props["output"]
        assert output["default"] == "detections" and output["view"]["label"] == "Output as"
        assert [(c["value"], c["label"]) for c in output["view"]["choices"]] == \
            [("detections", "Detections with masks"), ("polylines", "Polylines")]
        assert "masks_on_disk" in props
        polylines = form(operator, dataset, {"output": "polylines", "masks_on_disk": True})
        assert "masks_on_disk" not in polylines and "mask_dir" not in polylines
        assert "Polylines" in polylines["label_field"]["view"]["description"]


def test_compute_embeddings_streams_its_progress_from_the_app(fo, dataset, tiny_random_checkpoint):
    from fiftyone.operators import get_operator
    from fiftyone.operators.executor import ExecutionContext, Executor

    props = form("compute_embeddings", dataset, {})
    assert fiftyone_env()["env"]["TINYSAM_EMBEDDING_STORE"] in texts(props)
    operator = get_operator(f"{PLUGIN_URI}/compute_embeddings")
    params = {"model": str(tiny_random_checkpoint), "stream_progress": True}
    ctx = ExecutionContext(request(dataset, params), executor=Executor())
    messages = [m.body.to_json() for m in operator.execute(ctx)]
    assert [m["operator_uri"] for m in messages][-3:] == ["notify", "reload_dataset", "show_output"]
    assert any("images encoded" in m["params"].get("label", "") or "already stored" in
               m["params"].get("label", "") for m in messages if m["operator_uri"] == "set_progress")
    results = messages[-1]["params"]["results"]
    assert results["computed"] + results["already_stored"] == 3 and results["failed"] == 0


# ------------------------------------------------------------------- 8: the model actually used
def test_auto_offline_uses_the_demo_model_and_says_so(fo, dataset, monkeypatch, tmp_path):
    assert demo_model_available()
    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path / "home"))  # no official weights here
    monkeypatch.setenv("TINYSAM_OFFLINE", "1")
    result = run("segment_with_prompts", dataset, {"model": "auto", "box_field": "gt", "label_field": "masks"})
    assert result.error is None, result.error
    assert result.result["model"] == "demo" and "TINYSAM_OFFLINE is set" in result.result["model_note"]
    assert "model: demo (the bundled demo model" in result.result["message"]
    config = dataset.get_run_info("tinysam_masks").config.serialize()
    assert config["model"] == "demo" and config["model_requested"] == "auto"
    assert "nothing was downloaded" in config["model_note"]
    props = form("segment_everything", dataset, {"model": "auto"})
    assert "Model: demo." in texts(props)


# --------------------------------------------------------------------------------- 9: smaller defects
def test_failed_samples_are_tagged_and_processed_ones_get_metadata(fo, dataset, tiny_random_checkpoint, tmp_path):
    from tinysam_kit.integrations.fiftyone.runner import FAILED_TAG

    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    dataset.add_sample(fo.Sample(filepath=str(broken)))
    params = {"model": str(tiny_random_checkpoint), "label_field": "sam", **FAST}
    result = run("segment_everything", dataset, params)
    assert result.result["failed"] == 1 and FAILED_TAG in result.result["message"]
    assert dataset.match_tags(FAILED_TAG).values("filepath") == [str(broken)]
    for sample in dataset.exists("sam"):
        image = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(sample.filepath))
        assert (sample.metadata.height, sample.metadata.width) == image.shape[:2]
        assert sample.metadata.size_bytes > 0
        assert all(0 <= d.confidence <= 1 and d.has_field("predicted_iou") for d in sample.sam.detections)
    # Fixed file, run again: it is segmented and loses the tag.
    __import__("shutil").copy(dataset.first().filepath, broken)
    again = run("segment_everything", dataset, params)
    assert again.result["processed"] == 1 and again.result["failed"] == 0
    assert len(dataset.match_tags(FAILED_TAG)) == 0


def test_stale_running_summary_says_how_to_continue(fo, dataset, tiny_random_checkpoint):
    """A summary still saying "running" whose heartbeat stopped long ago is reported as stale."""
    from datetime import datetime, timedelta, timezone

    from tinysam_kit.integrations.fiftyone.runner import STALE_AFTER, stale_reason

    beat = datetime.now(timezone.utc) - timedelta(seconds=STALE_AFTER + 60)
    summary = {"status": "running", "heartbeat": beat.isoformat(), "host": "another-host", "pid": 1}
    assert "has not reported for 3 minute(s)" in stale_reason(summary)
    assert stale_reason({**summary, "heartbeat": datetime.now(timezone.utc).isoformat()}) is None
    assert stale_reason({**summary, "status": "completed"}) is None


def test_everything_form_offers_a_ray_cluster_and_prompt_runs_refuse_one(fo, dataset):
    from tinysam_kit.integrations.fiftyone.runner import RunError, RunSpec, validate_spec

    props = form("segment_everything", dataset, {})
    assert props["ray_address"]["view"]["label"] == "Ray cluster (optional)" and "batch_size" not in props
    assert props["workers"]["default"] == "auto" and props["workers"]["view"]["label"] == "Model processes"
    assert not props["workers"].get("invalid")
    bad = form("segment_everything", dataset, {"workers": "0"})["workers"]
    assert bad["invalid"] and "'auto' or a positive integer" in bad["error_message"]
    on_ray = form("segment_everything", dataset, {"ray_address": "auto"})
    assert on_ray["batch_size"]["default"] == 1 and "ray_missing" not in on_ray  # ray is installed here
    assert "workers" not in on_ray  # the cluster's actor pool does the work
    with pytest.raises(RunError, match="a Ray address or worker processes apply to everything mode only"):
        validate_spec(dataset, RunSpec("prompts", "masks", box_field="gt", ray_address="auto"))
    with pytest.raises(RunError, match="the Ray address is empty"):
        validate_spec(dataset, RunSpec("everything", "masks", ray_address=" "))


def test_written_masks_are_pushed_to_the_open_sample_modal(fo, dataset):
    """What the App is asked to do after a write: redraw the grid, and bring the open modal up to date (the
    plugin's App script) when it shows a written sample; without a modal, a new field reloads the dataset."""
    import json

    from fiftyone.operators.executor import ExecutionContext, Executor

    from tinysam_kit.integrations.fiftyone.plugin.app_refresh import show_written

    sample = dataset.first()
    sample["written"] = fo.Detections(detections=[fo.Detection(label="a", bounding_box=[0.1, 0.1, 0.2, 0.2],
                                                               mask=np.ones((4, 4), bool))])
    sample.save()

    def requests(current_sample, new_field):
        ctx = ExecutionContext(request(dataset, {}, current_sample=current_sample), executor=Executor())
        show_written(ctx, PLUGIN_URI, "written", {sample.id}, new_field)
        return [(r.operator_uri, r.params) for r in ctx.executor._requests]

    (grid, _), (modal, params) = requests(sample.id, new_field=True)
    assert (grid, modal) == ("reload_samples", f"{PLUGIN_URI}/refresh_open_sample")
    assert params["field"] == "written" and params["sample"]["_id"] == sample.id
    assert params["sample"]["written"]["detections"][0]["label"] == "a"
    json.dumps(params)  # travels to the browser as JSON
    assert [name for name, _ in requests(None, new_field=True)] == ["reload_samples", "reload_dataset"]
    assert [name for name, _ in requests(dataset.last().id, new_field=False)] == ["reload_samples"]
