"""TinySAM operators for the FiftyOne App (and `fiftyone.operators.execute_operator`)."""

from __future__ import annotations

import time

import fiftyone.operators as foo
import fiftyone.operators.types as types

from tinysam_kit.data.images import ImageError, load_image
from tinysam_kit.inference import policy
from tinysam_kit.inference.predictor import PromptError
from tinysam_kit.integrations.fiftyone import labels as L
from tinysam_kit.integrations.fiftyone.plugin.app_refresh import show_written
from tinysam_kit.integrations.fiftyone.predictors import get_predictor, image_key
from tinysam_kit.integrations.fiftyone.runner import (
    APP_REMEDY,
    EVERYTHING_PARAMS,
    EmbeddingSummary,
    RunError,
    RunSpec,
    RunSummary,
    check_field_name,
    check_image_collection,
    field_type_name,
    iter_embeddings,
    iter_segmentation,
    load_summary,
    output_conflict,
    run_key_for,
)

ERRORS_SHOWN = 20
# FiftyOne shows the progress of an immediate operator only when `execute` yields it, and then the App reads
# the operator's messages as a stream (`execute_as_generator`). Requests from the App carry its state (the open
# sample, the selections); Python callers of `execute_operator` send only what they pass and get the run
# summary as the operator's result. `stream_progress` forces either way.
STREAM_PARAM = "stream_progress"
APP_STATE_KEYS = ("current_sample", "selected", "selected_labels")
EVERYTHING_FIELDS = {  # parameter: (label, description, kind)
    "points_per_side": ("Points per side", "Grid of single-point prompts per image side", int),
    "pred_iou_thresh": ("Predicted IoU threshold", "Keep masks whose predicted IoU is above this", float),
    "stability_score_thresh": ("Stability threshold", "Keep masks that stay the same when the threshold moves",
                               float),
    "box_nms_thresh": ("Box NMS threshold", "Drop masks whose box overlaps a better one by more", float),
    "min_mask_region_area": ("Minimum area (pixels)", "Remove holes and islands smaller than this", int),
    "max_masks": ("Maximum masks per image", "Keep at most this many masks per image", int),
    "max_area_fraction": ("Maximum area fraction",
                          "Drop masks covering more than this fraction of the image (background, whole scene)",
                          float),
}
assert set(EVERYTHING_FIELDS) == set(EVERYTHING_PARAMS)


# ------------------------------------------------------------------------------ shared form parts
def _model_inputs(inputs: types.Object) -> None:
    defaults = policy.EngineOptions()
    inputs.str("model", default=defaults.model, label="Model",
               description="auto (official TinySAM, else the bundled demo), a registered model (tinysam, "
                           "tinysam-v1, mobilesam, demo) or a checkpoint path")
    inputs.enum("engine", list(policy.ENGINES), default=defaults.engine, label="Engine",
                view=types.RadioGroup(orientation="horizontal"))
    inputs.enum("precision", list(policy.PRECISIONS), default=defaults.precision, label="Precision",
                description="int8: ONNX engine, or torch on x86 CPUs with VNNI/AMX; fp16 needs a GPU",
                view=types.RadioGroup(orientation="horizontal"))
    inputs.str("device", default=defaults.device, label="Device", description="auto, cpu, cuda or cuda:N")


def _options(ctx) -> policy.EngineOptions:
    try:
        return policy.EngineOptions.from_mapping(ctx.params)
    except policy.PolicyError as exc:
        raise RunError(str(exc)) from exc


def _model_name(ctx) -> tuple[str, str | None]:
    """(the model a run would use, the note when `auto` falls back to the demo model) for forms."""
    try:
        choice = policy.resolve_model(ctx.params.get("model") or policy.AUTO)
    except Exception as exc:  # noqa: BLE001 - a form shows the reason; the run raises it
        return str(ctx.params.get("model") or policy.AUTO), str(exc)
    return choice.name, choice.note


