"""`tinysam fiftyone ...`: install the App plugin, pre-annotate a folder of images into a FiftyOne dataset.

    tinysam fiftyone install-plugin
    tinysam fiftyone prelabel ./images --dataset my-images            # hierarchical everything mode
    tinysam fiftyone prelabel ./images --dataset my-images --dense --field dense_masks
    tinysam fiftyone prelabel ./images --dataset my-images --polylines --field outlines
    tinysam fiftyone prelabel /shared/images --dataset my-images --ray auto   # on a Ray cluster
"""

from __future__ import annotations

import sys
from pathlib import Path

from tinysam_kit.cli.common import (
    CliError,
    add_model_arguments,
    add_ray_arguments,
    add_workers_argument,
    apply_offline,
    check_ray_arguments,
    list_images,
    resolve_model_choice,
)

PLUGIN_NAME = "@tinysam-kit/tinysam"
PLUGIN_DIR = Path(__file__).resolve().parents[1] / "integrations" / "fiftyone" / "plugin"


def register(subparsers) -> None:
    parser = subparsers.add_parser("fiftyone", help="FiftyOne: App plugin and dataset pre-annotation")
    sub = parser.add_subparsers(dest="fiftyone_command", metavar="COMMAND")
    sub.required = True

    install = sub.add_parser("install-plugin", help=f"link the {PLUGIN_NAME} plugin into FiftyOne's plugins dir")
    install.add_argument("--plugins-dir", help="default: FiftyOne's configured plugins_dir")
    install.add_argument("--copy", action="store_true", help="copy the plugin instead of symlinking it")
    install.add_argument("--force", action="store_true", help="replace an existing install")
    install.set_defaults(func=install_plugin)

    pre = sub.add_parser("prelabel", help="create/update a persistent dataset from a folder and segment it "
                                          "(resumable: re-run to continue)")
    pre.add_argument("image_dir", help="folder of images (searched recursively), an image, or a list file (.txt: "
                                       "one path per line)")
    pre.add_argument("--dataset", required=True, help="FiftyOne dataset name (created if missing)")
    pre.add_argument("--field", default="tinysam",
                     help="output Detections (or, with --polylines, Polylines) field (default: tinysam)")
    pre.add_argument("--polylines", action="store_true",
                     help="write filled, closed Polylines (one per connected part) instead of instance masks")
    pre.add_argument("--dense", action="store_true", help="dense point grid instead of TinySAM's hierarchical mode")
    pre.add_argument("--points-per-side", type=int, help="prompt grid per side (default: the model's own)")
    pre.add_argument("--pred-iou-thresh", type=float, help="default: the model's own (SAM: 0.88)")
    pre.add_argument("--stability-score-thresh", type=float, help="default: the model's own (SAM: 0.95)")
    pre.add_argument("--box-nms-thresh", type=float, help="default: the model's own (SAM: 0.7)")
    pre.add_argument("--min-area", type=int, help="remove holes/islands smaller than this (pixels)")
    pre.add_argument("--max-masks", type=int, help="keep at most this many masks per image")
    pre.add_argument("--max-area-fraction", type=float,
                     help="drop masks covering more than this fraction of the image (default 0.8; 1 keeps all)")
    pre.add_argument("--label", default="object", help="label of every mask")
    pre.add_argument("--instance-map-field", default=None, help="also write a Segmentation of instance ids")
    pre.add_argument("--masks-dir", default=None, help="store masks as PNG files under this folder")
    pre.add_argument("--overwrite", action="store_true", help="recompute samples already done / replace the field")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_workers_argument(pre)
    add_ray_arguments(pre)
    add_model_arguments(pre)
    pre.set_defaults(func=prelabel)


