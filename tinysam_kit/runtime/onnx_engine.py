"""ONNX Runtime execution of the exported graphs (CPU / CUDA execution providers, fp32 / int8)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

from tinysam_kit.runtime.base import ALL_TOKENS, EngineInfo, EngineUnavailableError
from tinysam_kit.runtime.export import PARTS, SIDE_NAMES, ensure_export, part_name, read_manifest
from tinysam_kit.runtime.split_decoder import chosen_iou, decode_in_chunks, points_with_boxes
from tinysam_kit.runtime.torch_engine import ImageSideCache

_SESSIONS: dict[tuple, object] = {}
_SESSIONS_LOCK = threading.Lock()


def _ort():
    try:
        import onnxruntime
    except ImportError as exc:  # the onnx extra is optional
        raise EngineUnavailableError(
            "the onnx engine needs onnxruntime: pip install 'tinysam-kit[onnx]'") from exc
    return onnxruntime


def resolve_providers(device: str = "auto") -> tuple[list[str], str]:
    """Execution providers for `device`; asking for CUDA without the CUDA provider is a one-line error."""
    ort = _ort()
    available = ort.get_available_providers()
    if device in (None, "", "auto"):
        device = "cuda" if "CUDAExecutionProvider" in available else "cpu"
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in available:
            raise EngineUnavailableError(
                f"device {device!r} requested but onnxruntime {ort.__version__} has no CUDAExecutionProvider "
                "(install onnxruntime-gpu on a machine with CUDA, or use cpu)")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], device
    if device != "cpu":
        raise EngineUnavailableError(f"unsupported device {device!r} (use auto, cpu, cuda or cuda:N)")
    return ["CPUExecutionProvider"], "cpu"


def session_options(threads: int | None, arena: bool = True):
    """Full graph optimisation, one intra-op pool sized to `threads`, sequential execution (the graphs are
    chains: a second inter-op pool only competes for the same cores), memory patterns on. The CPU arena is
    optional: it keeps a graph's peak activation memory for the life of the session. Idle pool threads do
    not spin: a click's decoder run is followed by PyTorch post-processing on the same cores, which spinning
    ONNX Runtime threads would slow down by a third (measured)."""
    ort = _ort()
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = int(threads or torch.get_num_threads() or os.cpu_count() or 1)
    opts.inter_op_num_threads = 1
    opts.enable_cpu_mem_arena = arena
    opts.enable_mem_pattern = True
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return opts


def get_session(path: Path, providers: list, threads: int | None, arena: bool = True):
    """Sessions are cached per (file, its mtime, providers, threads): loading one costs seconds."""
    ort = _ort()
    key = (str(path), path.stat().st_mtime_ns, repr(providers), threads, arena)
    with _SESSIONS_LOCK:
        sess = _SESSIONS.get(key)
        if sess is None:
            sess = ort.InferenceSession(str(path), session_options(threads, arena), providers=providers)
            _SESSIONS[key] = sess
        return sess


class OnnxEngine:
    """Encoder + split decoder on ONNX Runtime. Embeddings are float32 numpy arrays."""

    def __init__(self, directory: str | os.PathLike, stem: str, *, precision: str = "fp32", device: str = "auto",
                 threads: int | None = None, image_cache_size: int = 8):
        if precision not in ("fp32", "int8"):
            raise EngineUnavailableError(
                f"precision {precision!r} is not available on the onnx engine (use fp32 or int8; fp16/bf16 run "
                "on the torch engine)")
        if threads is not None and int(threads) < 1:
            raise EngineUnavailableError(f"threads must be a positive number, got {threads}")
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, stem, precision)
        if self.manifest is None:
            raise EngineUnavailableError(f"no complete {precision} ONNX export of {stem!r} in {self.directory}")
        self.providers, dev = resolve_providers(device)
        self.threads = threads
        self.files = {p: self.directory / part_name(stem, precision, p) for p in PARTS}
        # The encoder runs once per image for seconds: an arena would only pin its ~1 GB activation peak
        # (measured: hierarchical everything-mode peak RSS 1.75 GB with it); the decoders keep theirs.
        self.encoder = get_session(self.files["encoder"], self.providers, threads, arena=False)
        self.decoder_image = get_session(self.files["decoder_image"], self.providers, threads)
        self.decoder_prompt = get_session(self.files["decoder_prompt"], self.providers, threads)
        m = self.manifest
        self.info = EngineInfo("onnx", precision, dev, m["source_model"], m.get("source_sha256"),
                               int(m["img_size"]), int(m["low_res_size"]))
        self.image_side_cache = ImageSideCache(image_cache_size)
        self._empty_mask = np.zeros((1, 1, self.info.low_res_size, self.info.low_res_size), np.float32)

    @classmethod
    def from_model(cls, model: str | os.PathLike = "tinysam", *, precision: str = "fp32", device: str = "auto",
                   threads: int | None = None, export_dir: str | os.PathLike | None = None, log=None,
                   **options) -> OnnxEngine:
        """Engine for a registered model or checkpoint; exports (and quantizes) on first use, then reuses."""
        resolve_providers(device)  # fail fast, before any export work
        if precision not in ("fp32", "int8"):
            raise EngineUnavailableError(
                f"precision {precision!r} is not available on the onnx engine (use fp32 or int8)")
        directory, stem, _ = ensure_export(model, directory=export_dir, log=log)
        if precision == "int8":
            from tinysam_kit.runtime.quantize import ensure_int8

            ensure_int8(directory, stem, log=log)
        return cls(directory, stem, precision=precision, device=device, threads=threads, **options)

    def encode(self, image: torch.Tensor) -> np.ndarray:
        return self.encoder.run(None, {"image": image.detach().float().cpu().numpy()})[0]

    def encode_batch(self, images: torch.Tensor) -> list[np.ndarray]:
        """(B, 3, S, S) → B embeddings, one encoder run when the exported graph has a free batch dimension,
        otherwise one run per image (exports with a fixed batch of 1)."""
        batch_dim = self.encoder.get_inputs()[0].shape[0]
        if isinstance(batch_dim, int):
            return [self.encode(images[i : i + 1]) for i in range(images.shape[0])]
        batched = self.encode(images)
        return [np.ascontiguousarray(batched[i : i + 1]) for i in range(batched.shape[0])]

    def image_side(self, embedding: np.ndarray, mask_input: torch.Tensor | None = None) -> list[np.ndarray]:
        if mask_input is not None:
            feeds = {"image_embedding": embedding, "mask_input": mask_input.float().numpy(),
                     "has_mask_input": np.ones(1, np.float32)}
            return self.decoder_image.run(None, feeds)
        feeds = {"image_embedding": embedding, "mask_input": self._empty_mask,
                 "has_mask_input": np.zeros(1, np.float32)}
        return self.image_side_cache.get(embedding, lambda: self.decoder_image.run(None, feeds))

    def decode(self, embedding, point_coords, point_labels, boxes, mask_input, tokens=ALL_TOKENS,
               keep_on_device=False):
        return decode_in_chunks(lambda *a: self._decode(embedding, *a), point_coords, point_labels, boxes,
                                mask_input, np.asarray(tokens, dtype=np.int64).reshape(-1))

    def _decode(self, embedding, point_coords, point_labels, boxes, mask_input, tokens):
        prompts = points_with_boxes(point_coords, point_labels, boxes)
        if prompts is None:  # mask-only prompt: no sparse tokens at all, as in the exact prompt encoder
            batch = mask_input.shape[0]
            coords, labels = np.zeros((batch, 0, 2), np.float32), np.zeros((batch, 0), np.float32)
        else:
            coords, labels = prompts[0].numpy(), prompts[1].numpy()
        side = self.image_side(embedding, mask_input)
        feeds = dict(zip(SIDE_NAMES, side))
        feeds.update(point_coords=np.ascontiguousarray(coords, np.float32),
                     point_labels=np.ascontiguousarray(labels, np.float32), mask_tokens=tokens)
        logits, iou = (torch.from_numpy(a) for a in self.decoder_prompt.run(None, feeds))
        return logits, chosen_iou(iou, tokens)

    def embedding_nbytes(self, embedding: np.ndarray) -> int:
        # The decoder's image-side cache entry lives as long as the embedding: about 2.5× its size.
        return int(embedding.nbytes) * 7 // 2
