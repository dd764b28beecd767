"""`tinysam export` and `tinysam quantize`."""

from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="export encoder and decoder to ONNX (checked against PyTorch; cached next to the weights)")
    p.add_argument("--model", default="auto", help="registered model name or checkpoint path (default: auto)")
    p.add_argument("--out", help="output directory (default: next to the weights, or the cache if read-only)")
    p.add_argument("--force", action="store_true", help="export again even if an up-to-date export exists")
    p.set_defaults(func=cmd_export)

    q = subparsers.add_parser(
        "quantize", help="int8 post-training quantization with a fidelity report: of the ONNX export (recipe "
                         "chosen by measured fidelity), or the PyTorch engine's compiled int8 encoder")
    q.add_argument("--model", default="auto", help="registered model name or checkpoint path (default: auto)")
    q.add_argument("--engine", choices=("onnx", "torch"), default="onnx",
                   help="onnx (default): int8 ONNX files calibrated on --calibration; torch: compile (or load) the "
                        "PyTorch engine's int8 encoder, calibrated on built-in synthetic scenes, and report its "
                        "fidelity next to the compiled package (x86 CPUs with VNNI/AMX)")
    q.add_argument("--calibration", help="directory of calibration images, searched recursively (onnx: required)")
    q.add_argument("--holdout", help="directory of held-out images for the fidelity report (default: the last "
                                     "quarter of the calibration images, then not used for calibrating; "
                                     "torch: synthetic scenes calibration never sees)")
    q.add_argument("--recipes", default="all",
                   help="comma-separated recipes to compare: dynamic, dynamic_pc, static_qdq, static_qdq_guarded "
                        "(default: all)")
    q.add_argument("--prompts-per-image", type=int, default=32, help="random point prompts per held-out image")
    q.add_argument("--decoder-int8", choices=("fp32", "upscale", "all"), default="upscale",
                   help="per-prompt decoder products made int8: none (fp32), the first upscaling product "
                        "(upscale, default) or every weight MatMul (all: faster clicks, lower mask fidelity)")
    q.add_argument("--threads", type=int, default=None, help="CPU threads for the timing and fidelity runs")
    q.add_argument("--out", help="directory of the fp32 export (default: next to the weights)")
    q.set_defaults(func=cmd_quantize)


def _model(args) -> str:
    from tinysam_kit.cli.common import resolve_model_choice

    return resolve_model_choice(args.model)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 2


def cmd_export(args: argparse.Namespace) -> int:
    from tinysam_kit.runtime.export import ExportError, ensure_export

    try:
        directory, stem, manifest = ensure_export(_model(args), directory=args.out, force=args.force, log=print)
    except ExportError as exc:
        return _fail(exc)
    diffs = manifest["parity_vs_torch"]["max_abs_diff"]
    print(f"{directory}/{stem}.fp32.{{encoder,decoder_image,decoder_prompt}}.onnx  opset {manifest['opset']}  "
          f"max |Δ| vs torch: embedding {diffs['embedding']:.2g}, logits {diffs['logits_nomask']:.2g}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from tinysam_kit.evaluation.quantization import quantize_model, report_summary
    from tinysam_kit.runtime.export import ExportError, ensure_export
    from tinysam_kit.runtime.quantize import QuantizationError

    if args.engine == "torch":
        return _quantize_torch(args)
    if args.calibration is None:
        return _fail(ValueError("--calibration DIR is required with --engine onnx (images like yours to "
                                "calibrate the int8 activations on)"))
    recipes = None if args.recipes == "all" else [r.strip() for r in args.recipes.split(",") if r.strip()]
    try:
        directory, stem, _ = ensure_export(_model(args), directory=args.out, log=print)
        report = quantize_model(directory, stem, calibration=args.calibration, holdout=args.holdout,
                                recipes=recipes, threads=args.threads, prompts_per_image=args.prompts_per_image,
                                decoder=args.decoder_int8)
    except (ExportError, QuantizationError) as exc:
        return _fail(exc)
    print(report_summary(report))
    if not report["chosen_meets_bounds"]:
        print("warning: no recipe met the fidelity bounds; the closest one was written", file=sys.stderr)
    return 0


def _quantize_torch(args: argparse.Namespace) -> int:
    from tinysam_kit.evaluation.quantization import torch_int8_report, torch_int8_summary
    from tinysam_kit.runtime.quantize import QuantizationError

    if args.calibration is not None:
        return _fail(ValueError("--engine torch calibrates on its built-in synthetic scenes; --calibration is for "
                                "--engine onnx (use --holdout to measure fidelity on your images)"))
    try:
        report = torch_int8_report(_model(args), holdout=args.holdout, threads=args.threads,
                                   prompts_per_image=args.prompts_per_image)
    except QuantizationError as exc:
        return _fail(exc)
    print(torch_int8_summary(report))
    if not report["meets_bounds"]:
        print("warning: the int8 encoder is below the fidelity bounds on these images; prefer engine='onnx' "
              "precision='int8' or fp32 where masks must match fp32 closely", file=sys.stderr)
    return 0
