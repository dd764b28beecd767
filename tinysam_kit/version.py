"""The package version, from the installed distribution (one source: pyproject.toml)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("tinysam-kit")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
