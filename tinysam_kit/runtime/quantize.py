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
`tinysam_kit.evaluation.quantization.quantize_model` measures each encoder candidate on held-out images and
publishes the fastest one within the fidelity bounds; an engine asked for int8 before that builds the default
recipe (`ensure_int8`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tinysam_kit.data.images import IMAGE_SUFFIXES, find_images, load_image
from tinysam_kit.data.preprocess import to_model_input
from tinysam_kit.runtime.base import EngineUnavailableError
from tinysam_kit.runtime.export import PARTS, manifest_name, part_name, read_manifest, stamp_metadata, write_json_atomic

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
    files = find_images(directory)
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
def as_rgb(item) -> np.ndarray:
    """An image given as an array (used as is) or a path (loaded as RGB)."""
    return item if isinstance(item, np.ndarray) else load_image(item)


class _ImageReader:
    """Calibration feed: each image as the model's input (the predictor's preprocessing)."""

    def __init__(self, img_size: int, images):
        self._items = iter(images)
        self._img_size = img_size

    def get_next(self):
        item = next(self._items, None)
        if item is None:
            return None
        return {"image": to_model_input(as_rgb(item), self._img_size)[0].numpy()}

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


@contextlib.contextmanager
def quiet_quantizer():
    """ONNX Runtime's quantization tools log one line per tensor they leave in float straight on the root logger
    ("Quantization parameters for tensor ... not specified", a warning per float-kept bias); that is expected
    here, so those records are dropped while a quantization runs. Other loggers are untouched."""

    def from_quantizer(record: logging.LogRecord) -> bool:
        return f"{os.sep}onnxruntime{os.sep}quantization{os.sep}" not in record.pathname

    root = logging.getLogger()
    root.addFilter(from_quantizer)
    try:
        yield
    finally:
        root.removeFilter(from_quantizer)


def quantize_onnx_encoder(src: Path, dst: Path, recipe: Recipe, img_size: int, images) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    with tempfile.TemporaryDirectory() as tmp, quiet_quantizer():
        prepared = _preprocessed(src, Path(tmp) / "prepared.onnx")
        if not recipe.static:
            nodes = _weight_matmuls(prepared)
            quantize_dynamic(str(prepared), str(dst), op_types_to_quantize=["MatMul", "Gemm"],
                             nodes_to_quantize=nodes, per_channel=recipe.per_channel, weight_type=QuantType.QInt8)
            return {"quantized_nodes": len(nodes), "excluded_nodes": []}
        excluded = _sensitive_nodes(prepared) if recipe.guarded else []
        quantize_static(str(prepared), str(dst), _ImageReader(img_size, images), quant_format=QuantFormat.QDQ,
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
    with tempfile.TemporaryDirectory() as tmp, quiet_quantizer():
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


# --------------------------------------------------------------------------------------------- driver


def ensure_int8(directory: Path, stem: str, log=None) -> None:
    """Make the int8 export exist and match the fp32 one: the default recipe, calibrated on synthetic scenes
    (`tinysam quantize --calibration DIR` compares recipes on your own images and reports their fidelity)."""
    fp32 = read_manifest(directory, stem, "fp32")
    int8 = read_manifest(directory, stem, "int8")
    if int8 is not None and fp32 is not None and int8.get("source_sha256") == fp32.get("source_sha256") \
            and int8.get("format") == fp32.get("format"):
        return
    if fp32 is None:
        raise QuantizationError(f"no fp32 ONNX export of {stem!r} in {directory}: run `tinysam export` first")
    if not os.access(directory, os.W_OK):
        raise EngineUnavailableError(f"no int8 export of {stem!r} in read-only {directory}; run tinysam quantize")
    (log or (lambda _m: None))(f"quantizing {stem} to int8 (recipe {DEFAULT_RECIPE}) ...")
    with tempfile.TemporaryDirectory(dir=directory, prefix=".quantize-") as tmp:
        tmp = Path(tmp)
        shared = int8_decoders(directory, stem, tmp, DEFAULT_DECODER_INT8)
        candidate = build_int8_candidate(directory, stem, tmp, RECIPES[DEFAULT_RECIPE],
                                         synthetic_images(12, fp32["img_size"]), shared, fp32)
        publish_int8(directory, stem, candidate, DEFAULT_RECIPE, DEFAULT_DECODER_INT8, fp32, {})


# ------------------------------------------------------------------------------------------- int8 files
def int8_decoders(directory: Path, stem: str, work: Path, decoder: str) -> dict[str, Path]:
    """The int8 export's two decoder graphs in `work`: the per-prompt one with the `decoder` scope of int8
    products, the image-side one in fp32."""
    files = {part: work / part_name(stem, "int8", part) for part in ("decoder_image", "decoder_prompt")}
    if decoder != "fp32":
        quantize_decoder_prompt(directory / part_name(stem, "fp32", "decoder_prompt"), files["decoder_prompt"],
                                decoder)
    else:
        shutil.copy2(directory / part_name(stem, "fp32", "decoder_prompt"), files["decoder_prompt"])
    shutil.copy2(directory / part_name(stem, "fp32", "decoder_image"), files["decoder_image"])
    return files


def build_int8_candidate(directory: Path, stem: str, work: Path, recipe: Recipe, calibration: list,
                         decoders: dict[str, Path], fp32_manifest: dict) -> tuple[Path, dict]:
    """A complete int8 export in `work/<recipe>` (loadable by the ONNX engine): the encoder quantized with
    `recipe` on the `calibration` images, the shared `decoders` linked in. Returns (its folder, quantizer info)."""
    folder = work / recipe.name
    folder.mkdir()
    info = quantize_onnx_encoder(directory / part_name(stem, "fp32", "encoder"),
                                 folder / part_name(stem, "int8", "encoder"),
                                 recipe, int(fp32_manifest["img_size"]), calibration)
    for part, path in decoders.items():
        os.link(path, folder / part_name(stem, "int8", part))
    write_json_atomic(folder / manifest_name(stem, "int8"), {**fp32_manifest, "precision": "int8"})
    return folder, info


def publish_int8(directory: Path, stem: str, candidate: tuple[Path, dict], recipe: str, decoder: str,
                 fp32_manifest: dict, extra_manifest: dict) -> None:
    """Stamp the chosen candidate's graphs and move them next to the fp32 export, manifest last."""
    folder = candidate[0]
    for part in PARTS:
        src = folder / part_name(stem, "int8", part)
        stamp_metadata(src, {"source_model": fp32_manifest["source_model"],
                             "source_sha256": fp32_manifest["source_sha256"] or "", "precision": "int8",
                             "opset": str(fp32_manifest["opset"]), "part": part,
                             "recipe": recipe if part == "encoder" else
                             (f"dynamic {decoder}" if part == "decoder_prompt" and decoder != "fp32" else "fp32")})
        os.replace(src, directory / src.name)
    write_json_atomic(directory / manifest_name(stem, "int8"),
                      {**fp32_manifest, "precision": "int8", "recipe": recipe, **extra_manifest})
