"""TinySAM operators for the FiftyOne App (and `fiftyone.operators.execute_operator`)."""

from __future__ import annotations

import os
import time

import fiftyone.operators as foo
import fiftyone.operators.types as types

from tinysam_kit.data.images import ImageError, load_image
from tinysam_kit.inference.predictor import PromptError
from tinysam_kit.integrations.fiftyone import labels as L
from tinysam_kit.integrations.fiftyone.predictors import get_predictor
from tinysam_kit.integrations.fiftyone.runner import (
    RunError,
    RunSpec,
    check_field_name,
    check_image_collection,
    field_type_name,
    load_summary,
    run_key_for,
    run_segmentation,
)

ENGINES = ("torch", "onnx")
PRECISIONS = ("fp32", "fp16", "int8")
DEVICES = ("auto", "cpu", "cuda")
ERRORS_SHOWN = 20


def default_model() -> str:
    return "auto"  # official TinySAM if its weights can be had, else the bundled demo model


# ------------------------------------------------------------------------------ shared form parts
def _model_inputs(inputs: types.Object) -> None:
    inputs.str("model", default=default_model(), label="Model",
               description="auto (official TinySAM, else the bundled demo), a registered model (tinysam, "
                           "tinysam-v1, mobilesam, demo) or a checkpoint path")
    inputs.enum("engine", list(ENGINES), default="torch", label="Engine",
                view=types.RadioGroup(orientation="horizontal"))
    inputs.enum("precision", list(PRECISIONS), default="fp32", label="Precision",
                description="int8: ONNX engine, or torch on x86 CPUs with VNNI/AMX; fp16 needs a GPU",
                view=types.RadioGroup(orientation="horizontal"))
    inputs.enum("device", list(DEVICES), default="auto", label="Device",
                view=types.RadioGroup(orientation="horizontal"))


def _output_inputs(ctx, inputs: types.Object, default_field: str) -> None:
    inputs.str("label_field", default=default_field, required=True, label="Output field",
               description="New Detections field that receives the instance masks")
    inputs.bool("overwrite", default=False, label="Overwrite",
                description="Replace the output field's values on the target samples if it already exists")
    inputs.bool("masks_on_disk", default=False, label="Store masks on disk",
                description="Write masks as PNG files and store only their paths (for large runs)")
    if ctx.params.get("masks_on_disk", False):
        inputs.str("mask_dir", required=True, label="Mask directory",
                   description="Masks go to <dir>/<field>/<sample id>/<i>.png")
    field = ctx.params.get("label_field") or default_field
    if ctx.dataset is not None and field in ctx.dataset.get_field_schema():
        if run_key_for(field) in ctx.dataset.list_runs():
            inputs.view("resume_notice", types.Notice(
                label=f"'{field}' holds a TinySAM run: samples already done are skipped (resume) unless "
                      "you tick Overwrite"))
        elif not ctx.params.get("overwrite", False):
            inputs.view("exists_warning", types.Warning(
                label=f"Field '{field}' already exists; choose another name or tick Overwrite"))


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
    if p.get("masks_on_disk", False):
        mask_dir = p.get("mask_dir")
        if not mask_dir:
            raise RunError("'Store masks on disk' needs a mask directory")
    try:  # samples per database write: a smaller batch saves progress more often (for the API; not in forms)
        write_batch = int(p.get("write_batch", 16))
    except (TypeError, ValueError):
        write_batch = 0
    if write_batch < 1:
        raise RunError(f"write_batch must be a positive integer, got {p.get('write_batch')!r}")
    return dict(task=task, label_field=(p.get("label_field") or "").strip(), model=p.get("model") or default_model(),
                engine=p.get("engine", "torch"), precision=p.get("precision", "fp32"),
                device=p.get("device", "auto"), overwrite=bool(p.get("overwrite", False)), mask_dir=mask_dir,
                write_batch=write_batch)


def _progress(ctx):
    last = [0.0]

    def report(n: int, total: int, name: str) -> None:
        now = time.monotonic()
        if n == total or now - last[0] > 1.0:  # each report is a database write when delegated
            last[0] = now
            ctx.set_progress(progress=n / max(total, 1), label=f"{n}/{total} {name}")

    return report


def _finish(ctx, summary) -> dict:
    result = summary.to_dict()
    result["errors"] = result["errors"][:ERRORS_SHOWN]
    result["message"] = summary.message()
    if not ctx.delegated:
        ctx.ops.notify(result["message"], variant="warning" if summary.errors else "success")
        ctx.ops.reload_dataset()
    return result


