"""`tinysam serve-ls` and `tinysam ls-prelabel`."""

from __future__ import annotations

import argparse


def _model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (defaults from TINYSAM_* environment variables)")
    group.add_argument("--model", help="registered model name or checkpoint path (TINYSAM_MODEL, default tinysam)")
    group.add_argument("--engine", choices=["torch", "onnx"], help="TINYSAM_ENGINE (default torch)")
    group.add_argument("--precision", choices=["fp32", "fp16", "bf16", "int8"], help="TINYSAM_PRECISION")
    group.add_argument("--device", help="auto, cpu, cuda or cuda:N (TINYSAM_DEVICE)")
    group.add_argument("--threads", type=int, help="CPU threads for the model (TINYSAM_THREADS)")


def _settings(args, **extra):
    from tinysam_kit.integrations.labelstudio.settings import BackendSettings

    return BackendSettings.from_env(model=args.model, engine=args.engine, precision=args.precision,
                                    device=args.device, threads=args.threads, **extra)


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
    serve.set_defaults(func=serve_ls)

    pre = subparsers.add_parser(
        "ls-prelabel", help="pre-label every task of a Label Studio project (resumable)",
        description="Run everything-mode on each task of a project and push the brush regions as predictions. "
                    "Tasks that already have a prediction of the same model_version are skipped, so an "
                    "interrupted run resumes when started again.")
    pre.add_argument("--project", type=int, required=True, help="Label Studio project id")
    pre.add_argument("--url", help="Label Studio URL (default LABEL_STUDIO_URL)")
    pre.add_argument("--api-key", help="personal access token or legacy token (default LABEL_STUDIO_API_KEY)")
    pre.add_argument("--page-size", type=int, default=50)
    pre.add_argument("--limit", type=int, help="stop after this many tasks")
    pre.add_argument("--max-regions", type=int, help="regions per task (TINYSAM_MAX_REGIONS, default 20)")
    pre.add_argument("--min-area", type=int, help="smallest region in pixels (TINYSAM_MIN_REGION_AREA)")
    pre.add_argument("--label", help="brush label for the regions (TINYSAM_BATCH_LABEL; default the first)")
    pre.add_argument("--no-progress", action="store_true", help="no progress bar")
    _model_args(pre)
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
    from tinysam_kit.integrations.labelstudio.prelabel import LabelStudioAPIError, LabelStudioClient, prelabel_project
    from tinysam_kit.integrations.labelstudio.settings import SettingsError

    try:
        settings = _settings(args, label_studio_url=args.url, label_studio_api_key=args.api_key,
                             max_regions=args.max_regions, min_region_area=args.min_area, batch_label=args.label)
        client = LabelStudioClient(settings.label_studio_url, settings.label_studio_api_key)
        backend = TinySamBackend(settings)
    except (SettingsError, LabelStudioAPIError, ValueError, RuntimeError, OSError) as exc:
        print(f"tinysam ls-prelabel: {exc}", file=sys.stderr)
        return 2
    try:
        stats = prelabel_project(backend, client, args.project, page_size=args.page_size, limit=args.limit,
                                 progress=not args.no_progress)
    except LabelStudioAPIError as exc:
        print(f"tinysam ls-prelabel: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    finally:
        backend.close()
        client.close()
    print(f"project {args.project}: {stats.predicted} predicted, {stats.skipped} already done, "
          f"{stats.failed} failed, {stats.regions} regions in {stats.seconds:.1f} s")
    for line in stats.errors[:20]:
        print(f"  {line}", file=sys.stderr)
    return 1 if stats.failed else 0