def _output_inputs(ctx, inputs: types.Object, default_field: str, spec: RunSpec | None) -> None:
    """Output field, overwrite, masks on disk; the field is marked invalid while the run could not write it."""
    conflict = None
    field = ctx.params.get("label_field") or default_field
    if spec is not None and ctx.dataset is not None:
        try:
            conflict = output_conflict(ctx.dataset, spec, _model_name(ctx)[0])
        except RunError as exc:
            conflict = str(exc)
    output_as = types.RadioGroup(orientation="horizontal")
    output_as.add_choice("detections", label="Detections with masks")
    output_as.add_choice("polylines", label="Polylines")
    inputs.enum("output", output_as.values(), default="detections", label="Output as",
                description="Polylines: one filled, closed polygon per connected part of each mask (holes filled)",
                view=output_as)
    polylines = ctx.params.get("output") == "polylines"
    inputs.str("label_field", default=default_field, required=True, label="Output field",
               description=("New Polylines field that receives the outlines" if polylines
                            else "New Detections field that receives the instance masks"),
               invalid=conflict is not None, error_message=conflict or "")
    inputs.bool("overwrite", default=False, label="Overwrite",
                description="Replace the output field's values on the target samples if it already exists")
    if not polylines:
        inputs.bool("masks_on_disk", default=False, label="Store masks on disk",
                    description="Write masks as PNG files and store only their paths (for large runs)")
    if ctx.params.get("masks_on_disk", False) and not polylines:
        inputs.str("mask_dir", required=True, label="Mask directory",
                   description="Masks go to <dir>/<field>/<sample id>/<i>.png")
    if conflict:
        inputs.view("output_conflict", types.Error(label=conflict))
    elif ctx.dataset is not None and field in ctx.dataset.get_field_schema() and not ctx.params.get("overwrite"):
        inputs.view("resume_notice", types.Notice(
            label=f"'{field}' holds a TinySAM run with these settings: samples already done are skipped "
                  "(resume) unless you tick Overwrite"))


def _media_error(ctx, inputs: types.Object) -> bool:
    if ctx.dataset is None:
        return False
    try:
        check_image_collection(ctx.view)
    except RunError as exc:
        inputs.view("media_error", types.Error(label=str(exc)))
        return True
    return False


def _common_spec(ctx, task: str) -> dict:
    p = ctx.params
    mask_dir = None
    output = p.get("output") or "detections"
    if p.get("masks_on_disk", False) and output != "polylines":
        mask_dir = p.get("mask_dir")
        if not mask_dir:
            raise RunError("'Store masks on disk' needs a mask directory")
    try:  # samples per database write: a smaller batch saves progress more often (for the API; not in forms)
        write_batch = int(p.get("write_batch", 16))
    except (TypeError, ValueError):
        write_batch = 0
    if write_batch < 1:
        raise RunError(f"write_batch must be a positive integer, got {p.get('write_batch')!r}")
    return dict(task=task, label_field=(p.get("label_field") or "").strip(), options=_options(ctx), output=output,
                overwrite=bool(p.get("overwrite", False)), mask_dir=mask_dir, write_batch=write_batch)


def _everything_spec(ctx) -> RunSpec:
    p = ctx.params
    everything = {}
    for name, (_, _, kind) in EVERYTHING_FIELDS.items():
        value = p.get(name)
        if value is not None and value != "":
            everything[name] = kind(value)
    ray_address = str(p.get("ray_address") or "").strip() or None
    try:
        batch_size = int(p.get("batch_size") or 1) if ray_address else 1
    except (TypeError, ValueError) as exc:
        raise RunError(f"images per encoder call must be an integer, got {p.get('batch_size')!r}") from exc
    return RunSpec(**_common_spec(ctx, "everything"), mode=p.get("mode") or "hierarchical",
                   everything=everything, label=p.get("label") or "object",
                   instance_map_field=(p.get("instance_map_field") or "").strip() or None,
                   ray_address=ray_address, batch_size=batch_size,
                   workers="auto" if ray_address else _workers_value(p.get("workers")))


