"""Remote model-zoo source for FiftyOne: `foz.register_zoo_model_source(<url of this folder's repo or archive>)`
then `foz.load_zoo_model("tinysam")`.

FiftyOne imports this file by path, so it only uses absolute imports of the installed tinysam-kit package.
Weights come from tinysam-kit's registry (checksum-verified downloads, or the bundled demo model).
"""

import json
import os
import shutil

ZOO_TO_REGISTRY = {
    "tinysam": "tinysam",
    "tinysam-v1": "tinysam-v1",
    "mobilesam-tinysam-kit": "mobilesam",
    "tinysam-demo": "demo",
}


def _registry_name(model_name):
    base = model_name.split(":", 1)[0]  # FiftyOne may pass a versioned name
    if base not in ZOO_TO_REGISTRY:
        raise ValueError(f"unknown TinySAM zoo model {model_name!r}; available: {', '.join(ZOO_TO_REGISTRY)}")
    return ZOO_TO_REGISTRY[base]


def download_model(model_name, model_path):
    """Put the weights at `model_path` (plus a `<file>.json` architecture sidecar)."""
    from tinysam_kit.models.registry import resolve_weights

    source, spec = resolve_weights(_registry_name(model_name))
    os.makedirs(os.path.dirname(model_path) or ".", exist_ok=True)
    tmp = model_path + ".part"
    shutil.copyfile(source, tmp)
    os.replace(tmp, model_path)
    with open(model_path + ".json", "w") as fh:
        json.dump({"config": spec.config.to_dict()}, fh)


def load_model(model_name, model_path, **kwargs):
    """A `TinySamModel`; kwargs: engine, precision, device, mode, everything, label, point_label_attribute."""
    from tinysam_kit.integrations.fiftyone.model import TinySamModel

    _registry_name(model_name)
    return TinySamModel(model=model_path, **kwargs)


def resolve_input(model_name, ctx):
    import fiftyone.operators.types as types

    inputs = types.Object()
    inputs.enum("engine", ["torch", "onnx"], default="torch", label="Engine")
    inputs.enum("precision", ["fp32", "fp16", "int8"], default="fp32", label="Precision")
    inputs.enum("device", ["auto", "cpu", "cuda"], default="auto", label="Device")
    return types.Property(inputs)
