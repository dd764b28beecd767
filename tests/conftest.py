from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("TINYSAM_TEST_THREADS", "2")))

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TINYSAM_SHARED_DIR", REPO.parent / "shared"))
REFERENCE_A = SHARED / "reference" / "set_a"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    if not (REFERENCE_A / "tinysam_random_A.pth").is_file():
        pytest.skip(f"reference vectors not present at {REFERENCE_A}")
    return REFERENCE_A


@pytest.fixture(scope="session")
def reference_predictor(reference_dir):
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.models.checkpoint import load_checkpoint
    from tinysam_kit.runtime import TorchEngine

    engine = TorchEngine(load_checkpoint(reference_dir / "tinysam_random_A.pth"), device="cpu")
    return TinySamPredictor(engine)


@pytest.fixture(scope="session")
def reference_image(reference_dir):
    from tinysam_kit.data.images import load_image

    return load_image(reference_dir / "image_A.png")


TINY_TEST_CONFIG = {
    "encoder": {"kind": "tiny_vit", "img_size": 256, "embed_dims": [16, 32, 48, 64], "depths": [1, 1, 1, 1],
                "num_heads": [1, 1, 2, 2], "window_sizes": [7, 7, 7, 7], "num_classes": 0},
    "decoder": {"prompt_embed_dim": 64, "transformer_mlp_dim": 256, "transformer_heads": 8,
                "iou_head_hidden_dim": 64},
}


@pytest.fixture(scope="session")
def tiny_random_checkpoint(tmp_path_factory) -> Path:
    """A small randomly initialised model (256-px input) in the official flat format + config sidecar.

    Fast enough for front-end tests that need a model but not meaningful masks.
    """
    import json

    from tinysam_kit.models.checkpoint import save_checkpoint
    from tinysam_kit.models.config import ModelConfig
    from tinysam_kit.models.sam import build_model

    torch.manual_seed(0)
    config = ModelConfig.from_dict(TINY_TEST_CONFIG)
    model = build_model(config)
    path = tmp_path_factory.mktemp("weights") / "tiny_random.pth"
    save_checkpoint(model, path)
    path.with_name(path.name + ".json").write_text(json.dumps({"config": config.to_dict()}))
    return path


@pytest.fixture(scope="session")
def fo():
    """The `fiftyone` module, pointed at this test session's private database (see fiftyone_helpers)."""
    from fiftyone_helpers import fiftyone_env

    fiftyone_env()
    import fiftyone

    return fiftyone


@pytest.fixture(autouse=True)
def fresh_model_notes():
    """The demo-model fallback note is said once per process; each test sees its own first time."""
    from tinysam_kit.inference import policy

    policy._NOTES_SAID.clear()
    yield
