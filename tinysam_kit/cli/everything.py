"""`tinysam everything`: segment everything in a folder into COCO JSON files (resumable)."""

from __future__ import annotations

import sys
from pathlib import Path

from tinysam_kit.cli.common import (
    CliError,
    add_model_arguments,
    add_ray_arguments,
    add_storage_option_argument,
    add_workers_argument,
    check_ray_arguments,
    choose_workers,
    make_predictor,
    resolve_model_choice,
    source_images,
    storage_options,
)
from tinysam_kit.data.object_store import is_url


def register(sub) -> None:
    p = sub.add_parser("everything", help="segment everything in an image or a folder (COCO JSON + previews)")
    p.add_argument("source", metavar="IMAGE_OR_DIR",
                   help="an image, a folder (searched recursively) or a list file (.txt: one path per line); "
                        "or the same in object storage: s3://bucket/prefix/ (pip install 'tinysam-kit[cloud]') or any "
                        "URL an installed fsspec filesystem reads")
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
    p.add_argument("--polygons", action="store_true",
                   help="COCO polygon segmentations (one per connected part, holes filled) instead of RLE")
    p.add_argument("--polygon-tolerance", type=float, default=None, metavar="PX",
                   help="with --polygons: simplification tolerance in pixels (default 0.5)")
    add_storage_option_argument(p)
    add_workers_argument(p)
    add_ray_arguments(p)
    add_model_arguments(p)
    p.set_defaults(func=cmd_everything)


def polygon_tolerance(args) -> float | None:
    """None for RLE output; the tolerance in pixels with --polygons."""
    from tinysam_kit.inference.encodings.polygons import DEFAULT_TOLERANCE

    if args.polygon_tolerance is not None and not args.polygons:
        raise CliError("--polygon-tolerance needs --polygons")
    if not args.polygons:
        return None
    tolerance = DEFAULT_TOLERANCE if args.polygon_tolerance is None else args.polygon_tolerance
    if not tolerance >= 0:
        raise CliError(f"--polygon-tolerance must be >= 0 pixels, got {args.polygon_tolerance}")
    return tolerance


def cmd_everything(args) -> int:
    polygon_tolerance(args)  # bad flags fail before any model is loaded
    check_ray_arguments(args)
    from tqdm import tqdm

    from tinysam_kit.data.images import load_image
    from tinysam_kit.data.object_store import ObjectLoader
    from tinysam_kit.inference.batch import CocoFolderSink, coco_key, run_everything
    from tinysam_kit.inference.policy import everything_params

    options = storage_options(args.storage_option)
    if options and not is_url(args.source):
        raise CliError("--storage-option applies to an object-storage source (s3://..., gs://...)")
    images, root = source_images(args.source, options)
    load = ObjectLoader(options) if is_url(args.source) else load_image  # both pickle: workers and Ray get it
    keys = [coco_key(p, root) for p in images]
    out_dir = Path(args.out)
    mode = "dense" if args.dense else "hierarchical"
    explicit = {
        "points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
        "stability_score_thresh": args.stability_score_thresh, "box_nms_thresh": args.box_nms_thresh,
        "min_mask_region_area": args.min_area, "max_masks": args.max_masks,
        "max_area_fraction": args.max_area_fraction, "points_per_batch": args.points_per_batch}
    if args.ray:
        return _everything_on_ray(args, images, keys, root, out_dir, mode, explicit, load)
    sink = None
    done: set[str] = set()
    failures = []
    if not args.overwrite and out_dir.is_dir():
        done = CocoFolderSink(out_dir, root).done_keys()
    todo = [(k, p) for k, p in zip(keys, images) if k not in done]
    if len(todo) < len(images):
        print(f"{len(images) - len(todo)} image(s) already done in {out_dir}; skipping them (--overwrite to redo)",
              file=sys.stderr)
    workers = choose_workers(args, len(todo))
    if workers > 1:
        sink, failures = _everything_in_workers(args, workers, todo, keys, root, out_dir, mode, explicit, load)
    elif todo:
        predictor = make_predictor(args)
        params = everything_params(predictor.model_name, explicit, prelabel=True)
        # Writes stay in this thread: a background writer competes with PyTorch's threads for the same cores
        # (measured 25% slower with 2 threads on 2 cores).
        sink = CocoFolderSink(out_dir, root, info={"mode": mode, "params": params}, previews=not args.no_preview,
                              order=keys, polygon_tolerance=polygon_tolerance(args), load=load)
        key_of = {p: k for k, p in todo}
        results = run_everything(predictor, [p for _, p in todo], mode=mode, output_mode="coco_rle",
                                 batch_size=args.batch_size, load=load, **params)
        for res in tqdm(results, total=len(todo), unit="img", desc=f"everything ({mode})"):
            if res.error is not None:
                failures.append((res.item, res.error))
                tqdm.write(f"skipped {res.item}: {res.error}", file=sys.stderr)
                continue
            sink.write(key_of[res.item], res)
    merged = (sink or CocoFolderSink(out_dir, root, order=keys)).close()
    return _report(merged, out_dir, failures)


