"""tinysam-kit: TinySAM for annotation teams (FiftyOne, Label Studio, CLI)."""

from __future__ import annotations

__version__ = "0.1.0"

from .models.registry import MODELS, load_model  # noqa: E402
from .operators.predictor import TinySamPredictor  # noqa: E402
from .runtime import create_engine  # noqa: E402

__all__ = ["MODELS", "TinySamPredictor", "__version__", "create_engine", "load_model"]
