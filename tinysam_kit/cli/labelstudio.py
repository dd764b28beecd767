"""`tinysam serve-ls` and `tinysam ls-prelabel`."""

from __future__ import annotations

import argparse

from tinysam_kit.cli.common import (
    CliError,
    add_offline_argument,
    add_ray_arguments,
    add_workers_argument,
    apply_offline,
    check_ray_arguments,
)
from tinysam_kit.inference.policy import ENGINES, MAX_AREA_FRACTION, PRECISIONS, announce
from tinysam_kit.integrations.labelstudio.settings import BackendSettings


def _model_args(parser: argparse.ArgumentParser) -> None:
    # No defaults here: unset flags leave the TINYSAM_* variables (and then policy.EngineOptions) in charge.
    group = parser.add_argument_group("model (defaults from TINYSAM_* environment variables)")
    group.add_argument("--model", help="registered model name or checkpoint path; 'auto' (default) = official "
                                       "TinySAM (TINYSAM_MODEL names another), or the bundled demo model when its "
                                       "weights cannot be had, with a note saying why")
    group.add_argument("--engine", choices=ENGINES, help="TINYSAM_ENGINE (default torch)")
    group.add_argument("--precision", choices=PRECISIONS, help="TINYSAM_PRECISION (default fp32)")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (TINYSAM_DEVICE)")
    group.add_argument("--threads", type=int, help="CPU threads for the model (TINYSAM_THREADS)")
    add_offline_argument(group)


def _batch_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("batch pre-labelling (unset: the model's own everything-mode values)")
    group.add_argument("--max-regions", type=int,
                       help=f"regions per task (TINYSAM_MAX_REGIONS, default {BackendSettings.max_regions})")
    group.add_argument("--min-area", type=int, help="smallest region in pixels (TINYSAM_MIN_REGION_AREA, default "
                                                    f"{BackendSettings.min_region_area})")
    group.add_argument("--label", help="label of the regions (TINYSAM_BATCH_LABEL; default the first label of the "
                                       "brush or polygon control)")
    group.add_argument("--points-per-side", type=int, help="prompt grid (TINYSAM_POINTS_PER_SIDE)")
    group.add_argument("--pred-iou-thresh", type=float, help="TINYSAM_PRED_IOU_THRESH")
    group.add_argument("--stability-thresh", type=float, help="TINYSAM_STABILITY_THRESH")
    group.add_argument("--max-area-fraction", type=float,
                       help="drop masks covering more of the image than this (TINYSAM_MAX_AREA_FRACTION, default "
                            f"{MAX_AREA_FRACTION:g}; 1 keeps all)")


def _settings(args, **extra):
    apply_offline(args)
    return BackendSettings.from_env(
        model=args.model, engine=args.engine, precision=args.precision, device=args.device, threads=args.threads,
        max_regions=args.max_regions, min_region_area=args.min_area, batch_label=args.label,
        points_per_side=args.points_per_side, pred_iou_thresh=args.pred_iou_thresh,
        stability_score_thresh=args.stability_thresh, max_area_fraction=args.max_area_fraction, **extra)


def register(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve-ls", help="run the Label Studio ML backend (smart clicks + batch pre-labelling)",
        description="Serve Label Studio's ML-backend protocol. Configuration comes from LABEL_STUDIO_URL, "
                    "LABEL_STUDIO_API_KEY, BASIC_AUTH_USER/BASIC_AUTH_PASS, TINYSAM_ALLOWED_HOSTS and TINYSAM_* "
                    "variables; see docs/labelstudio.md.")
    serve.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 in containers)")
    serve.add_argument("--port", type=int, default=9090)
    serve.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    _model_args(serve)
    _batch_args(serve)
    serve.set_defaults(func=serve_ls)

    pre = subparsers.add_parser(
        "ls-prelabel", help="pre-label every task of a Label Studio project, or only pre-encode its images (resumable)",
        description="Run everything-mode on each task of a project and push the regions (brush masks or polygons) "
                    "as predictions. Tasks that already have a non-empty prediction of the same model_version "
                    "(model and settings) are skipped, so an interrupted run resumes when started again. Everything "
                    "mode runs in --workers model processes on this machine (or on a Ray cluster with --ray); this "
                    "process alone talks to Label Studio, pushing each prediction as it arrives. With "
                    "--embeddings-only, only encode the images into the embedding store the backend reads (images "
                    "stored already are skipped), so the first click on each task is as fast as the later ones.")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--url", help="Label Studio URL (default LABEL_STUDIO_URL)")
    pre.add_argument("--api-key", help="personal access token or legacy token (default LABEL_STUDIO_API_KEY)")
    pre.add_argument("--page-size", type=int, default=50)
    pre.add_argument("--limit", type=int, help="stop after this many tasks")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    pre.add_argument("--embeddings-only", action="store_true",
                     help="only encode the tasks' images into the embedding store (TINYSAM_EMBEDDING_STORE), so "
                          "the first click on each task is fast; predicts nothing; skips images stored already; "
                          "encodes in this process (--workers auto is ignored, a number above 1 refused)")
    add_ray_arguments(pre, "everything mode (task images are downloaded by the nodes)")
    add_workers_argument(pre)
    _model_args(pre)
    _batch_args(pre)
    pre.set_defaults(func=ls_prelabel)


