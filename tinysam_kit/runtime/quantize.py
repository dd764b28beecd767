"""int8 post-training quantization of the exported graphs, with a measured choice of recipe.

Encoder recipes compared (ONNX Runtime's quantization tools):
  dynamic            weight-only int8 MatMul/Gemm, activations quantized at run time; convolutions stay fp32
  dynamic_pc         the same with per-channel weight scales
  static_qdq         static QDQ (uint8 activations calibrated on images, int8 per-channel weights) of every
                     Conv/MatMul/Gemm
  static_qdq_guarded static QDQ, but products fed by numerically sensitive tensors stay in float: outputs of
                     Softmax and GELU (long-tailed, as TinySAM's own PTQ notes), and the neck
In the per-prompt decoder only the first upscaling product becomes int8 by default (dynamic, no calibration
needed): ONNX Runtime runs it much faster in int8 at almost no cost in masks, while int8 in every decoder
MatMul costs far more mask fidelity than its speed-up is worth (`decoder="all"` still offers it).
`tinysam quantize` reports both (docs/runtime.md).
`quantize_model` evaluates each encoder candidate on held-out images (embedding cosine, mask IoU of int8 vs
fp32 over many prompts, encoder time) and publishes the fastest one that meets the fidelity bounds, with the
full comparison written next to the files.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tinysam_kit.runtime.base import EngineUnavailableError
from tinysam_kit.runtime.export import PARTS, manifest_name, part_name, read_manifest, stamp_metadata, write_json_atomic

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
COSINE_BOUND = 0.995
IOU_BOUND = 0.98
# Chosen by measurement on TinySAM's 1024-px architecture (`tinysam quantize` compares the recipes; numbers in
# docs/runtime.md): per-channel dynamic int8 MatMuls give both the best fidelity and the fastest encoder, while
# guarded static QDQ runs slower than fp32 (its quantize/dequantize pairs around every float-kept operator
# cost more than the int8 products save).
DEFAULT_RECIPE = "dynamic_pc"
# Which per-prompt decoder products are int8: "fp32" (none), "upscale" (the first upscaling product alone,
# see split_decoder.PixelUpscale) or "all" weight MatMuls. All-int8 decoder MatMuls cost much more mask IoU
# vs fp32 than they save of a click; the upscaling product alone is much faster in int8 at almost no cost
# (`tinysam quantize --decoder-int8 ...` measures each scope; docs/runtime.md).
DECODER_INT8_SCOPES = ("fp32", "upscale", "all")
DEFAULT_DECODER_INT8 = "upscale"


class QuantizationError(RuntimeError):
    """Quantization could not run (no calibration images, missing fp32 export, ...)."""


@dataclass(frozen=True)
class Recipe:
    name: str
    static: bool
    per_channel: bool
    guarded: bool


RECIPES = {r.name: r for r in (
    Recipe("dynamic", False, False, False),
    Recipe("dynamic_pc", False, True, False),
    Recipe("static_qdq", True, True, False),
    Recipe("static_qdq_guarded", True, True, True),
)}


def calibration_images(directory: str | os.PathLike) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise QuantizationError(f"calibration directory {directory} does not exist")
    files = sorted(p for p in directory.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise QuantizationError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {directory}")
    return files


def synthetic_images(count: int, size: int = 1024, seed: int = 0) -> list[np.ndarray]:
    """Project-made scenes (the training world) for calibrating when the user gives no images."""
    from tinysam_kit.data.synthetic import SyntheticWorld

    world = SyntheticWorld(seed=seed)
    return [world[i].resized(size).image for i in range(count)]


# ------------------------------------------------------------------------------------------ graph analysis
def _sensitive_nodes(model_path: Path) -> list[str]:
    """Conv/MatMul/Gemm nodes whose activation input is a Softmax or GELU output, plus the neck."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    initializers = {i.name for i in graph.initializer}
    passthrough = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Cast"}

    def sensitive(tensor: str, depth: int = 0) -> bool:
        node = producer.get(tensor)
        if node is None or depth > 4:
            return False
        if node.op_type in ("Softmax", "Gelu", "Erf", "FastGelu"):
            return True
        if node.op_type in passthrough or (node.op_type in ("Mul", "Add", "Div") and depth < 3):
            return any(sensitive(i, depth + 1) for i in node.input if i not in initializers)
        return False

    excluded = []
    for node in graph.node:
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        if "neck" in node.name or any(sensitive(i) for i in node.input if i not in initializers):
            excluded.append(node.name)
    return excluded