def _workers_value(value) -> int | str:
    """The form's model processes: 'auto' (also when left empty) or a positive integer."""
    text = str(value if value is not None else "").strip().lower() or "auto"
    if text == "auto":
        return text
    try:
        workers = int(text)
    except ValueError:
        workers = 0
    if workers < 1:
        raise RunError(f"model processes must be 'auto' or a positive integer, got {value!r}")
    return workers


def _scale_inputs(ctx, inputs: types.Object) -> None:
    """Where dataset-wide everything mode runs: model processes on the machine running the operation, or an
    optional Ray cluster (says at once when Ray is not installed)."""
    import importlib.util

    inputs.str("ray_address", required=False, label="Ray cluster (optional)",
               description="Run the model on a Ray cluster: 'auto' (the cluster the process running this operation "
                           "finds) or HOST:PORT. Every node must read the samples' files (shared storage). Empty: "
                           "run on the machine running this operation")
    if not str(ctx.params.get("ray_address") or "").strip():
        try:
            _workers_value(ctx.params.get("workers"))
            problem = ""
        except RunError as exc:
            problem = str(exc)
        inputs.str("workers", default="auto", label="Model processes",
                   description="Processes sharing the images on the machine running this operation, each with its "
                               "own model. auto: one per CPU core, but at most one per 8 images to do and one per "
                               "GiB of free memory, and one on a GPU. 1: in the operation's own process",
                   invalid=bool(problem), error_message=problem)
        return
    if importlib.util.find_spec("ray") is None:
        inputs.view("ray_missing", types.Error(
            label="Ray is not installed where this App runs: pip install 'tinysam-kit[ray]'"))
    inputs.int("batch_size", default=1, min=1, label="Images per encoder call",
               description="On GPU actors 8–32 raises throughput; on CPU 1 is as fast")


def _prompts_spec(ctx) -> RunSpec:
    p = ctx.params
    return RunSpec(**_common_spec(ctx, "prompts"), box_field=p.get("box_field") or None,
                   point_field=p.get("point_field") or None,
                   point_label_attribute=p.get("point_label_attribute") or None)


def _form_spec(ctx, build) -> RunSpec | None:
    try:
        return build(ctx)
    except (RunError, TypeError, ValueError):
        return None  # the field concerned shows its own error; the run raises it


def _result(summary: RunSummary | EmbeddingSummary) -> dict:
    result = summary.to_dict()
    result["errors"] = result["errors"][:ERRORS_SHOWN]
    result["message"] = summary.message()
    return result


def _run(ctx, spec: RunSpec):
    operation_id = getattr(ctx, "_delegated_operation_id", None)
    return _drive(ctx, lambda: iter_segmentation(ctx.target_view(), spec,
                                                 operation_id=str(operation_id) if operation_id else None),
                  f"Loading the model for '{spec.label_field}'", "images segmented", _summary_outputs())


def _drive(ctx, updates, loading: str, done: str, outputs: types.Property):
    """Delegated or from Python: run `updates()` (progress tuples, then a summary) and return the summary.
    Immediate from the App: a generator that streams progress to the App, then the summary, a notification
    and a reload."""
    if ctx.delegated or not _from_app(ctx):
        last = 0.0
        for update in updates():
            if not isinstance(update, tuple):
                summary = update
                break
            n, total, name = update
            now = time.monotonic()
            if n == total or now - last > 1.0:  # each report is a database write when delegated
                last = now
                ctx.set_progress(progress=n / max(total, 1), label=f"{n}/{total} {name}")
        if not ctx.delegated:
            ctx.ops.notify(summary.message(), variant="warning" if summary.errors else "success")
            ctx.ops.reload_dataset()
        return _result(summary)
    return _stream(ctx, updates, loading, done, outputs)


