"""What every `tinysam` subcommand shares: model flags, the model choice, prompt parsing, files."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="auto",
                        help="registered model name or checkpoint path; 'auto' = official TinySAM, or the bundled "
                             "demo model when the official weights cannot be had (default: auto)")
    parser.add_argument("--engine", default="torch", choices=["torch", "onnx"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for inference")
    add_offline_argument(parser)


def add_offline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="never contact the network for weights ('auto' then uses what is on disk; same as "
                             "TINYSAM_OFFLINE=1)")


def apply_offline(args) -> None:
    if getattr(args, "offline", False):
        os.environ["TINYSAM_OFFLINE"] = "1"


def resolve_model_choice(model: str, log=print) -> str:
    """The model to load for `--model` (see `policy.resolve_model`); a fallback to the demo model is said once."""
    from tinysam_kit.inference.policy import resolve_model
    from tinysam_kit.models.registry import ModelNotAvailableError

    try:
        choice = resolve_model(model)
    except ModelNotAvailableError as exc:
        raise CliError(str(exc)) from exc
    if choice.note:
        log(f"note: {choice.note}", file=sys.stderr)
    return choice.name


def make_predictor(args):
    from tinysam_kit.inference.predictor import TinySamPredictor

    model = resolve_model_choice(args.model)
    return TinySamPredictor.from_pretrained(model, engine=args.engine, precision=args.precision,
                                            device=args.device, threads=args.threads)


def parse_point(text: str) -> tuple[float, float, int]:
    parts = text.split(",")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"point {text!r} must be x,y or x,y,label")
    try:
        x, y = float(parts[0]), float(parts[1])
        label = int(parts[2]) if len(parts) == 3 else 1
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"point {text!r} must be numbers: x,y[,label]") from exc
    return x, y, label


def parse_box(text: str) -> list[float]:
    parts = text.split(",")
    try:
        values = [float(v) for v in parts]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"box {text!r} must be numbers x0,y0,x1,y1") from exc
    if len(values) != 4:
        raise argparse.ArgumentTypeError(f"box {text!r} must be x0,y0,x1,y1")
    return values


def list_images(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CliError(f"{path}: no such file or directory")
    images = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise CliError(f"{path}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images