def _everything_in_workers(args, workers: int, todo: list, keys: list, root: Path | str, out_dir: Path, mode: str,
                           explicit: dict, load):
    """The single-process run's files, written by `workers` model processes (one thread each unless --threads)."""
    from tqdm import tqdm

    from tinysam_kit.inference.batch import CocoFolderSink, WorkerError, run_everything_workers, worker_threads
    from tinysam_kit.inference.policy import EngineOptions, PolicyError, everything_params
    from tinysam_kit.models.registry import model_name_of

    model = resolve_model_choice(args.model)
    threads = worker_threads(args.threads, workers)
    try:
        options = EngineOptions(model, args.engine, args.precision, args.device, threads)
    except PolicyError as exc:
        raise CliError(str(exc)) from exc
    params = everything_params(model_name_of(model), explicit, prelabel=True)
    sink = CocoFolderSink(out_dir, root, info={"mode": mode, "params": params}, previews=not args.no_preview,
                          order=keys, polygon_tolerance=polygon_tolerance(args), load=load)
    failures, masks = [], 0
    outcomes = run_everything_workers(options, todo, sink, workers=workers, mode=mode, output_mode="coco_rle",
                                      batch_size=args.batch_size, load=load, **params)
    bar = tqdm(total=len(todo), unit="img", desc=f"everything ({mode}, {workers} workers × {threads} thread(s))")
    try:
        for outcome in outcomes:
            bar.update()
            if outcome.error is not None:
                failures.append((outcome.index, outcome.item, outcome.error))
                tqdm.write(f"skipped {outcome.item}: {outcome.error}", file=sys.stderr)
            else:
                masks += outcome.masks
            bar.set_postfix(masks=masks, failed=len(failures), refresh=False)
    except WorkerError as exc:
        print(f"a worker process failed; {bar.n} image(s) were finished and are kept (a re-run resumes)",
              file=sys.stderr)
        if exc.__cause__ is not None:
            raise exc.__cause__ from None  # the error one process would have raised (a bad model, a full disk)
        raise CliError(str(exc).strip().splitlines()[-1]) from exc
    finally:
        bar.close()
    return sink, [(item, error) for _, item, error in sorted(failures, key=lambda f: f[0])]


def _report(merged: dict, out_dir: Path, failures: list) -> int:
    print(f"{len(merged['images'])} image(s), {len(merged['annotations'])} mask(s) → {out_dir / 'annotations.json'}")
    if failures:
        print(f"{len(failures)} image(s) failed:", file=sys.stderr)
        for path, err in failures:
            print(f"  {path}: {err}", file=sys.stderr)
        return 1
    return 0


def _everything_on_ray(args, images, keys, root: Path | str, out_dir: Path, mode: str, explicit: dict,
                       load) -> int:
    """The same files as the single-process run, computed by model actors on a Ray cluster."""
    from tinysam_kit.inference.batch import CocoFolderSink
    from tinysam_kit.inference.policy import EngineOptions, everything_params
    from tinysam_kit.integrations.ray import RayRunError, RayUnavailableError, run_everything_on_ray
    from tinysam_kit.models.registry import model_name_of

    model = resolve_model_choice(args.model)
    options = EngineOptions(model, args.engine, args.precision, args.device, args.threads)
    params = everything_params(model_name_of(model), explicit, prelabel=True)
    if not is_url(root):  # nodes read absolute paths; object URLs are the same everywhere
        root, images = root.resolve(), [str(p.resolve()) for p in images]
    sink = CocoFolderSink(out_dir, root, info={"mode": mode, "params": params}, previews=not args.no_preview,
                          order=keys, polygon_tolerance=polygon_tolerance(args), load=load)
    try:
        summary = run_everything_on_ray(dict(zip(keys, images)), sink, address=args.ray, options=options,
                                        mode=mode, params=params, batch_size=args.batch_size,
                                        max_actors=args.ray_actors, overwrite=args.overwrite,
                                        output_mode="coco_rle", load=load)
    except (RayUnavailableError, RayRunError) as exc:
        raise CliError(str(exc)) from exc
    print(summary.describe(), file=sys.stderr)
    merged = sink.close()
    return _report(merged, out_dir, [(f.source, f.reason) for f in summary.failures])