def _from_app(ctx) -> bool:
    forced = ctx.params.get(STREAM_PARAM)
    if forced is not None:
        return bool(forced)
    return all(key in ctx.request_params for key in APP_STATE_KEYS)


def _stream(ctx, updates, loading: str, done: str, outputs: types.Property):
    last = 0.0
    yield ctx.ops.set_progress(label=loading, variant="linear")
    for update in updates():
        if not isinstance(update, tuple):
            result = _result(update)
            yield ctx.ops.set_progress(label=update.message(), progress=1.0)
            yield ctx.ops.notify(result["message"], variant="warning" if update.errors else "success")
            yield ctx.ops.reload_dataset()
            yield ctx.ops.show_output(outputs.to_json(), result)
            return
        n, total, name = update
        now = time.monotonic()
        if n == total or now - last > 0.5:
            last = now
            yield ctx.ops.set_progress(label=f"{n}/{total} {done} ({name})", progress=n / max(total, 1))


def _summary_outputs() -> types.Property:
    outputs = types.Object()
    outputs.str("message", label="Summary")
    outputs.str("model", label="Model used")
    outputs.str("model_note", label="Model note")
    outputs.int("processed", label="Samples segmented")
    outputs.int("already_done", label="Already done (skipped)")
    outputs.int("failed", label="Failed")
    outputs.int("masks", label="Masks written")
    outputs.float("images_per_minute", label="Images per minute")
    outputs.int("workers", label="Model processes")
    return types.Property(outputs)


class _LongOperator(foo.Operator):
    """Dataset-wide work: delegated by default, immediate on request (then with progress in the App)."""

    def resolve_delegation(self, ctx):
        return None  # let the user (or the caller's request_delegation) choose; the default is delegated

    def resolve_output(self, ctx):
        return _summary_outputs()


# ------------------------------------------------------------------------------------- operators
class SegmentEverything(_LongOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_everything", label="TinySAM: Segment everything",
            description="Automatic instance masks for every object (TinySAM hierarchical or dense grid)",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True, execute_as_generator=True, icon="auto_awesome")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _media_error(ctx, inputs):
            return types.Property(inputs, view=types.View(label="TinySAM: Segment everything"))
        inputs.view_target(ctx, action_description="Segment")
        _model_inputs(inputs)
        model_name, note = _model_name(ctx)
        if note:
            inputs.view("model_note", types.Notice(label=f"Model: {model_name}. {note}"))
        inputs.enum("mode", ["hierarchical", "dense"], default="hierarchical", label="Mode",
                    description="hierarchical: TinySAM's sparse-then-fill strategy (faster); dense: full grid",
                    view=types.RadioGroup(orientation="horizontal"))
        spec = _form_spec(ctx, _everything_spec)
        used = policy.everything_summary(model_name, spec.everything if spec else {})
        own = policy.everything_summary(model_name, {})
        for name, (label, description, kind) in EVERYTHING_FIELDS.items():
            default = "no limit" if own[name] is None else own[name]
            kwargs = {"min": 0} if kind is int else {"min": 0.0, "max": 1.0}
            getattr(inputs, "int" if kind is int else "float")(
                name, required=False, label=label,
                description=f"{description}. Empty: {model_name}'s own ({default})", **kwargs)
        values = ", ".join(f"{name} {'no limit' if v is None else v}" for name, v in used.items())
        inputs.view("everything_used", types.Notice(label=f"This run will use: {values}"))
        inputs.str("label", default="object", label="Label name")
        inputs.str("instance_map_field", required=False, label="Instance map field (optional)",
                   description="Also write a Segmentation whose pixel values are instance numbers")
        _output_inputs(ctx, inputs, "tinysam_everything", spec)
        _scale_inputs(ctx, inputs)
        return types.Property(inputs, view=types.View(label="TinySAM: Segment everything"))

    def resolve_run_name(self, ctx):
        return f"TinySAM everything → {ctx.params.get('label_field', '')}"

    def execute(self, ctx):
        return _run(ctx, _everything_spec(ctx))


