"""How close int8 engines stay to fp32: embedding cosine and mask IoU over held-out images × random clicks,
encoder time; the recipe comparison behind `tinysam quantize` and the torch int8 report."""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from tinysam_kit.data.preprocess import to_model_input
from tinysam_kit.inference.predictor import TinySamPredictor
from tinysam_kit.runtime import create_engine
from tinysam_kit.runtime.export import part_name, read_manifest, write_json_atomic
from tinysam_kit.runtime.onnx_engine import OnnxEngine, get_session
from tinysam_kit.runtime.quantize import (
    DECODER_INT8_SCOPES,
    DEFAULT_DECODER_INT8,
    RECIPES,
    QuantizationError,
    as_rgb,
    build_int8_candidate,
    calibration_images,
    int8_decoders,
    publish_int8,
    synthetic_images,
)
from tinysam_kit.runtime.torch_int8 import CALIBRATION_IMAGES, FLOAT_MODULES, compiled_dir

COSINE_BOUND = 0.995


IOU_BOUND = 0.98


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
        rgb = as_rgb(item)
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


def quantize_model(directory: str | os.PathLike, stem: str, *, calibration=None, holdout=None,
                   recipes: list[str] | None = None, threads: int | None = None, prompts_per_image: int = 32,
                   decoder: str = DEFAULT_DECODER_INT8, log=print) -> dict:
    """Quantize the fp32 export `<directory>/<stem>.fp32.*` with each recipe, measure each against fp32 and
    publish the fastest within the fidelity bounds (else the most faithful), with the comparison beside it.

    `calibration` is a directory or a list of images (default: synthetic scenes); `holdout` likewise
    (default: the last quarter of the calibration images, never used for calibrating). `decoder` says which
    per-prompt decoder products become int8 (`DECODER_INT8_SCOPES`). Returns the report.
    """
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
    sample = to_model_input(as_rgb(held[0]), int(fp32["img_size"]))[0].numpy()
    fp32_seconds = _encoder_seconds(get_session(directory / part_name(stem, "fp32", "encoder"),
                                                ["CPUExecutionProvider"], threads), sample)
    report = {"model_stem": stem, "source_model": fp32["source_model"], "source_sha256": fp32["source_sha256"],
              "calibration": {"source": source, "images": len(calib), "held_out_images": len(held)},
              "bounds": {"embedding_cosine_min": COSINE_BOUND, "mask_iou_mean": IOU_BOUND},
              "fp32_encoder_seconds": fp32_seconds, "threads": threads,
              "decoder_prompt": decoder, "candidates": {}}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".quantize-") as tmp:
        tmp = Path(tmp)
        decoders = int8_decoders(directory, stem, tmp, decoder)
        built, best = {}, None
        for name in names:
            recipe = RECIPES[name]
            log(f"quantizing encoder with recipe {name} ...")
            t0 = time.perf_counter()
            built[name] = build_int8_candidate(directory, stem, tmp, recipe, calib, decoders, fp32)
            folder, info = built[name]
            candidate = TinySamPredictor(OnnxEngine(folder, stem, precision="int8", device="cpu", threads=threads))
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
        report_path = directory / f"{stem}.int8.quantization.json"
        write_json_atomic(report_path, report)
        publish_int8(directory, stem, built[chosen], chosen, decoder, fp32,
                     {"fidelity_report": report_path.name, "fidelity": report["candidates"][chosen]["fidelity"]})
    log(f"int8 recipe {chosen} written to {directory} (report {report_path.name})")
    return report


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
    log("compiling the int8 encoder (or loading it from the cache) ...")
    int8 = TinySamPredictor(create_engine(model, engine="torch", precision="int8", device="cpu", threads=threads))
    fp32 = TinySamPredictor(create_engine(model, engine="torch", precision="fp32", device="cpu", threads=threads))
    held, source = _held_out(holdout, fp32.img_size)
    if not held:
        raise QuantizationError("no held-out images to measure fidelity on")
    sample = to_model_input(as_rgb(held[0]), fp32.img_size)[0]
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


def report_summary(report: dict) -> str:
    lines = [f"fp32 encoder: {report['fp32_encoder_seconds']:.3f}s"]
    for name, c in report["candidates"].items():
        f = c["fidelity"]
        mark = "*" if name == report["chosen"] else " "
        lines.append(f"{mark} {name:20s} encoder {c['encoder_seconds']:.3f}s ({c['encoder_ratio_vs_fp32']:.2f}×)  "
                     f"cosine min {f['embedding_cosine_min']:.4f}  mask IoU mean {f['mask_iou_mean']:.4f} "
                     f"p05 {f['mask_iou_p05']:.3f}  {'ok' if c['meets_bounds'] else 'below bounds'}")
    return "\n".join(lines)
