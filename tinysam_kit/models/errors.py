"""Errors of loading model files."""

from __future__ import annotations


class CheckpointError(ValueError):
    """The file is not a usable TinySAM-family checkpoint; the message says why."""