def serve_ls(args) -> int:
    import logging
    import sys

    import uvicorn

    from tinysam_kit.integrations.labelstudio.app import create_app
    from tinysam_kit.integrations.labelstudio.settings import SettingsError

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = _settings(args)
        app = create_app(settings)
    except (SettingsError, ValueError, RuntimeError, OSError) as exc:
        print(f"tinysam serve-ls: {exc}", file=sys.stderr)
        return 2
    # One worker process: the model is loaded once and shared by every request of this process.
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, workers=1)
    return 0


def ls_prelabel(args) -> int:
    import sys

    from tinysam_kit.integrations.labelstudio.backend import TinySamBackend
    from tinysam_kit.integrations.labelstudio.prelabel import (
        LabelStudioAPIError,
        LabelStudioClient,
        prelabel_project,
        warm_embeddings,
    )
    from tinysam_kit.integrations.labelstudio.settings import SettingsError

    try:
        check_ray_arguments(args, batches_need_ray=True)
        if args.ray and args.embeddings_only:
            raise CliError("--embeddings-only fills this machine's embedding store; it does not run on --ray")
        if args.embeddings_only and args.workers not in ("auto", 1):
            raise CliError("--embeddings-only encodes in this process, into the store the backend reads; "
                           "--workers applies to pre-labelling")
        settings = _settings(args, label_studio_url=args.url, label_studio_api_key=args.api_key)
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        # said here first, so the command's own "note:" line is the one the user sees (once)
        announce(settings.engine_options().resolved()[1], lambda note: print(f"note: {note}", file=sys.stderr))
        backend = TinySamBackend(settings)
    except (CliError, SettingsError, LabelStudioAPIError, ValueError, RuntimeError, OSError) as exc:
        print(f"tinysam ls-prelabel: {exc}", file=sys.stderr)
        return 2
    print(f"model_version {backend.model_version}", file=sys.stderr)
    try:
        if args.embeddings_only:
            warm = warm_embeddings(backend, client, args.project, page_size=args.page_size, limit=args.limit,
                                   progress=not args.no_progress)
        else:
            stats = prelabel_project(backend, client, args.project, page_size=args.page_size, limit=args.limit,
                                     progress=not args.no_progress, ray_address=args.ray,
                                     ray_actors=args.ray_actors, batch_size=args.batch_size,
                                     workers=args.workers)
    except LabelStudioAPIError as exc:
        print(f"tinysam ls-prelabel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        backend.close()
        client.close()
    if args.embeddings_only:
        print(f"project {args.project}: {warm.tasks} tasks, {warm.encoded} images encoded, {warm.stored} already "
              f"stored, {warm.failed} failed in {warm.seconds:.1f} s (store {backend.predictor.store.root})")
        errors, failed = warm.errors, warm.failed
    else:
        print(f"project {args.project}: {stats.predicted} predicted, {stats.empty} with no region (not pushed), "
              f"{stats.skipped} already done, {stats.failed} failed, {stats.regions} regions in {stats.seconds:.1f} s"
              + (f", {stats.workers} model processes" if stats.workers > 1 else ""))
        errors, failed = stats.errors, stats.failed
        if stats.cluster:
            print(stats.cluster, file=sys.stderr)
    for line in errors[:20]:
        print(f"  {line}", file=sys.stderr)
    return 1 if failed else 0