class SegmentWithPrompts(_LongOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_with_prompts", label="TinySAM: Segment from prompts",
            description="Instance masks from the boxes of a Detections field and/or the points of a Keypoints field",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True, execute_as_generator=True, icon="ads_click")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _media_error(ctx, inputs):
            return types.Property(inputs, view=types.View(label="TinySAM: Segment from prompts"))
        inputs.view_target(ctx, action_description="Segment")
        schema = ctx.dataset.get_field_schema() if ctx.dataset is not None else {}
        box_fields = [n for n in schema if field_type_name(schema, n) == "Detections"]
        point_fields = [n for n in schema if field_type_name(schema, n) == "Keypoints"]
        missing = not ctx.params.get("box_field") and not ctx.params.get("point_field")
        need = "Choose a box prompt field and/or a point prompt field"
        inputs.enum("box_field", box_fields, required=False, label="Box prompts (Detections field)",
                    invalid=missing, error_message=need if missing else "", view=types.DropdownView())
        inputs.enum("point_field", point_fields, required=False, label="Point prompts (Keypoints field)",
                    description="Per-point positive (1) / negative (0) labels come from the attribute below",
                    invalid=missing, error_message=need if missing else "", view=types.DropdownView())
        inputs.str("point_label_attribute", default="sam_labels", label="Point label attribute",
                   description="Keypoint attribute with one 0/1 per point (missing: all positive)")
        if not box_fields and not point_fields:
            inputs.view("no_prompts", types.Error(
                label="This dataset has no Detections or Keypoints field to prompt with"))
        elif missing:
            inputs.view("no_prompt_field", types.Error(label=need))
        _model_inputs(inputs)
        _output_inputs(ctx, inputs, "tinysam_masks", _form_spec(ctx, _prompts_spec))
        return types.Property(inputs, view=types.View(label="TinySAM: Segment from prompts"))

    def resolve_run_name(self, ctx):
        return f"TinySAM prompts → {ctx.params.get('label_field', '')}"

    def execute(self, ctx):
        spec = _prompts_spec(ctx)
        if not spec.box_field and not spec.point_field:
            raise RunError("give a box prompt field (Detections) and/or a point prompt field (Keypoints)")
        return _run(ctx, spec)


