"""PyTorch execution of the networks (CPU/CUDA)."""

from __future__ import annotations

import copy
import threading
import weakref
from collections import OrderedDict

import torch
from torch import nn

from tinysam_kit.models.device import resolve_device
from tinysam_kit.models.sam import TinySam
from tinysam_kit.runtime.base import ALL_TOKENS, EngineInfo, EngineUnavailableError
from tinysam_kit.runtime.cpu import cpu_has_native_bf16
from tinysam_kit.runtime.split_decoder import (
    GPU_PROMPT_CHUNK,
    PROMPT_CHUNK,
    DecoderImageSide,
    DecoderPromptSide,
    chosen_iou,
    chosen_tokens,
    decode_in_chunks,
)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_precision(precision: str, device: torch.device, flags: frozenset[str] | None = None) -> torch.dtype:
    """dtype for `precision` on `device`, or a one-line EngineUnavailableError saying what to use instead."""
    if precision == "int8":  # an int8 encoder; the networks around it stay fp32
        from tinysam_kit.runtime.torch_int8 import check_int8

        check_int8(device, flags)
        return torch.float32
    if precision not in DTYPES:
        raise EngineUnavailableError(
            f"precision {precision!r} is not available on the torch engine (use fp32, fp16, bf16 or int8)"
        )
    if precision == "fp16" and device.type != "cuda":
        raise EngineUnavailableError("fp16 needs a CUDA device; on CPU use fp32 or bf16")
    if precision == "bf16" and device.type == "cpu" and not cpu_has_native_bf16(flags):
        raise EngineUnavailableError(
            "bf16 on CPU needs bf16 matrix instructions (AMX or AVX512-BF16), which this processor lacks; use fp32"
        )
    return DTYPES[precision]


def fold_batchnorms(module: nn.Module) -> int:
    """Fold every eval-mode BatchNorm that directly follows a bias-free convolution into it (in place).

    TinyViT's `Conv2dBN` blocks are conv → BN pairs; folding removes one memory pass per convolution.
    Returns the number of folded pairs.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    count = 0
    for parent in module.modules():
        names = list(parent._modules)
        for first, second in zip(names, names[1:]):
            conv, bn = parent._modules[first], parent._modules[second]
            if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                parent._modules[first] = fuse_conv_bn_eval(conv, bn)
                parent._modules[second] = nn.Identity()
                count += 1
    return count


class ImageSideCache:
    """Per-embedding results of the decoder's image side, keyed by the embedding object's identity.

    Entries die with their embedding (weak reference) and at most `size` are kept, so the cache never holds
    memory the predictor's embedding cache has already released.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[int, tuple[weakref.ref, tuple]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, embedding, compute):
        key = id(embedding)
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0]() is embedding:
                self._items.move_to_end(key)
                self.hits += 1
                return item[1]
        value = compute()
        with self._lock:
            self.misses += 1
            self._items[key] = (weakref.ref(embedding, lambda _ref, k=key: self._drop(k, _ref)), value)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value

    def _drop(self, key: int, ref: weakref.ref) -> None:
        with self._lock:
            item = self._items.get(key)
            if item is not None and item[0] is ref:
                del self._items[key]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def __len__(self) -> int:
        return len(self._items)