def _summary_outputs(ctx) -> types.Property:
    outputs = types.Object()
    outputs.str("message", label="Summary")
    outputs.int("processed", label="Samples segmented")
    outputs.int("already_done", label="Already done (skipped)")
    outputs.int("failed", label="Failed")
    outputs.int("masks", label="Masks written")
    outputs.float("images_per_minute", label="Images per minute")
    return types.Property(outputs)


class _LongOperator(foo.Operator):
    """Dataset-wide work: delegated by default, immediate on request."""

    def resolve_delegation(self, ctx):
        return None  # let the user (or the caller's request_delegation) choose; the default is delegated

    def resolve_output(self, ctx):
        return _summary_outputs(ctx)


# ------------------------------------------------------------------------------------- operators
class SegmentEverything(_LongOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_everything", label="TinySAM: Segment everything",
            description="Automatic instance masks for every object (TinySAM hierarchical or dense grid)",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True, icon="auto_awesome")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _media_error(ctx, inputs):
            return types.Property(inputs, view=types.View(label="TinySAM: Segment everything"))
        inputs.view_target(ctx, action_description="Segment")
        _model_inputs(inputs)
        inputs.enum("mode", ["hierarchical", "dense"], default="hierarchical", label="Mode",
                    description="hierarchical: TinySAM's sparse-then-fill strategy (faster); dense: full grid",
                    view=types.RadioGroup(orientation="horizontal"))
        inputs.int("points_per_side", default=32, min=2, label="Points per side")
        inputs.float("pred_iou_thresh", default=0.88, min=0.0, max=1.0, label="Predicted IoU threshold")
        inputs.float("stability_score_thresh", default=0.95, min=0.0, max=1.0, label="Stability threshold")
        inputs.float("box_nms_thresh", default=0.7, min=0.0, max=1.0, label="Box NMS threshold")
        inputs.int("min_mask_region_area", default=0, min=0, label="Minimum area (pixels)",
                   description="Remove holes and islands smaller than this")
        inputs.int("max_masks", default=0, min=0, label="Maximum masks per image (0 = no limit)")
        inputs.str("label", default="object", label="Label name")
        inputs.str("instance_map_field", required=False, label="Instance map field (optional)",
                   description="Also write a Segmentation whose pixel values are instance numbers")
        _output_inputs(ctx, inputs, "tinysam_everything")
        return types.Property(inputs, view=types.View(label="TinySAM: Segment everything"))

    def resolve_run_name(self, ctx):
        return f"TinySAM everything → {ctx.params.get('label_field', '')}"

    def execute(self, ctx):
        p = ctx.params
        everything = {name: p[name] for name in ("points_per_side", "pred_iou_thresh", "stability_score_thresh",
                                                 "box_nms_thresh", "min_mask_region_area") if p.get(name) is not None}
        if p.get("max_masks"):
            everything["max_masks"] = int(p["max_masks"])
        spec = RunSpec(**_common_spec(ctx, "everything"), mode=p.get("mode", "hierarchical"),
                       everything=everything, label=p.get("label") or "object",
                       instance_map_field=(p.get("instance_map_field") or "").strip() or None)
        return _finish(ctx, run_segmentation(ctx.target_view(), spec, progress=_progress(ctx)))