class ComputeEmbeddings(_LongOperator):
    """Pre-encodes the target images into the shared embedding store, so the first click on each image (panel,
    selected labels) skips the image encoder."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="compute_embeddings", label="TinySAM: Compute embeddings",
            description="Encode the target images once into the shared embedding store (already stored ones "
                        "are skipped), so interactive segmentation answers without encoding",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True, execute_as_generator=True, icon="memory")

    def resolve_input(self, ctx):
        inputs = types.Object()
        view = types.View(label="TinySAM: Compute embeddings")
        if _media_error(ctx, inputs):
            return types.Property(inputs, view=view)
        inputs.view_target(ctx, action_description="Encode")
        _model_inputs(inputs)
        model_name, note = _model_name(ctx)
        if note:
            inputs.view("model_note", types.Notice(label=f"Model: {model_name}. {note}"))
        try:
            store = policy.embedding_store()
        except policy.PolicyError as exc:
            inputs.view("store_error", types.Error(label=str(exc)))
            return types.Property(inputs, view=view)
        if store is None:
            inputs.view("store_off", types.Error(label=f"The embedding store is off ({policy.STORE_ENV}=off): "
                                                       "there is nowhere to keep the embeddings"))
        else:
            inputs.view("store", types.Notice(label=f"Embeddings go to {store.root}; images already stored "
                                                    "there for this model are skipped"))
        return types.Property(inputs, view=view)

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("message", label="Summary")
        outputs.str("model", label="Model used")
        outputs.str("model_note", label="Model note")
        outputs.str("store", label="Embedding store")
        outputs.int("computed", label="Embeddings computed")
        outputs.int("already_stored", label="Already stored (skipped)")
        outputs.int("failed", label="Failed")
        outputs.float("images_per_minute", label="Images per minute")
        return types.Property(outputs)

    def resolve_run_name(self, ctx):
        return "TinySAM embeddings"

    def execute(self, ctx):
        options = _options(ctx)
        return _drive(ctx, lambda: iter_embeddings(ctx.target_view(), options), "Loading the model",
                      "images encoded", self.resolve_output(ctx))


def _selection(ctx, field: str) -> tuple[dict[str, list], int]:
    """The selected boxes/keypoints by sample ({sample id: [(field, kind, label id)]}) and how many other
    selected labels are ignored."""
    schema = ctx.dataset.get_field_schema()
    by_sample: dict[str, list] = {}
    ignored = 0
    for sel in ctx.selected_labels or []:
        kind = field_type_name(schema, sel.get("field"))
        if kind not in ("Detections", "Keypoints") or sel.get("field") == field or sel.get("frame_number"):
            ignored += 1
            continue
        by_sample.setdefault(sel["sample_id"], []).append((sel["field"], kind, sel["label_id"]))
    return by_sample, ignored


def _selection_text(by_sample: dict, ignored: int) -> str:
    n = sum(len(v) for v in by_sample.values())
    text = f"{n} selected label(s) on {len(by_sample)} sample(s)"
    if ignored:
        text += f"; {ignored} other selected label(s) ignored (not boxes/keypoints)"
    return text


def _selected_output_error(dataset, field: str, overwrite: bool) -> str | None:
    try:
        check_field_name(field, "output field")
    except RunError as exc:
        return str(exc)
    have = field_type_name(dataset.get_field_schema(), field)
    if have is not None and have != "Detections":
        return f"field {field!r} already exists as {have}; choose another output field"
    if have is not None and not overwrite and run_key_for(field) not in dataset.list_runs():
        return f"field {field!r} already exists and was not written by TinySAM; {APP_REMEDY}"
    return None


class SegmentSelectedLabels(foo.Operator):
    """The interactive path: segment the boxes/keypoints selected in the App, right away."""

    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_selected_labels", label="TinySAM: Segment selected labels",
            description="Masks for the boxes / keypoints selected in the App (embedding cached per image)",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=False, icon="touch_app")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _media_error(ctx, inputs):
            return types.Property(inputs)
        field = (ctx.params.get("label_field") or "tinysam_masks").strip()
        by_sample, ignored = _selection(ctx, field)
        if not by_sample:
            inputs.view("no_selection", types.Error(
                label="Select boxes (Detections) or keypoints in the App first"
                      + (f" ({ignored} selected label(s) are neither)" if ignored else "")))
        else:
            inputs.view("selection", types.Notice(label="Will segment " + _selection_text(by_sample, ignored)))
        _model_inputs(inputs)
        problem = _selected_output_error(ctx.dataset, field, bool(ctx.params.get("overwrite")))
        inputs.str("label_field", default="tinysam_masks", required=True, label="Output field",
                   invalid=problem is not None, error_message=problem or "")
        inputs.str("point_label_attribute", default="sam_labels", label="Point label attribute")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="Allow writing into an existing field that TinySAM did not create")
        if problem:
            inputs.view("output_problem", types.Error(label=problem))
        return types.Property(inputs, view=types.View(label="TinySAM: Segment selected labels"))

    def execute(self, ctx):
        p = ctx.params
        dataset = ctx.dataset
        check_image_collection(dataset)
        field = (p.get("label_field") or "").strip()
        problem = _selected_output_error(dataset, field, bool(p.get("overwrite", False)))
        if problem:
            raise RunError(problem)
        schema = dataset.get_field_schema()
        new_field = field not in schema
        by_sample, ignored = _selection(ctx, field)
        if not by_sample:
            raise PromptError("no usable selection: select boxes (Detections) or keypoints (Keypoints) "
                              "in the App, not masks or classifications")
        predictor = get_predictor(_options(ctx))
        written = 0
        for sample_id, picks in by_sample.items():
            sample = dataset[sample_id]
            try:
                image = load_image(sample.filepath)
            except ImageError as exc:
                raise ImageError(f"sample {sample_id}: {exc}") from exc
            h, w = image.shape[:2]
            prompts = []
            for fname, kind, label_id in picks:
                value = sample[fname]
                if kind == "Detections":
                    chosen = [d for d in value.detections if d.id == label_id]
                    prompts += L.box_prompts(type(value)(detections=chosen), w, h, fname)
                else:
                    chosen = [k for k in value.keypoints if k.id == label_id]
                    prompts += L.point_prompts(type(value)(keypoints=chosen), w, h, fname,
                                               p.get("point_label_attribute") or None)
            state = predictor.embed(image, key=image_key(sample.filepath))
            new = L.results_to_detections(L.segment_prompts(predictor, state, prompts))
            old = sample[field] if field in schema and sample[field] is not None else None
            replaced = {getattr(d, "prompt_id", None) for d in new.detections}
            kept = [d for d in (old.detections if old is not None else [])
                    if getattr(d, "prompt_id", None) not in replaced]
            sample[field] = type(new)(detections=kept + new.detections)
            sample.save()
            written += len(new.detections)
        choice = predictor.model_choice
        if run_key_for(field) not in dataset.list_runs():
            config = dataset.init_run(method="tinysam", task="selected_labels", label_field=field,
                                      model=choice.name, model_requested=choice.requested,
                                      model_note=choice.note, model_version=predictor.model_version)
            dataset.register_run(run_key_for(field), config, cleanup=False)
        message = f"{written} mask(s) written to '{field}' from {_selection_text(by_sample, ignored)}"
        message += f"; model: {choice.name}"
        if choice.note:
            message += " (the bundled demo model: `auto` found no official weights)"
        if not ctx.delegated:
            ctx.ops.notify(message, variant="success")
            show_written(ctx, self.plugin_name, field, by_sample, new_field)
        # The notification says it all; no result dialog over the sample the user is working on.
        return {"message": message, "masks": written, "samples": len(by_sample), "model": choice.name,
                "model_note": choice.note}


class ShowRunSummary(foo.Operator):
    """Status, counts and per-sample errors of the TinySAM run behind a field; a run whose process died is
    reported as stale, with how to continue it."""

    @property
    def config(self):
        return foo.OperatorConfig(name="show_run_summary", label="TinySAM: Show run summary", dynamic=True,
                                  icon="summarize")

    def resolve_input(self, ctx):
        inputs = types.Object()
        fields = [k[len("tinysam_"):] for k in (ctx.dataset.list_runs() if ctx.dataset else [])
                  if k.startswith("tinysam_")]
        if not fields:
            inputs.view("none", types.Warning(label="No TinySAM runs on this dataset yet"))
        else:
            inputs.enum("label_field", fields, default=fields[0], label="Field", view=types.DropdownView())
        return types.Property(inputs)

    def execute(self, ctx):
        field = ctx.params.get("label_field")
        if not field:
            raise RunError("no TinySAM run selected")
        info = ctx.dataset.get_run_info(run_key_for(field)).config.serialize()
        summary = load_summary(ctx.dataset, field)
        status = (summary or {}).get("status", "recorded")
        if status == "stale":
            status = f"stale: {summary['stale_reason']}. To continue: {summary['how_to_continue']}"
        return {"status": status, "config": info, "summary": summary}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("status", label="Status")
        outputs.obj("config", label="Run configuration", view=types.JSONView())
        outputs.obj("summary", label="Run summary", view=types.JSONView())
        return types.Property(outputs)


OPERATORS = (SegmentEverything, SegmentWithPrompts, SegmentSelectedLabels, ComputeEmbeddings, ShowRunSummary)