class TorchEngine:
    """Runs a `TinySam` module.

    fp32 with `exact=True` is the reference path (the model's own forward code, unchanged). The default
    (`exact=False`) keeps fp32 answers (logits within float32 rounding: 1e-4 + 2e-6 of their scale) while
    folding BatchNorm into convolutions, using channels-last memory for the encoder on CPU, and splitting the
    decoder so its prompt-independent work is done once per image and its attention runs in folded form.
    fp16/bf16 trade exactness for speed. int8 (x86 CPUs with VNNI/AMX)
    quantizes and compiles the encoder (`torch_int8`); its decoder is the fp32 one.
    """

    def __init__(self, model: TinySam, *, device: str = "auto", precision: str = "fp32",
                 model_name: str = "custom", model_sha256: str | None = None, threads: int | None = None,
                 exact: bool = False, channels_last: bool | None = None,
                 image_cache_size: int = 8):
        if exact and precision != "fp32":
            raise EngineUnavailableError(f"exact=True is the fp32 reference path; it cannot run in {precision}")
        self.device = resolve_device(device)
        self.dtype = check_precision(precision, self.device)
        if threads:
            if int(threads) < 1:
                raise EngineUnavailableError(f"threads must be a positive number, got {threads}")
            torch.set_num_threads(int(threads))
        self.threads = torch.get_num_threads()
        self.exact = exact
        self.prompt_chunk = PROMPT_CHUNK if self.device.type == "cpu" else GPU_PROMPT_CHUNK  # prompts per call
        # A model on another device or in another precision is converted as a copy: `Module.to` works in
        # place, and the caller's fp32 model must stay what it was.
        moved = any(p.device != self.device or p.dtype != self.dtype for p in model.parameters())
        self.model = (copy.deepcopy(model) if moved else model).to(self.device, self.dtype).eval()
        self._lock = threading.Lock()
        cfg = model.config
        self.info = EngineInfo("torch", precision, str(self.device), model_name, model_sha256,
                               cfg.img_size, cfg.low_res_size)
        with torch.inference_mode():
            self._dense_pe = self.model.prompt_encoder.get_dense_pe()
        self.image_side_cache = ImageSideCache(image_cache_size)
        if exact:
            self.encoder = self.model.image_encoder
            self.channels_last = False
            self._image_side = self._prompt_side = None
            return
        # The optimised encoder is a copy, so folding never alters a model the caller still holds.
        self.encoder = copy.deepcopy(self.model.image_encoder)
        fold_batchnorms(self.encoder)
        if precision == "int8":
            from tinysam_kit.runtime.torch_int8 import int8_encoder

            self.channels_last = False  # the compiled int8 program takes standard-layout images
            self.encoder = int8_encoder(self.encoder, cfg.img_size, bf16=cpu_has_native_bf16(),
                                        model_sha256=model_sha256)
        else:
            self.channels_last = (self.device.type == "cpu") if channels_last is None else channels_last
            if self.channels_last:
                self.encoder = self.encoder.to(memory_format=torch.channels_last)
        self._image_side = DecoderImageSide(self.model).to(self.device, self.dtype).eval()
        self._prompt_side = DecoderPromptSide(self.model).to(self.device, self.dtype).eval()

    @property
    def decoder_mode(self) -> str:
        return "exact" if self.exact else "split"

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(self.device, self.dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            return self.encoder(x).contiguous()

    def encode_batch(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) → B embeddings, each what `encode` gives for its image (within float rounding), from
        one encoder call. The compiled int8 program takes one image at a time."""
        if self.info.precision == "int8":
            return [self.encode(images[i : i + 1]) for i in range(images.shape[0])]
        batched = self.encode(images)
        # Copies, so each embedding owns its memory and is freed on its own.
        return [batched[i : i + 1].clone() for i in range(batched.shape[0])]

    def _put(self, t):
        return None if t is None else t.to(self.device, self.dtype)

    def image_side(self, embedding: torch.Tensor, dense: torch.Tensor | None = None) -> tuple:
        """Prompt-independent decoder tensors; cached per embedding when there is no mask input."""
        with torch.inference_mode():
            if dense is not None:
                return self._image_side(embedding, dense)
            nomask = self.model.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
            return self.image_side_cache.get(embedding, lambda: self._image_side(embedding, nomask))

    def decode(self, embedding, point_coords, point_labels, boxes, mask_input, tokens=ALL_TOKENS,
               keep_on_device=False):
        if self.exact:
            with torch.inference_mode():
                points = (self._put(point_coords), self._put(point_labels)) if point_coords is not None else None
                sparse, dense = self.model.prompt_encoder(points, self._put(boxes), self._put(mask_input))
                logits, iou = self.model.mask_decoder(embedding, self._dense_pe, sparse, dense)
                logits, iou = chosen_tokens(logits, iou.float(), tokens)
                return (logits, iou) if keep_on_device else (logits.float().cpu(), iou.cpu())
        return decode_in_chunks(lambda *a: self._decode_split(embedding, *a, keep_on_device=keep_on_device),
                                point_coords, point_labels, boxes, mask_input,
                                torch.as_tensor(tokens, dtype=torch.int64, device=self.device), self.prompt_chunk)

    def _decode_split(self, embedding, point_coords, point_labels, boxes, mask_input, tokens, keep_on_device=False):
        with torch.inference_mode():
            pe = self.model.prompt_encoder
            points = (self._put(point_coords), self._put(point_labels)) if point_coords is not None else None
            sparse, _ = pe(points, self._put(boxes), None)
            if mask_input is not None:
                side = self.image_side(embedding, pe.embed_masks(self._put(mask_input)))
            else:
                side = self.image_side(embedding)
            logits, iou = self._prompt_side(*side, sparse, tokens)
            iou = chosen_iou(iou, tokens).float()
            return (logits, iou) if keep_on_device else (logits.float().cpu(), iou.cpu())

    def embedding_nbytes(self, embedding: torch.Tensor) -> int:
        # The decoder's image-side cache entry lives as long as the embedding: about 2.5× its size.
        nbytes = embedding.numel() * embedding.element_size()
        return nbytes if self.exact else nbytes * 7 // 2
