"""Remote model-zoo source for FiftyOne: `foz.register_zoo_model_source(<url of this folder's repo or archive>)`
then `foz.load_zoo_model("tinysam")`.

FiftyOne imports this file by path, so it only uses absolute imports of the installed tinysam-kit package.
Weights come from tinysam-kit's registry (checksum-verified downloads, or the bundled demo model): the file
FiftyOne keeps at the zoo's model path names the registered model, and loading resolves its weights.
"""

import json
import os

ZOO_TO_REGISTRY = {
    "tinysam": "tinysam",
    "tinysam-v1": "tinysam-v1",
    "mobilesam-tinysam-kit": "mobilesam",
    "tinysam-demo": "demo",
}
POINTER_KEY = "tinysam_kit_model"


def _registry_name(model_name):
    base = model_name.split(":", 1)[0]  # FiftyOne may pass a versioned name
    if base not in ZOO_TO_REGISTRY:
        raise ValueError(f"unknown TinySAM zoo model {model_name!r}; available: {', '.join(ZOO_TO_REGISTRY)}")
    return ZOO_TO_REGISTRY[base]


def download_model(model_name, model_path):
    """Record at `model_path` which registered model this zoo entry is (its weights are fetched, checksum
    verified, by the registry the first time it loads)."""
    name = _registry_name(model_name)
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    tmp = model_path + ".part"
    with open(tmp, "w") as fh:
        json.dump({POINTER_KEY: name}, fh)
    os.replace(tmp, model_path)


def _model_reference(model_path):
    """The registered name a pointer file holds, else the path itself (weights placed there by hand)."""
    try:
        with open(model_path) as fh:
            return json.load(fh)[POINTER_KEY]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return model_path


def load_model(model_name, model_path, **kwargs):
    """A `TinySamModel`; kwargs: engine, precision, device, threads, mode, everything, label,
    point_label_attribute."""
    from tinysam_kit.integrations.fiftyone.model import TinySamModel

    _registry_name(model_name)
    return TinySamModel(model=_model_reference(model_path), **kwargs)


def resolve_input(model_name, ctx):
    import fiftyone.operators.types as types

    from tinysam_kit.inference.policy import ENGINES, PRECISIONS, EngineOptions

    defaults = EngineOptions()
    inputs = types.Object()
    inputs.enum("engine", list(ENGINES), default=defaults.engine, label="Engine")
    inputs.enum("precision", list(PRECISIONS), default=defaults.precision, label="Precision")
    inputs.str("device", default=defaults.device, label="Device", description="auto, cpu, cuda or cuda:N")
    return types.Property(inputs)
