"""ONNX export of the encoder and the split decoder, with a parity check against PyTorch.

Three graphs per model and precision:
  encoder          image (1, 3, S, S) → image_embedding (1, C, e, e)
  decoder_image    image_embedding, mask_input (M, 1, 4e, 4e), has_mask_input (1,) → the decoder's
                   prompt-independent layer-0 tensors (run once per image, or per prompt with a mask input)
  decoder_prompt   those tensors, point_coords (B, N, 2), point_labels (B, N) → low_res_logits (B, 4, 4e, 4e),
                   iou_predictions (B, 4)
Points follow SAM's ONNX convention: label 1 foreground, 0 background, 2/3 box corners, -1 padding.
B, N and M are dynamic. A manifest `<stem>.<precision>.onnx.json` records the source model, its SHA-256,
precision, opset and the measured max |Δ| against PyTorch; an export whose outputs do not match PyTorch is
refused and nothing is written.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tinysam_kit.models.sam import TinySam
from tinysam_kit.runtime.base import ALL_TOKENS
from tinysam_kit.runtime.split_decoder import DecoderImageSide, DecoderPromptSide, SparseEmbedder

OPSET = 17
EXPORT_FORMAT = 5  # bump when the graphs change (inputs, outputs or computation): stale cached exports are redone
PARTS = ("encoder", "decoder_image", "decoder_prompt")
SIDE_NAMES = ("keys0", "k_t2i", "v_t2i", "q_i2t")


class ExportError(RuntimeError):
    """The export could not be produced."""


class ExportParityError(ExportError):
    """The exported graphs do not reproduce PyTorch's outputs; nothing was written."""


class DecoderImageGraph(nn.Module):
    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.prompt_encoder = model.prompt_encoder
        self.side = DecoderImageSide(model)

    def forward(self, image_embedding, mask_input, has_mask_input):
        pe = self.prompt_encoder
        no_mask = pe.no_mask_embed.weight.reshape(1, -1, 1, 1)
        dense = has_mask_input * pe.embed_masks(mask_input) + (1 - has_mask_input) * no_mask
        return self.side(image_embedding, dense)


class DecoderPromptGraph(nn.Module):
    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.embed = SparseEmbedder(model)
        self.side = DecoderPromptSide(model)

    def forward(self, keys0, k_t2i, v_t2i, q_i2t, point_coords, point_labels, mask_tokens):
        return self.side(keys0, k_t2i, v_t2i, q_i2t, self.embed(point_coords, point_labels), mask_tokens)


@dataclass
class ExportResult:
    directory: Path
    files: dict[str, Path]
    manifest: dict

    @property
    def manifest_path(self) -> Path:
        return self.directory / manifest_name(self.manifest["model_stem"], self.manifest["precision"])


def manifest_name(stem: str, precision: str) -> str:
    return f"{stem}.{precision}.onnx.json"


def part_name(stem: str, precision: str, part: str) -> str:
    return f"{stem}.{precision}.{part}.onnx"


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(directory, os.W_OK)


def export_dir_for(weights: Path | None, sha256: str | None, name: str) -> Path:
    """Exports live next to the weights; in the cache dir when that folder is read-only (e.g. site-packages)."""
    from tinysam_kit.models.registry import cache_dir

    if weights is not None and _writable(weights.parent) and os.access(weights.parent, os.W_OK):
        return weights.parent
    return cache_dir() / "onnx" / f"{name}-{(sha256 or 'local')[:12]}"


def read_manifest(directory: Path, stem: str, precision: str) -> dict | None:
    path = directory / manifest_name(stem, precision)
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    files = [directory / part_name(stem, precision, p) for p in PARTS]
    return data if all(f.is_file() for f in files) else None


def is_current(manifest: dict | None, sha256: str | None) -> bool:
    return bool(manifest) and manifest.get("format") == EXPORT_FORMAT and manifest.get("source_sha256") == sha256


def _sample_inputs(model: TinySam, seed: int = 0):
    """Deterministic inputs that exercise points, padding, a box and a mask input.

    Row 0: two points and the padding point; row 1: a point and a box (corners labelled 2, 3).
    """
    g = torch.Generator().manual_seed(seed)
    s = model.config.img_size
    low = model.config.low_res_size
    image = torch.randn((1, 3, s, s), generator=g)
    coords = torch.rand((2, 3, 2), generator=g) * s
    coords[0, 2] = 0.0
    coords[1, 1:] = torch.sort(coords[1, 1:], dim=0).values  # box corners: top-left, bottom-right
    labels = torch.tensor([[1.0, 0.0, -1.0], [1.0, 2.0, 3.0]])
    mask = torch.randn((2, 1, low, low), generator=g) * 4
    return image, coords, labels, mask