def _weight_matmuls(model_path: Path) -> list[str]:
    """MatMul/Gemm nodes with a constant weight (activation × activation products stay float)."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    constants = {i.name for i in graph.initializer}
    constants |= {out for n in graph.node if n.op_type == "Constant" for out in n.output}
    return [n.name for n in graph.node if n.op_type in ("MatMul", "Gemm") and any(i in constants for i in n.input)]


# ------------------------------------------------------------------------------------------ quantization
class _ImageReader:
    """Calibration feed: the predictor's own preprocessing of each image."""

    def __init__(self, preprocess, images):
        self._items = iter(images)
        self._preprocess = preprocess

    def get_next(self):
        item = next(self._items, None)
        if item is None:
            return None
        return {"image": self._preprocess(_rgb(item))[0].numpy()}

    def rewind(self):  # the calibrator reads the data once
        pass


def _preprocessed(src: Path, dst: Path) -> Path:
    """Shape-inferred copy whose Constant nodes are initializers (the quantizers only quantize weights and
    biases held as initializers)."""
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    proto = onnx.load(str(src))
    graph = proto.graph
    keep = []
    for node in graph.node:
        value = next((a for a in node.attribute if a.name == "value"), None)
        if node.op_type == "Constant" and value is not None and len(node.attribute) == 1:
            tensor = onnx.TensorProto()
            tensor.CopyFrom(value.t)
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
    staged = dst.with_name("staged.onnx")
    onnx.save(proto, str(staged))
    # No graph optimisation here: it fuses MatMul+Add into Gemm, which dynamic quantization leaves in float.
    quant_pre_process(str(staged), str(dst), skip_optimization=True, skip_symbolic_shape=True)
    return dst


