"""tinysam-kit: TinySAM for annotation teams (FiftyOne, Label Studio, CLI).

    from tinysam_kit import TinySamPredictor, generate_everything

    predictor = TinySamPredictor.from_pretrained("auto")
    predictor.set_image("photo.jpg")
    mask, score, _ = predictor.segment(point_coords=[[250, 180]], point_labels=[1])
    records = generate_everything(predictor, "photo.jpg")
"""

from __future__ import annotations

from tinysam_kit.data.images import ImageError
from tinysam_kit.inference.everything import generate_everything
from tinysam_kit.inference.policy import EngineOptions, resolve_model
from tinysam_kit.inference.predictor import PromptError, TinySamPredictor
from tinysam_kit.models.registry import MODELS, load_model
from tinysam_kit.version import __version__


def list_models() -> list[str]:
    """Names of the registered models (any checkpoint path works too)."""
    return sorted(MODELS)


__all__ = ["EngineOptions", "ImageError", "PromptError", "TinySamPredictor", "__version__", "generate_everything",
           "list_models", "load_model", "resolve_model"]
