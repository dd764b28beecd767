"""Named models, the weights cache and checksum-verified, resumable downloads."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinysam_kit.models.checkpoint import CheckpointError, load_weights, read_state_dict
from tinysam_kit.models.config import DEMO, TINYSAM_VIT_T, DecoderConfig, ModelConfig, TinyViTConfig
from tinysam_kit.models.device import resolve_device
from tinysam_kit.models.sam import TinySam, build_model

PACKAGE_WEIGHTS = Path(__file__).resolve().parent / "weights"


class ModelNotAvailableError(RuntimeError):
    """Weights are neither on disk nor downloadable; the message says what to fetch and where to put it."""


class ChecksumError(RuntimeError):
    """A downloaded or cached file does not have the published SHA-256."""


@dataclass(frozen=True)
class ModelSpec:
    name: str
    filename: str
    url: str | None
    sha256: str | None  # None: not published; the first download is recorded and re-verified after
    config: ModelConfig
    description: str = ""
    bundled: bool = False  # shipped inside the package (no download)
    # Everything-mode thresholds suited to this model's score calibration, used where the caller sets none.
    everything_defaults: dict = field(default_factory=dict)


MODELS: dict[str, ModelSpec] = {}


def register_model(spec: ModelSpec) -> ModelSpec:
    MODELS[spec.name] = spec
    return spec


register_model(ModelSpec(
    "tinysam", "tinysam_42.3.pth",
    "https://github.com/xinghaochen/TinySAM/releases/download/3.0/tinysam_42.3.pth", None, TINYSAM_VIT_T,
    "TinySAM, 42.3 AP COCO release (TinyViT-5M, full-stage distillation + hard prompt sampling)",
))
register_model(ModelSpec(
    "tinysam-v1", "tinysam.pth",
    "https://github.com/xinghaochen/TinySAM/releases/download/1.0/tinysam.pth", None, TINYSAM_VIT_T,
    "TinySAM, first release (41.0 AP)",
))
register_model(ModelSpec(
    "mobilesam", "mobile_sam.pt",
    "https://github.com/ChaoningZhang/MobileSAM/raw/master/weights/mobile_sam.pt", None, TINYSAM_VIT_T,
    "MobileSAM (TinyViT-5M, decoupled distillation)",
))
register_model(ModelSpec(
    "demo", "demo.pth", None, "66cd623866b0bb680034e9d006af71111ddfbba604b57f8d88fcee1d2e5202fc", DEMO,
    "small demo model trained from scratch on the synthetic world: meaningful but weak masks, for tests and "
    "demos (bundled; `tinysam train-demo` reproduces it; quality in docs/training.md)",
    bundled=True,
    # Its IoU head rarely predicts above SAM's 0.88 and its soft logits score low on stability: with SAM's
    # defaults it finds nothing. Chosen on validation images (world indices from HELD_OUT_START + 300):
    # recall rises as the stability threshold falls, to a plateau from 0.6 down (docs/training.md).
    everything_defaults={"pred_iou_thresh": 0.5, "stability_score_thresh": 0.6},
))



def cache_dir() -> Path:
    """TINYSAM_HOME, else $XDG_CACHE_HOME/tinysam, else ~/.cache/tinysam."""
    env = os.environ.get("TINYSAM_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tinysam"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def download_file(url: str, dest: str | os.PathLike, sha256: str | None = None, *, progress: bool = True,
                  timeout: float = 30.0, chunk: int = 1 << 16) -> Path:
    """Download to `dest` via `dest.part` (resumed with an HTTP Range request), verify, then rename.

    The final path only ever holds a complete, verified file.
    """
    import requests
    from tqdm import tqdm

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Range": f"bytes={offset}-"} if offset else {}
    with requests.get(url, stream=True, timeout=timeout, headers=headers) as resp:
        if resp.status_code == 416:  # the partial file is already complete
            pass
        else:
            resp.raise_for_status()
            if offset and resp.status_code != 206:
                offset = 0  # server ignored the range: start over
            total = resp.headers.get("Content-Length")
            total = int(total) + offset if total is not None else None
            mode = "ab" if offset else "wb"
            with open(part, mode) as fh, tqdm(total=total, initial=offset, unit="B", unit_scale=True,
                                              desc=dest.name, disable=not progress, leave=False) as bar:
                for block in resp.iter_content(chunk_size=chunk):
                    fh.write(block)
                    bar.update(len(block))
            if total is not None and part.stat().st_size < total:
                raise OSError(f"download of {url} was interrupted at {part.stat().st_size} of {total} bytes; "
                              "run again to resume")
    actual = sha256_file(part)
    if sha256 is not None and actual != sha256.lower():
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{dest.name}: SHA-256 {actual} does not match the expected {sha256}; "
                            "the corrupt download was deleted")
    os.replace(part, dest)
    return dest


def _recorded_sha_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def resolve_weights(name: str, *, download: bool = True, progress: bool = True) -> tuple[Path, ModelSpec]:
    """Path of the weights of registered model `name`, downloading them into the cache if allowed."""
    if name not in MODELS:
        raise ModelNotAvailableError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))} "
                                     "(or pass a checkpoint path)")
    spec = MODELS[name]
    path = (PACKAGE_WEIGHTS if spec.bundled else cache_dir()) / spec.filename
    if not path.is_file():
        if spec.bundled or not download or not spec.url:
            raise ModelNotAvailableError(
                f"weights for {name!r} are not on this machine: download {spec.filename} from {spec.url} "
                f"and put it at {path} (or pass the file's path instead of the name)"
            )
        try:
            download_file(spec.url, path, spec.sha256, progress=progress)
        except ChecksumError:
            raise
        except Exception as exc:  # noqa: BLE001 - any network failure gets the same actionable message
            raise ModelNotAvailableError(
                f"could not download {spec.filename} for model {name!r} ({type(exc).__name__}: {exc}). "
                f"Download it by hand from {spec.url} and put it at {path}, or pass the file's path."
            ) from exc
    verify_weights(path, spec)
    return path, spec


def verify_weights(path: Path, spec: ModelSpec) -> str:
    """Check the file against the published hash, or against the hash recorded at first download."""
    actual = sha256_file(path)
    expected = spec.sha256
    recorded = _recorded_sha_path(path)
    if expected is None and recorded.is_file():
        expected = recorded.read_text().strip()
    if expected is not None and actual != expected.lower():
        raise ChecksumError(f"{path}: SHA-256 {actual} does not match the expected {expected}; delete the file "
                            "and download it again")
    if expected is None and not spec.bundled:
        recorded.write_text(actual + "\n")
    return actual


def infer_config(state: dict[str, torch.Tensor], img_size: int = 1024) -> ModelConfig:
    """Architecture of a TinySAM-family checkpoint, read off its key names and shapes."""
    if "image_encoder.pos_embed" in state:
        from tinysam_kit.models.sam_vit import infer_vit_config  # SAM ViT-B/L/H teachers

        encoder = infer_vit_config(state)
    elif "image_encoder.patch_embed.seq.0.c.weight" in state:
        dims, depths, heads, windows = [], [], [], []
        for i in range(16):
            blocks = {int(m.group(1)) for k in state
                      if (m := re.match(rf"image_encoder\.layers\.{i}\.blocks\.(\d+)\.", k))}
            if not blocks:
                break
            depths.append(max(blocks) + 1)
            if i == 0:
                dims.append(state["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[1])
                heads.append(TinyViTConfig().num_heads[0])  # stage 0 is convolutional
                windows.append(7)
            else:
                bias = state[f"image_encoder.layers.{i}.blocks.0.attn.attention_biases"]
                dims.append(state[f"image_encoder.layers.{i}.blocks.0.attn.norm.weight"].shape[0])
                heads.append(bias.shape[0])
                windows.append(round(bias.shape[1] ** 0.5))
        expand = state["image_encoder.layers.0.blocks.0.conv1.c.weight"].shape[0] / dims[0]
        mlp_ratio = state["image_encoder.layers.1.blocks.0.mlp.fc1.weight"].shape[0] / dims[1]
        head = state.get("image_encoder.head.weight")
        encoder = TinyViTConfig(img_size=img_size, embed_dims=tuple(dims), depths=tuple(depths),
                                num_heads=tuple(heads), window_sizes=tuple(windows), mlp_ratio=mlp_ratio,
                                mbconv_expand_ratio=expand,
                                local_conv_size=state["image_encoder.layers.1.blocks.0.local_conv.c.weight"].shape[-1],
                                num_classes=head.shape[0] if head is not None else 0)
    else:
        raise CheckpointError("not a TinySAM/MobileSAM/SAM checkpoint: no image_encoder.* keys")
    dim = state["prompt_encoder.no_mask_embed.weight"].shape[1]
    attn_dim = state["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"].shape[0]
    layers = {int(m.group(1)) for k in state if (m := re.match(r"mask_decoder\.transformer\.layers\.(\d+)\.", k))}
    decoder = DecoderConfig(
        prompt_embed_dim=dim,
        transformer_depth=max(layers) + 1,
        transformer_mlp_dim=state["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0],
        attention_downsample_rate=dim // attn_dim,
        iou_head_hidden_dim=state["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0],
        mask_in_chans=state["prompt_encoder.mask_downscaling.3.weight"].shape[0],
        num_multimask_outputs=state["mask_decoder.mask_tokens.weight"].shape[0] - 1,
        transformer_heads=DecoderConfig().transformer_heads,
    )
    return ModelConfig(encoder=encoder, decoder=decoder)


def sidecar_config(path: Path) -> ModelConfig | None:
    """`<checkpoint>.json` may hold {"config": ...} for non-default input sizes (e.g. the demo model)."""
    side = path.with_name(path.name + ".json")
    if side.is_file():
        data = json.loads(side.read_text())
        return ModelConfig.from_dict(data["config"])
    return None


def model_name_of(name_or_path: str | os.PathLike) -> str:
    """The name a model loads under: a registered name as it is, a checkpoint file by its stem."""
    key = str(name_or_path)
    return key if key in MODELS else Path(name_or_path).expanduser().stem


def load_model_with_info(name_or_path: str | os.PathLike = "tinysam", *, device: str = "auto",
                         config: ModelConfig | None = None,
                         download: bool = True) -> tuple[TinySam, str, str]:
    """Registered name or checkpoint path → (model in eval mode on `device`, name, sha256 of the file)."""
    key = str(name_or_path)
    if key in MODELS:
        path, spec = resolve_weights(key, download=download)
        config = config or spec.config
        name = spec.name
        sha = sha256_file(path)
    else:
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise ModelNotAvailableError(
                f"{key!r} is neither a registered model ({', '.join(sorted(MODELS))}) nor an existing file")
        name = model_name_of(path)
        sha = sha256_file(path)
    state = read_state_dict(path)
    config = config or sidecar_config(path) or infer_config(state)
    model = load_weights(build_model(config), state, source=str(path))
    return model.to(resolve_device(device)), name, sha


def load_model(name_or_path: str | os.PathLike = "tinysam", device: str = "auto",
               config: ModelConfig | None = None) -> TinySam:
    """The network of a registered model ("tinysam", "tinysam-v1", "mobilesam", ...) or checkpoint file."""
    return load_model_with_info(name_or_path, device=device, config=config)[0]