def quantize_encoder(src: Path, dst: Path, recipe: Recipe, preprocess, images) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    logging.getLogger().setLevel(logging.ERROR)  # the quantizer logs a warning per float-kept bias

    with tempfile.TemporaryDirectory() as tmp:
        prepared = _preprocessed(src, Path(tmp) / "prepared.onnx")
        if not recipe.static:
            nodes = _weight_matmuls(prepared)
            quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_quantize=nodes, per_channel=recipe.per_channel, weight_type=QuantType.QInt8)
            return {"quantized_nodes": len(nodes), "excluded_nodes": []}
        excluded = _sensitive_nodes(prepared) if recipe.guarded else []
        quantize_static(str(prepared), str(dst), _ImageReader(preprocess, images), quant_format=QuantFormat.QDQ,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=recipe.per_channel,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        return {"excluded_nodes": excluded}


def quantize_decoder_prompt(src: Path, dst: Path, scope: str = "all") -> int:
    """Dynamic int8 weight MatMuls in the per-prompt decoder: every one (`all`) or only the first upscaling
    product (`upscale`, see `split_decoder.PixelUpscale`). Returns the number of quantized nodes."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if scope not in DECODER_INT8_SCOPES or scope == "fp32":
        raise QuantizationError(f"unknown decoder quantization scope {scope!r} (all, upscale)")
    with tempfile.TemporaryDirectory() as tmp:
        prepared = _preprocessed(src, Path(tmp) / "prepared.onnx")
        nodes = _weight_matmuls(prepared)
        if scope == "upscale":
            nodes = [n for n in nodes if "/upscale1/" in n]
        if not nodes:
            raise QuantizationError(f"no {scope} MatMul found in {src.name} (an export older than this code?)")
        quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                         nodes_to_quantize=nodes, weight_type=QuantType.QInt8)
        return len(nodes)


# -------------------------------------------------------------------------------------------- fidelity
def _mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU over the last two axes; two empty masks agree perfectly."""
    inter = np.logical_and(a, b).sum(axis=(-2, -1))
    union = np.logical_or(a, b).sum(axis=(-2, -1))
    return np.where(union == 0, 1.0, inter / np.maximum(union, 1))


def fidelity(reference, candidate, images, prompts_per_image: int = 32, seed: int = 0) -> dict:
    """Embedding cosine and mask IoU of `candidate` vs `reference` predictors over images × random points."""
    rng = np.random.default_rng(seed)
    cosines, ious, best_ious = [], [], []
    for item in images:
        rgb = _rgb(item)
        s_ref, s_cand = reference.embed(rgb), candidate.embed(rgb)
        e_ref = np.asarray(s_ref.embedding, np.float64).ravel()
        e_cand = np.asarray(s_cand.embedding, np.float64).ravel()
        cosines.append(float(e_ref @ e_cand / (np.linalg.norm(e_ref) * np.linalg.norm(e_cand) + 1e-12)))
        h, w = rgb.shape[:2]
        pts = rng.uniform((0, 0), (w - 1, h - 1), size=(prompts_per_image, 1, 2))
        labels = np.ones((prompts_per_image, 1))
        m_ref, q_ref, _ = reference.predict_batch(pts, labels, image_embedding=s_ref)
        m_cand, _, _ = candidate.predict_batch(pts, labels, image_embedding=s_cand)
        iou = _mask_iou(m_ref, m_cand)  # (B, 3)
        ious.extend(iou.ravel().tolist())
        best = q_ref.argmax(axis=1)
        best_ious.extend(iou[np.arange(len(best)), best].tolist())
        reference.cache.clear()
        candidate.cache.clear()
    ious_a = np.array(ious)
    return {
        "images": len(cosines), "prompts": len(best_ious),
        "embedding_cosine_mean": float(np.mean(cosines)), "embedding_cosine_min": float(np.min(cosines)),
        "mask_iou_mean": float(ious_a.mean()), "mask_iou_p05": float(np.percentile(ious_a, 5)),
        "best_mask_iou_mean": float(np.mean(best_ious)),
    }


def _median_seconds(run, repeats: int = 3) -> float:
    """Median wall time of `run()` after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _encoder_seconds(session, image: np.ndarray) -> float:
    return _median_seconds(lambda: session.run(None, {"image": image}))


def meets_bounds(fid: dict) -> bool:
    return fid["embedding_cosine_min"] >= COSINE_BOUND and fid["mask_iou_mean"] >= IOU_BOUND


# --------------------------------------------------------------------------------------------- driver
def quantize_model(directory: str | os.PathLike, stem: str, *, calibration=None, holdout=None,
                   recipes: list[str] | None = None, threads: int | None = None, prompts_per_image: int = 32,
                   decoder: str = DEFAULT_DECODER_INT8, log=print) -> dict:
    """Quantize the fp32 export `<directory>/<stem>.fp32.*` and publish the chosen int8 recipe.

    `calibration` is a directory or a list of images (default: synthetic scenes); `holdout` likewise
    (default: the last quarter of the calibration images, never used for calibrating). `decoder` says which
    per-prompt decoder products become int8 (`DECODER_INT8_SCOPES`). Returns the report.
    """
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.runtime.onnx_engine import OnnxEngine, get_session

    directory = Path(directory)
    fp32 = read_manifest(directory, stem, "fp32")
    if fp32 is None:
        raise QuantizationError(f"no fp32 ONNX export of {stem!r} in {directory}: run `tinysam export` first")
    if decoder not in DECODER_INT8_SCOPES:
        raise QuantizationError(f"unknown decoder scope {decoder!r} (choose from {', '.join(DECODER_INT8_SCOPES)})")
    names = recipes or list(RECIPES)
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        raise QuantizationError(f"unknown recipe(s) {', '.join(unknown)} (choose from {', '.join(RECIPES)})")
    if calibration is None:
        images = synthetic_images(12, fp32["img_size"])
        source = "synthetic scenes (tinysam_kit.data.synthetic, seed 0)"
    elif isinstance(calibration, (str, os.PathLike)):
        images, source = calibration_images(calibration), str(calibration)
    else:
        images, source = list(calibration), "images given in code"
    if holdout is None:
        if len(images) < 2:
            raise QuantizationError("need at least 2 calibration images (one is held out to measure fidelity)")
        cut = max(1, len(images) * 3 // 4)
        calib, held = images[:cut], images[cut:]
    else:
        calib = images
        held, _ = _held_out(holdout, fp32["img_size"])
    reference = TinySamPredictor(OnnxEngine(directory, stem, precision="fp32", device="cpu", threads=threads))
    sample = reference.preprocess(_rgb(held[0]))[0].numpy()
    fp32_seconds = _encoder_seconds(get_session(directory / part_name(stem, "fp32", "encoder"),
                                                ["CPUExecutionProvider"], threads), sample)
    report = {"model_stem": stem, "source_model": fp32["source_model"], "source_sha256": fp32["source_sha256"],
              "calibration": {"source": source, "images": len(calib), "held_out_images": len(held)},
              "bounds": {"embedding_cosine_min": COSINE_BOUND, "mask_iou_mean": IOU_BOUND},
              "fp32_encoder_seconds": fp32_seconds, "threads": threads,
              "decoder_prompt": decoder, "candidates": {}}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".quantize-") as tmp:
        tmp = Path(tmp)
        work = {part: tmp / part_name(stem, "int8", part) for part in PARTS}
        if decoder != "fp32":
            quantize_decoder_prompt(directory / part_name(stem, "fp32", "decoder_prompt"), work["decoder_prompt"],
                                    decoder)
        else:
            shutil.copy2(directory / part_name(stem, "fp32", "decoder_prompt"), work["decoder_prompt"])
        shutil.copy2(directory / part_name(stem, "fp32", "decoder_image"), work["decoder_image"])
        best = None
        for name in names:
            recipe = RECIPES[name]
            log(f"quantizing encoder with recipe {name} ...")
            cand_dir = tmp / name
            cand_dir.mkdir()
            t0 = time.perf_counter()
            info = quantize_encoder(directory / part_name(stem, "fp32", "encoder"),
                                    cand_dir / part_name(stem, "int8", "encoder"), recipe, reference.preprocess,
                                    calib)
            for part in ("decoder_image", "decoder_prompt"):
                os.link(work[part], cand_dir / part_name(stem, "int8", part))
            write_json_atomic(cand_dir / manifest_name(stem, "int8"), {**fp32, "precision": "int8"})
            candidate = TinySamPredictor(OnnxEngine(cand_dir, stem, precision="int8", device="cpu",
                                                    threads=threads))
            fid = fidelity(reference, candidate, held, prompts_per_image)
            seconds = _encoder_seconds(candidate.engine.encoder, sample)
            entry = {"recipe": asdict(recipe), "encoder_seconds": seconds,
                     "encoder_ratio_vs_fp32": seconds / fp32_seconds, "fidelity": fid,
                     "meets_bounds": meets_bounds(fid), "quantize_seconds": time.perf_counter() - t0,
                     "excluded_nodes": len(info["excluded_nodes"])}
            report["candidates"][name] = entry
            log(f"  {name}: encoder {seconds:.3f}s ({entry['encoder_ratio_vs_fp32']:.2f}× fp32), "
                f"cosine min {fid['embedding_cosine_min']:.4f}, mask IoU mean {fid['mask_iou_mean']:.4f}")
            key = (entry["meets_bounds"], -seconds if entry["meets_bounds"] else fid["mask_iou_mean"])
            if best is None or key > best[0]:
                best = (key, name)
        chosen = best[1]
        report["chosen"] = chosen
        report["chosen_meets_bounds"] = report["candidates"][chosen]["meets_bounds"]
        final = {}
        for part in PARTS:
            src = tmp / chosen / part_name(stem, "int8", part)
            stamp_metadata(src, {"source_model": fp32["source_model"], "source_sha256": fp32["source_sha256"] or "",
                                 "precision": "int8", "opset": str(fp32["opset"]), "part": part,
                                 "recipe": chosen if part == "encoder" else
                                 (f"dynamic {decoder}" if part == "decoder_prompt" and decoder != "fp32"
                                  else "fp32")})
            final[part] = directory / src.name
            os.replace(src, final[part])
        report_path = directory / f"{stem}.int8.quantization.json"
        write_json_atomic(report_path, report)
        write_json_atomic(directory / manifest_name(stem, "int8"),
                          {**fp32, "precision": "int8", "recipe": chosen, "fidelity_report": report_path.name,
                           "fidelity": report["candidates"][chosen]["fidelity"]})
    log(f"int8 recipe {chosen} written to {directory} (report {report_path.name})")
    return report


def _rgb(item) -> np.ndarray:
    """An image given as an array (used as is) or a path (loaded as RGB)."""
    if isinstance(item, np.ndarray):
        return item
    from tinysam_kit.data.images import load_image

    return load_image(item)


def _held_out(holdout, img_size: int) -> tuple[list, str]:
    """Held-out images for a fidelity report: a directory, a list, or synthetic scenes of a world seed that
    calibration never uses."""
    if holdout is None:
        return synthetic_images(4, img_size, seed=1), "synthetic scenes (seed 1; calibration uses seed 0)"
    if isinstance(holdout, (str, os.PathLike)):
        return calibration_images(holdout), str(holdout)
    return list(holdout), "images given in code"


def torch_int8_report(model: str, *, holdout=None, threads: int | None = None, prompts_per_image: int = 32,
                      log=print) -> dict:
    """The PyTorch engine's int8 encoder of `model` (compiled now, or loaded from the cache) measured against
    its fp32 engine: embedding cosine and mask IoU over held-out images × random clicks, and encoder time.

    When the compiled package is cached (models with a known SHA-256), the report is written next to it as
    `<package>.fidelity.json` (`report_path`); the package itself is used whatever the result, as with
    `tinysam quantize` for ONNX, and `meets_bounds` says whether it is within `COSINE_BOUND` / `IOU_BOUND`.
    """
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.runtime import create_engine
    from tinysam_kit.runtime.torch_int8 import CALIBRATION_IMAGES, FLOAT_MODULES, compiled_dir

    log("compiling the int8 encoder (or loading it from the cache) ...")
    int8 = TinySamPredictor(create_engine(model, engine="torch", precision="int8", device="cpu", threads=threads))
    fp32 = TinySamPredictor(create_engine(model, engine="torch", precision="fp32", device="cpu", threads=threads))
    held, source = _held_out(holdout, fp32.img_size)
    if not held:
        raise QuantizationError("no held-out images to measure fidelity on")
    sample = fp32.preprocess(_rgb(held[0]))[0]
    seconds = {name: _median_seconds(lambda p=p: p.engine.encode(sample)) for name, p in (("fp32", fp32),
                                                                                           ("int8", int8))}
    log(f"measuring fidelity on {len(held)} held-out images × {prompts_per_image} clicks ...")
    fid = fidelity(fp32, int8, held, prompts_per_image)
    encoder = int8.engine.encoder
    info = int8.engine.info
    report = {"engine": "torch", "source_model": info.model_name, "source_sha256": info.model_sha256,
              "package": str(encoder.package), "from_cache": encoder.from_cache,
              "recipe": {"scheme": "PT2E static int8 (X86InductorQuantizer), AOTInductor",
                         "float_modules": list(FLOAT_MODULES), "calibration_images": CALIBRATION_IMAGES},
              "held_out": {"source": source, "images": len(held), "prompts_per_image": prompts_per_image},
              "bounds": {"embedding_cosine_min": COSINE_BOUND, "mask_iou_mean": IOU_BOUND},
              "fidelity": fid, "meets_bounds": meets_bounds(fid), "threads": threads,
              "encoder_seconds": {**seconds, "int8_vs_fp32": seconds["int8"] / seconds["fp32"]},
              "report_path": None}
    if encoder.package.parent == compiled_dir():
        path = encoder.package.with_name(encoder.package.name + ".fidelity.json")
        report["report_path"] = str(path)
        write_json_atomic(path, report)
    return report


def torch_int8_summary(report: dict) -> str:
    fid, sec = report["fidelity"], report["encoder_seconds"]
    where = report["report_path"] or "not written (a model without a SHA-256 is compiled into a temporary directory)"
    return (f"torch int8 encoder {sec['int8']:.3f}s vs fp32 {sec['fp32']:.3f}s ({sec['int8_vs_fp32']:.2f}×)  "
            f"cosine min {fid['embedding_cosine_min']:.4f}  mask IoU mean {fid['mask_iou_mean']:.4f} "
            f"p05 {fid['mask_iou_p05']:.3f}  {'ok' if report['meets_bounds'] else 'below bounds'}\n"
            f"package {report['package']}\nreport {where}")


def ensure_int8(directory: Path, stem: str, log=None) -> None:
    """Make the int8 export exist and match the fp32 one; calibrates on synthetic scenes when none is given
    (run `tinysam quantize --calibration DIR` with your own images for a better calibration)."""
    fp32 = read_manifest(directory, stem, "fp32")
    int8 = read_manifest(directory, stem, "int8")
    if int8 is not None and fp32 is not None and int8.get("source_sha256") == fp32.get("source_sha256") \
            and int8.get("format") == fp32.get("format"):
        return
    if not os.access(directory, os.W_OK):
        raise EngineUnavailableError(f"no int8 export of {stem!r} in read-only {directory}; run tinysam quantize")
    quantize_model(directory, stem, recipes=[DEFAULT_RECIPE], prompts_per_image=8, log=log or (lambda _m: None))


def report_summary(report: dict) -> str:
    lines = [f"fp32 encoder: {report['fp32_encoder_seconds']:.3f}s"]
    for name, c in report["candidates"].items():
        f = c["fidelity"]
        mark = "*" if name == report["chosen"] else " "
        lines.append(f"{mark} {name:20s} encoder {c['encoder_seconds']:.3f}s ({c['encoder_ratio_vs_fp32']:.2f}×)  "
                     f"cosine min {f['embedding_cosine_min']:.4f}  mask IoU mean {f['mask_iou_mean']:.4f} "
                     f"p05 {f['mask_iou_p05']:.3f}  {'ok' if c['meets_bounds'] else 'below bounds'}")
    return "\n".join(lines)


def dumps(report: dict) -> str:
    return json.dumps(report, indent=2, sort_keys=True)