def _torch_reference(model: TinySam, image, coords, labels, mask):
    """Outputs of the model's own exact code (`TinySam.encode` / `TinySam.decode`) for the sample prompts."""
    with torch.inference_mode():
        emb = model.encode(image)
        outs = {}
        for name, masks in (("nomask", (None, None)), ("mask", (mask[0:1], mask[1:2]))):
            row0 = model.decode(emb, coords[0:1, :2], labels[0:1, :2], None, masks[0])
            row1 = model.decode(emb, coords[1:2, :1], labels[1:2, :1], coords[1:2, 1:].reshape(1, 4), masks[1])
            outs[name] = (torch.cat([row0[0], row1[0]]), torch.cat([row0[1], row1[1]]))
    return emb, outs


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def run_parity(files: dict[str, Path], model: TinySam, *, providers=None) -> dict[str, float]:
    """max |Δ| of ONNX Runtime vs PyTorch for the embedding, the logits and the IoU predictions."""
    import onnxruntime as ort

    image, coords, labels, mask = _sample_inputs(model)
    ref_emb, ref = _torch_reference(model, image, coords, labels, mask)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = providers or ["CPUExecutionProvider"]
    enc = ort.InferenceSession(str(files["encoder"]), opts, providers=providers)
    img = ort.InferenceSession(str(files["decoder_image"]), opts, providers=providers)
    prm = ort.InferenceSession(str(files["decoder_prompt"]), opts, providers=providers)
    emb = enc.run(None, {"image": image.numpy()})[0]
    low = model.config.low_res_size
    report = {"embedding": max_abs_diff(emb, ref_emb), "embedding_scale": float(ref_emb.abs().max())}
    for name, m in (("nomask", np.zeros((1, 1, low, low), np.float32)), ("mask", mask.numpy())):
        has = np.array([0.0 if name == "nomask" else 1.0], np.float32)
        # Decode from PyTorch's embedding so each graph is judged on its own error.
        side = img.run(None, {"image_embedding": ref_emb.numpy(), "mask_input": m, "has_mask_input": has})
        feeds = dict(zip(SIDE_NAMES, side))
        feeds.update(point_coords=coords.numpy(), point_labels=labels.numpy(),
                     mask_tokens=np.array(ALL_TOKENS, np.int64))
        logits, iou = prm.run(None, feeds)
        report[f"logits_{name}"] = max_abs_diff(logits, ref[name][0])
        report[f"iou_{name}"] = max_abs_diff(iou, ref[name][1])
        report[f"logits_scale_{name}"] = float(ref[name][0].abs().max())
    return report


def parity_failures(report: dict[str, float], atol: float, rtol: float) -> list[str]:
    """Each output must satisfy max |Δ| ≤ atol + rtol · max |reference|."""
    failures = []
    checks = [("embedding", "embedding_scale")]
    checks += [(f"logits_{n}", f"logits_scale_{n}") for n in ("nomask", "mask")]
    checks += [(f"iou_{n}", None) for n in ("nomask", "mask")]
    for key, scale in checks:
        bound = atol + rtol * (report[scale] if scale else 1.0)
        if not report[key] <= bound:
            failures.append(f"{key}: max |Δ| {report[key]:.3g} > {bound:.3g}")
    return failures


