"""What every `tinysam` subcommand shares: model flags, the model choice, prompt parsing, files."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from tinysam_kit.data.images import IMAGE_SUFFIXES, LIST_SUFFIXES, find_images
from tinysam_kit.data.object_store import ObjectStoreError, is_url, list_objects


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


def add_ray_arguments(parser: argparse.ArgumentParser, what: str = "everything mode") -> None:
    """--ray ADDRESS, --ray-actors N and --batch-size N: the same words on every dataset-wide command."""
    parser.add_argument("--ray", metavar="ADDRESS",
                        help=f"run {what} on a Ray cluster: 'auto' (the cluster Ray finds) or HOST:PORT; images "
                             "must be readable by every node; needs the ray extra (pip install 'tinysam-kit[ray]')")
    parser.add_argument("--ray-actors", type=int, metavar="N",
                        help="with --ray: grow the model-actor pool up to N as an autoscaling cluster adds nodes "
                             "(default: as many as the cluster holds now: one per GPU, else one per --threads CPUs)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="images per encoder call (GPUs: 8–32; on CPU 1 is as fast)")


def _workers_value(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"--workers must be a positive integer or 'auto', got {text!r}")
    return value


def add_workers_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workers", type=_workers_value, default="auto", metavar="N|auto",
                        help="model processes on this machine sharing the images, each with --threads threads "
                             "(default: cores / N); 'auto' (default): one per core on CPU but not more than one "
                             "per 8 images (start-up) or per GiB of free memory, 1 on a GPU")


def choose_workers(args, images: int) -> int:
    """`--workers`: the number given, or `auto_workers`' choice for this device and folder."""
    from tinysam_kit.inference.batch import resolve_workers
    from tinysam_kit.models.device import EngineUnavailableError, resolve_device

    try:
        device = resolve_device(args.device).type
    except EngineUnavailableError:
        return 1  # the in-process path reports it
    return resolve_workers(args.workers, images, device=device, threads=args.threads)


def check_ray_arguments(args, batches_need_ray: bool = False) -> None:
    """Refuse inconsistent Ray options before anything loads; `batches_need_ray`: the command encodes one image
    per call in its own process, so --batch-size applies to --ray runs only."""
    if batches_need_ray and args.batch_size != 1 and not args.ray:
        raise CliError("--batch-size applies to --ray runs (this command encodes one image per call in its own "
                       "process)")
    if args.batch_size < 1:
        raise CliError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.ray_actors is not None and args.ray_actors < 1:
        raise CliError(f"--ray-actors must be at least 1, got {args.ray_actors}")
    if args.ray_actors is not None and not args.ray:
        raise CliError("--ray-actors needs --ray")
    if args.ray and getattr(args, "workers", "auto") != "auto":
        raise CliError("--workers sets processes on this machine; on a Ray cluster --ray-actors sizes the pool")


def add_offline_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--offline", action="store_true",
                        help="never contact the network for weights ('auto' then uses what is on disk; same as "
                             "TINYSAM_OFFLINE=1)")


def apply_offline(args) -> None:
    if getattr(args, "offline", False):
        os.environ["TINYSAM_OFFLINE"] = "1"


def resolve_model_choice(model: str, log=print) -> str:
    """The model to load for `--model` (see `policy.resolve_model`); a fallback to the demo model is said once."""
    from tinysam_kit.inference.policy import announce, resolve_model
    from tinysam_kit.models.registry import ModelNotAvailableError

    try:
        choice = resolve_model(model)
    except ModelNotAvailableError as exc:
        raise CliError(str(exc)) from exc
    announce(choice, lambda note: log(f"note: {note}", file=sys.stderr))
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
    """The images a command's source names: one image file, a folder (searched recursively), or a list file
    (`.txt`/`.lst`: one path per line, relative to the list's folder or absolute; blank lines and `#` comments
    skipped). Listed files that are missing stay in the list: the run reports them as failures."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
        return read_image_list(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CliError(f"{path}: no such file or directory")
    images = find_images(path)
    if not images:
        raise CliError(f"{path}: no images found ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return images


def read_image_list(path: Path) -> list[Path]:
    base = path.resolve().parent
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{path}: cannot read the image list: {exc}") from exc
    images: dict[Path, None] = {}  # in order, each once
    for line in lines:
        line = line.strip()
        if line and not line.startswith("#"):
            images[(base / Path(line).expanduser()).resolve()] = None
    if not images:
        raise CliError(f"{path}: the list names no images (one path per line)")
    return list(images)


def images_root(source: Path, images: list[Path]) -> Path:
    """The folder output names are relative to: the source folder, a single image's folder, or the deepest
    folder holding every image of a list."""
    source = Path(source)
    if source.is_dir():
        return source
    if images == [source]:
        return source.parent
    return Path(os.path.commonpath([str(Path(p).resolve().parent) for p in images]))


def source_images(source: str | Path, storage_options: dict | None = None) -> tuple[list, Path | str]:
    """(images, root) for a command's source: `list_images` and `images_root` for a local path; for an
    object-storage URL (`s3://bucket/prefix/`, ...) the same choices over objects: image URLs and the root URL
    their output names are relative to."""
    if is_url(source):
        try:
            return list_objects(source, storage_options)
        except ObjectStoreError as exc:
            raise CliError(str(exc)) from exc
    images = list_images(Path(source))
    return images, images_root(Path(source), images)


def add_storage_option_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="with an object-storage URL as source: an fsspec storage option, e.g. "
                             "endpoint_url=http://minio:9000 or anon=true (values are JSON where they parse, "
                             "else text; a.b=1 sets {'a': {'b': 1}}); repeatable. Default: the filesystem's own "
                             "configuration (AWS_* environment variables, ~/.aws)")


def storage_options(pairs: list[str]) -> dict:
    """`--storage-option KEY=VALUE` flags as fsspec storage options."""
    options: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise CliError(f"--storage-option needs KEY=VALUE, got {pair!r}")
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        *parents, last = key.strip().split(".")
        target = options
        for name in parents:
            target = target.setdefault(name, {})
            if not isinstance(target, dict):
                raise CliError(f"--storage-option {pair!r}: {name} is already set to a value")
        target[last] = value
    return options
