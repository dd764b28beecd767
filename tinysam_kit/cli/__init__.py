"""The `tinysam` command: one parser, each group of subcommands in its own module."""

from __future__ import annotations

import argparse
import importlib
import sys

from tinysam_kit.cli.common import CliError, apply_offline

# Each module adds its subcommands through `register(subparsers)`.
COMMANDS = (
    "tinysam_kit.cli.core",
    "tinysam_kit.cli.everything",
    "tinysam_kit.cli.runtime",
    "tinysam_kit.cli.fiftyone",
    "tinysam_kit.cli.labelstudio",
    "tinysam_kit.cli.training",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tinysam", description="TinySAM for annotation work")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMANDS:
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
    from tinysam_kit.inference.policy import PolicyError
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
            EngineUnavailableError, PolicyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; finished images are kept and a re-run resumes", file=sys.stderr)
        return 130


__all__ = ["CliError", "build_parser", "main"]