def _export_graphs(model: TinySam, directory: Path, stem: str, opset: int) -> dict[str, Path]:
    image, coords, labels, mask = _sample_inputs(model)
    files = {p: directory / part_name(stem, "fp32", p) for p in PARTS}
    common = dict(opset_version=opset, dynamo=False, do_constant_folding=True)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.image_encoder, (image,), str(files["encoder"]), input_names=["image"],
                          output_names=["image_embedding"], **common)
        emb = model.encode(image)
        has = torch.ones(1)
        torch.onnx.export(DecoderImageGraph(model), (emb, mask, has), str(files["decoder_image"]),
                          input_names=["image_embedding", "mask_input", "has_mask_input"],
                          output_names=list(SIDE_NAMES),
                          dynamic_axes={"mask_input": {0: "masks"}, **{n: {0: "masks"} for n in SIDE_NAMES}},
                          **common)
        side = DecoderImageGraph(model)(emb, mask[:1], torch.zeros(1))
        tokens = torch.tensor(ALL_TOKENS)
        torch.onnx.export(DecoderPromptGraph(model), (*side, coords, labels, tokens), str(files["decoder_prompt"]),
                          input_names=[*SIDE_NAMES, "point_coords", "point_labels", "mask_tokens"],
                          output_names=["low_res_logits", "iou_predictions"],
                          dynamic_axes={**{n: {0: "masks"} for n in SIDE_NAMES},
                                        "point_coords": {0: "prompts", 1: "points"},
                                        "point_labels": {0: "prompts", 1: "points"}, "mask_tokens": {0: "tokens"},
                                        "low_res_logits": {0: "prompts", 1: "tokens"},
                                        "iou_predictions": {0: "prompts"}},
                          **common)
    return files


def stamp_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


def export_onnx(model: TinySam, directory: str | os.PathLike, *, model_name: str, model_sha256: str | None,
                stem: str | None = None, opset: int = OPSET, atol: float = 1e-3, rtol: float = 1e-5,
                reference: TinySam | None = None, log=None) -> ExportResult:
    """Export fp32 graphs into `directory`, check them against `reference` (default: `model` itself) and
    publish them atomically. Raises ExportParityError (writing nothing) when the check fails."""
    import onnxruntime

    directory = Path(directory)
    stem = stem or model_name
    model = model.float().eval().cpu()
    reference = (reference or model).float().eval().cpu()
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".export-") as tmp:
        files = _export_graphs(model, Path(tmp), stem, opset)
        report = run_parity(files, reference)
        failures = parity_failures(report, atol, rtol)
        if failures:
            raise ExportParityError(
                f"ONNX export of {model_name!r} does not match PyTorch ({'; '.join(failures)}); nothing written"
            )
        manifest = {
            "format": EXPORT_FORMAT, "model_stem": stem, "source_model": model_name, "source_sha256": model_sha256,
            "precision": "fp32", "opset": opset, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "img_size": model.config.img_size, "low_res_size": model.config.low_res_size,
            "config": model.config.to_dict(),
            "parity_vs_torch": {"max_abs_diff": report, "atol": atol, "rtol": rtol},
        }
        meta = {"source_model": model_name, "source_sha256": model_sha256 or "", "precision": "fp32",
                "opset": str(opset), "max_abs_diff_vs_torch": json.dumps(report)}
        final = {}
        for part, path in files.items():
            stamp_metadata(path, {**meta, "part": part})
            final[part] = directory / path.name
            os.replace(path, final[part])
        write_json_atomic(directory / manifest_name(stem, "fp32"), manifest)
        manifest = json.loads(json.dumps(manifest))  # the same plain-JSON form a reused export reads back
    if log:
        log(f"exported {stem} fp32 to {directory} (max |Δ| vs torch: " +
            ", ".join(f"{k} {v:.2g}" for k, v in report.items() if "scale" not in k) + ")")
    return ExportResult(directory, final, manifest)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def weights_path_of(model: str | os.PathLike) -> Path | None:
    from tinysam_kit.models.registry import MODELS, resolve_weights

    key = str(model)
    if key in MODELS:
        return resolve_weights(key)[0]
    path = Path(model).expanduser()
    return path if path.is_file() else None


def ensure_export(model: str | os.PathLike, *, directory: str | os.PathLike | None = None, force: bool = False,
                  log=None) -> tuple[Path, str, dict]:
    """Directory, file stem and manifest of an up-to-date fp32 export of `model`, exporting when needed."""
    from tinysam_kit.models.registry import load_model_with_info, sha256_file

    weights = weights_path_of(model)
    sha = sha256_file(weights) if weights is not None else None
    name = str(model) if weights is None or str(model) != str(weights) else weights.stem
    stem = weights.stem if weights is not None else name
    out = Path(directory) if directory else export_dir_for(weights, sha, stem)
    manifest = read_manifest(out, stem, "fp32")
    if not force and is_current(manifest, sha):
        return out, stem, manifest
    net, model_name, sha = load_model_with_info(model, device="cpu")
    result = export_onnx(net, out, model_name=model_name, model_sha256=sha, stem=stem, log=log)
    return out, stem, result.manifest
