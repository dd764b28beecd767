"""`tinysam everything`: segment everything in a folder into COCO JSON files (resumable)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tinysam_kit.cli.common import add_model_arguments, list_images, make_predictor, write_atomic


def register(sub) -> None:
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


def overlay(image, masks, alpha: float = 0.5):
    """Image with each mask tinted in its own colour (largest first, so small ones stay visible)."""
    import numpy as np

    out = image.astype(np.float32).copy()
    rng = np.random.default_rng(0)
    for mask in sorted(masks, key=lambda m: -int(m.sum())):
        color = rng.integers(40, 256, size=3).astype(np.float32)
        out[mask] = out[mask] * (1 - alpha) + color * alpha
    return out.clip(0, 255).astype(np.uint8)


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