def install_plugin(args) -> int:
    if args.plugins_dir:
        plugins_dir = Path(args.plugins_dir).expanduser()
    else:
        import fiftyone as fo

        if not fo.config.plugins_dir:
            print("error: FiftyOne has no plugins_dir configured; pass --plugins-dir or set FIFTYONE_PLUGINS_DIR",
                  file=sys.stderr)
            return 2
        plugins_dir = Path(fo.config.plugins_dir).expanduser()
    target = plugins_dir / "@tinysam-kit" / "tinysam"
    if target.is_symlink() or target.exists():
        if target.is_symlink() and target.resolve() == PLUGIN_DIR and not args.copy:
            print(f"{PLUGIN_NAME} is already installed at {target}")
            return 0
        if not args.force:
            print(f"error: {target} already exists; pass --force to replace it", file=sys.stderr)
            return 1
        if target.is_symlink() or target.is_file():
            target.unlink()
        else:
            import shutil

            shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if args.copy:
        import shutil

        shutil.copytree(PLUGIN_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "cli.py"))
    else:
        target.symlink_to(PLUGIN_DIR, target_is_directory=True)
    print(f"installed {PLUGIN_NAME} at {target}\n"
          "check with: fiftyone plugins list  (operators appear in the App's operator browser, backtick key)")
    return 0


def prelabel(args) -> int:
    try:
        images = list_images(Path(args.image_dir).expanduser())
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    import fiftyone as fo
    from tqdm import tqdm

    from tinysam_kit.inference.policy import EngineOptions, PolicyError
    from tinysam_kit.integrations.fiftyone.runner import CLI_REMEDY, RunError, RunSpec, run_segmentation

    apply_offline(args)
    try:
        check_ray_arguments(args, batches_need_ray=True)
        resolve_model_choice(args.model)  # says here, once, when `auto` falls back to the demo model
        options = EngineOptions.from_mapping(vars(args))
    except (CliError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if fo.dataset_exists(args.dataset):
        dataset = fo.load_dataset(args.dataset)
        if dataset.media_type not in (None, "image"):
            print(f"error: dataset {args.dataset!r} holds {dataset.media_type} samples", file=sys.stderr)
            return 2
    else:
        dataset = fo.Dataset(args.dataset, persistent=True)
    known = set(dataset.values("filepath")) if len(dataset) else set()
    new = [str(p.resolve()) for p in images if str(p.resolve()) not in known]
    if new:
        dataset.add_samples([fo.Sample(filepath=p) for p in new], progress=False)
    print(f"dataset {dataset.name!r}: {len(dataset)} samples ({len(new)} added from {args.image_dir})")

    everything = {"points_per_side": args.points_per_side, "pred_iou_thresh": args.pred_iou_thresh,
                  "stability_score_thresh": args.stability_score_thresh, "box_nms_thresh": args.box_nms_thresh,
                  "min_mask_region_area": args.min_area, "max_masks": args.max_masks,
                  "max_area_fraction": args.max_area_fraction}
    spec = RunSpec("everything", args.field, options=options, mode="dense" if args.dense else "hierarchical",
                   everything={k: v for k, v in everything.items() if v is not None}, label=args.label,
                   output="polylines" if args.polylines else "detections",
                   instance_map_field=args.instance_map_field, mask_dir=args.masks_dir, overwrite=args.overwrite,
                   ray_address=args.ray, ray_actors=args.ray_actors, batch_size=args.batch_size,
                   workers=args.workers)
    bar = None

    def progress(n: int, total: int, name: str) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, unit="img", desc=f"TinySAM → {args.field}", disable=args.no_progress)
        bar.update(n - bar.n)
        bar.set_postfix_str(name, refresh=False)

    try:
        summary = run_segmentation(dataset, spec, progress=progress, remedy=CLI_REMEDY)
    except (RunError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if bar is not None:
            bar.close()
    print(summary.message())
    if summary.processed:
        print(f"{summary.images_per_minute:.1f} images/minute")
    for err in summary.errors[:20]:  # image errors name their file already
        where = "" if err["filepath"] in err["error"] else f"{err['filepath']}: "
        print(f"  failed: {where}{err['error']}", file=sys.stderr)
    print(f"view it: fiftyone app launch {dataset.name}")
    return 1 if summary.errors else 0
