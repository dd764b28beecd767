"""The `tinysam` command."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# Front ends add their own subcommands through `register(subparsers)`; absent modules are skipped.
EXTENSIONS = (
    "tinysam_kit.cli.runtime",
    "tinysam_kit.cli.fiftyone",
    "tinysam_kit.cli.labelstudio",
    "tinysam_kit.cli.training",
)
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif"}


class CliError(Exception):
    """A user-facing failure: printed as one line, exit code 2."""


# ------------------------------------------------------------------ shared helpers
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


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def overlay(image, masks, alpha: float = 0.5):
    """Image with each mask tinted in its own colour (largest first, so small ones stay visible)."""
    import numpy as np

    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        color = rng.integers(40, 256, size=3).astype(np.float32)
        out[mask] = out[mask] * (1 - alpha) + color * alpha
    return out.clip(0, 255).astype(np.uint8)


# ------------------------------------------------------------------------ commands
def cmd_models_list(args) -> int:
    from tinysam_kit.models.registry import MODELS, PACKAGE_WEIGHTS, cache_dir

    print(f"{'name':<12} {'present':<8} {'file':<20} description")
    for spec in MODELS.values():
        path = (PACKAGE_WEIGHTS if spec.bundled else cache_dir()) / spec.filename
        print(f"{spec.name:<12} {'yes' if path.is_file() else 'no':<8} {spec.filename:<20} {spec.description}")
    print(f"\nweights cache: {cache_dir()} (set TINYSAM_HOME to move it)")
    return 0


def cmd_models_download(args) -> int:
    from tinysam_kit.models.registry import resolve_weights

    for name in args.names:
        path, _ = resolve_weights(name)
        print(f"{name}: {path}")
    return 0


def cmd_segment(args) -> int:
    import numpy as np
    from PIL import Image

    from tinysam_kit.data.images import load_image

    if not args.point and not args.box:
        raise CliError("give at least one --point x,y[,label] or a --box x0,y0,x1,y1")
    image = load_image(args.image)
    predictor = make_predictor(args)
    predictor.set_image(image)
    coords = [[x, y] for x, y, _ in args.point] or None
    labels = [label for _, _, label in args.point] or None
    mask, score, predicted_iou = predictor.segment(coords, labels, args.box)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    answer = {"mask": str(out), "score": score, "predicted_iou": predicted_iou, "area": int(mask.sum()),
              "model_version": predictor.model_version}
    if args.all_masks:
        masks, scores, _ = predictor.predict(coords, labels, args.box)
        for i, each in enumerate(masks):
            path = out.with_name(f"{out.stem}_{i}{out.suffix}")
            Image.fromarray(each.astype(np.uint8) * 255).save(path)
        answer["scores"] = [float(s) for s in scores]
    Image.fromarray(mask.astype(np.uint8) * 255).save(out)
    print(json.dumps(answer))
    return 0


def coco_document(file_name: str, height: int, width: int, records: list[dict], image_id: int = 1,
                  first_annotation_id: int = 1) -> dict:
    annotations = []
    for i, rec in enumerate(records):
        annotations.append({
            "id": first_annotation_id + i, "image_id": image_id, "category_id": 1, "iscrowd": 0,
            "segmentation": rec["segmentation"], "area": rec["area"], "bbox": rec["bbox"],
            "score": rec["predicted_iou"], "predicted_iou": rec["predicted_iou"],
            "stability_score": rec["stability_score"], "point_coords": rec["point_coords"],
        })
    return {
        "images": [{"id": image_id, "file_name": file_name, "height": height, "width": width}],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "object", "supercategory": "object"}],
    }


def cmd_everything(args) -> int:
    from PIL import Image
    from tqdm import tqdm

    from tinysam_kit.data.images import load_image
    from tinysam_kit.inference.batch import run_everything
    from tinysam_kit.inference.encodings.coco import coco_rle_to_mask

    source = Path(args.source)
    images = list_images(source)
    root = source if source.is_dir() else source.parent
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def json_path(p: Path) -> Path:
        rel = p.relative_to(root).with_suffix("")
        return out_dir / (str(rel).replace(os.sep, "__") + ".json")

    todo = [p for p in images if args.overwrite or not json_path(p).is_file()]
    if len(todo) < len(images):
        print(f"{len(images) - len(todo)} image(s) already done in {out_dir}; skipping them (--overwrite to redo)",
              file=sys.stderr)
    failures = []
    if todo:
        from tinysam_kit.inference.policy import everything_params

        predictor = make_predictor(args)
        params = everything_params(predictor.model_name, {
            "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
            "stability_score_thresh": args.stability_score_thresh, "box_nms_thresh": args.box_nms_thresh,
            "min_mask_region_area": args.min_area, "max_masks": args.max_masks,
            "max_area_fraction": args.max_area_fraction, "points_per_batch": args.points_per_batch}, prelabel=True)
        mode = "dense" if args.dense else "hierarchical"
        results = run_everything(predictor, todo, mode=mode, output_mode="coco_rle", **params)
        for res in tqdm(results, total=len(todo), unit="img", desc=f"everything ({mode})"):
            path: Path = res.item
            if res.error is not None:
                failures.append((path, res.error))
                tqdm.write(f"skipped {path}: {res.error}", file=sys.stderr)
                continue
            doc = coco_document(str(path.relative_to(root)), res.height, res.width, res.records)
            doc["info"] = {"model_version": predictor.model_version, "mode": mode, "params": params,
                           "stats": res.stats}
            target = json_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            if not args.no_preview:
                masks = [coco_rle_to_mask(r["segmentation"]) for r in res.records]
                preview = overlay(load_image(path), masks)
                Image.fromarray(preview).save(target.with_name(target.stem + "_overlay.png"))
            # The JSON is written last: its presence marks the image as done for resumed runs.
            write_atomic(target, json.dumps(doc).encode())
    merged = merge_coco([json_path(p) for p in images if json_path(p).is_file()])
    write_atomic(out_dir / "annotations.json", json.dumps(merged).encode())
    print(f"{len(merged['images'])} image(s), {len(merged['annotations'])} mask(s) → {out_dir / 'annotations.json'}")
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for path, err in failures:
            print(f"  {path}: {err}", file=sys.stderr)
        return 1
    return 0


def merge_coco(paths: list[Path]) -> dict:
    merged = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object", "supercategory": "object"}]}
    next_ann = 1
    for image_id, path in enumerate(paths, start=1):
        doc = json.loads(path.read_text())
        merged["images"].append({**doc["images"][0], "id": image_id})
        for ann in doc["annotations"]:
            merged["annotations"].append({**ann, "id": next_ann, "image_id": image_id})
            next_ann += 1
    return merged


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinysam", description="TinySAM for annotation work")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    models = sub.add_parser("models", help="list or download model weights")
    msub = models.add_subparsers(dest="models_command", metavar="ACTION")
    p = msub.add_parser("list", help="registered models and whether their weights are present")
    p.set_defaults(func=cmd_models_list)
    p = msub.add_parser("download", help="download (and verify) model weights into the cache")
    p.add_argument("names", nargs="+", metavar="NAME")
    p.set_defaults(func=cmd_models_download)

    p = sub.add_parser("segment", help="segment one object from point/box prompts")
    p.add_argument("image")
    p.add_argument("--point", action="append", type=parse_point, default=[], metavar="X,Y[,LABEL]",
                   help="prompt point in pixels; label 1 = object (default), 0 = background; repeatable")
    p.add_argument("--box", type=parse_box, metavar="X0,Y0,X1,Y1")
    p.add_argument("--out", required=True, help="PNG file for the best mask")
    p.add_argument("--all-masks", action="store_true", help="also write all three masks as OUT_0/1/2")
    add_model_arguments(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("everything", help="segment everything in an image or a folder (COCO JSON + previews)")
    p.add_argument("source", metavar="IMAGE_OR_DIR")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--dense", action="store_true", help="SAM's dense grid instead of TinySAM's hierarchical mode")
    p.add_argument("--points-per-side", type=int)
    p.add_argument("--points-per-batch", type=int)
    p.add_argument("--pred-iou-thresh", type=float)
    p.add_argument("--stability-score-thresh", type=float)
    p.add_argument("--box-nms-thresh", type=float)
    p.add_argument("--min-area", type=int, help="remove holes/islands smaller than this many pixels")
    p.add_argument("--max-masks", type=int, help="keep at most this many masks per image (best first)")
    p.add_argument("--max-area-fraction", type=float,
                   help="drop masks covering more than this fraction of the image (default 0.8; 1 keeps all)")
    p.add_argument("--overwrite", action="store_true", help="redo images that already have results")
    p.add_argument("--no-preview", action="store_true", help="skip the overlay PNGs")
    add_model_arguments(p)
    p.set_defaults(func=cmd_everything)

    for module_name in EXTENSIONS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tinysam_kit.data.images import ImageError
    from tinysam_kit.inference.predictor import PromptError
    from tinysam_kit.models.checkpoint import CheckpointError
    from tinysam_kit.models.registry import ChecksumError, ModelNotAvailableError
    from tinysam_kit.runtime.base import EngineUnavailableError

    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    apply_offline(args)
    try:
        return int(args.func(args) or 0)
    except (CliError, ModelNotAvailableError, ChecksumError, CheckpointError, ImageError, PromptError,
            EngineUnavailableError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished images are kept and a re-run resumes", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