class SegmentWithPrompts(_LongOperator):
    @property
    def config(self):
        return foo.OperatorConfig(
            name="segment_with_prompts", label="TinySAM: Segment from prompts",
            description="Instance masks from the boxes of a Detections field and/or the points of a Keypoints field",
            dynamic=True, allow_immediate_execution=True, allow_delegated_execution=True,
            default_choice_to_delegated=True, icon="ads_click")

    def resolve_input(self, ctx):
        inputs = types.Object()
        if _media_error(ctx, inputs):
            return types.Property(inputs, view=types.View(label="TinySAM: Segment from prompts"))
        inputs.view_target(ctx, action_description="Segment")
        schema = ctx.dataset.get_field_schema() if ctx.dataset is not None else {}
        box_fields = [n for n in schema if field_type_name(schema, n) == "Detections"]
        point_fields = [n for n in schema if field_type_name(schema, n) == "Keypoints"]
        inputs.enum("box_field", box_fields, required=False, label="Box prompts (Detections field)",
                    view=types.DropdownView())
        inputs.enum("point_field", point_fields, required=False, label="Point prompts (Keypoints field)",
                    description="Per-point positive (1) / negative (0) labels come from the attribute below",
                    view=types.DropdownView())
        inputs.str("point_label_attribute", default="sam_labels", label="Point label attribute",
                   description="Keypoint attribute with one 0/1 per point (missing: all positive)")
        if not box_fields and not point_fields:
            inputs.view("no_prompts", types.Warning(
                label="This dataset has no Detections or Keypoints field to prompt with"))
        _model_inputs(inputs)
        _output_inputs(ctx, inputs, "tinysam_masks")
        return types.Property(inputs, view=types.View(label="TinySAM: Segment from prompts"))

    def resolve_run_name(self, ctx):
        return f"TinySAM prompts → {ctx.params.get('label_field', '')}"

    def execute(self, ctx):
        p = ctx.params
        spec = RunSpec(**_common_spec(ctx, "prompts"), box_field=p.get("box_field") or None,
                       point_field=p.get("point_field") or None,
                       point_label_attribute=p.get("point_label_attribute") or None)
        return _finish(ctx, run_segmentation(ctx.target_view(), spec, progress=_progress(ctx)))


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
        if not ctx.selected_labels:
            inputs.view("no_selection", types.Warning(
                label="Select boxes (Detections) or keypoints in the App first"))
        _model_inputs(inputs)
        inputs.str("label_field", default="tinysam_masks", required=True, label="Output field")
        inputs.str("point_label_attribute", default="sam_labels", label="Point label attribute")
        inputs.bool("overwrite", default=False, label="Overwrite",
                    description="Allow writing into an existing field that TinySAM did not create")
        return types.Property(inputs, view=types.View(label="TinySAM: Segment selected labels"))

    def execute(self, ctx):
        p = ctx.params
        dataset = ctx.dataset
        check_image_collection(dataset)
        field = (p.get("label_field") or "").strip()
        spec = RunSpec(task="prompts", label_field=field)
        check_field_name(field, "output field")
        schema = dataset.get_field_schema()
        have = field_type_name(schema, field)
        if have is not None and have != "Detections":
            raise RunError(f"field {field!r} already exists as {have}; choose another output field")
        if have is not None and not p.get("overwrite", False) and run_key_for(field) not in dataset.list_runs():
            raise RunError(f"field {field!r} already exists and was not written by TinySAM; choose another "
                           "output field or tick overwrite")
        by_sample: dict[str, list] = {}
        ignored = 0
        for sel in ctx.selected_labels:
            kind = field_type_name(schema, sel.get("field"))
            if kind not in ("Detections", "Keypoints") or sel.get("field") == field or sel.get("frame_number"):
                ignored += 1
                continue
            by_sample.setdefault(sel["sample_id"], []).append((sel["field"], kind, sel["label_id"]))
        if not by_sample:
            raise PromptError("no usable selection: select boxes (Detections) or keypoints (Keypoints) "
                              "in the App, not masks or classifications")
        predictor = get_predictor(p.get("model") or default_model(), p.get("engine", "torch"),
                                  p.get("precision", "fp32"), p.get("device", "auto"))
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
            stat = os.stat(sample.filepath)
            state = predictor.embed(image, key=f"{sample.filepath}:{stat.st_mtime_ns}:{stat.st_size}")
            new = L.results_to_detections(L.segment_prompts(predictor, state, prompts))
            old = sample[field] if field in schema and sample[field] is not None else None
            replaced = {getattr(d, "prompt_id", None) for d in new.detections}
            kept = [d for d in (old.detections if old is not None else [])
                    if getattr(d, "prompt_id", None) not in replaced]
            sample[field] = type(new)(detections=kept + new.detections)
            sample.save()
            written += len(new.detections)
        if run_key_for(field) not in dataset.list_runs():
            config = dataset.init_run(method="tinysam", task="selected_labels", label_field=field,
                                      model=str(spec.model), model_version=predictor.model_version)
            dataset.register_run(run_key_for(field), config, cleanup=False)
        message = f"{written} mask(s) written to '{field}' on {len(by_sample)} sample(s)"
        if ignored:
            message += f"; {ignored} selected label(s) ignored (not boxes/keypoints)"
        if not ctx.delegated:
            ctx.ops.notify(message, variant="success")
            ctx.ops.reload_samples()
        return {"message": message, "masks": written, "samples": len(by_sample)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.str("message", label="Result")
        return types.Property(outputs)


class ShowRunSummary(foo.Operator):
    """Status, counts and per-sample errors of the TinySAM run behind a field."""

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
        return {"config": info, "summary": load_summary(ctx.dataset, field)}

    def resolve_output(self, ctx):
        outputs = types.Object()
        outputs.obj("config", label="Run configuration", view=types.JSONView())
        outputs.obj("summary", label="Run summary", view=types.JSONView())
        return types.Property(outputs)


OPERATORS = (SegmentEverything, SegmentWithPrompts, SegmentSelectedLabels, ShowRunSummary)
