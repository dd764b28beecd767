"""Prompt predictor: one image embedding, many point/box/mask prompts, TinySAM's three masks each."""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from tinysam_kit.data.images import load_image, to_rgb_uint8
from tinysam_kit.data.preprocess import to_model_input
from tinysam_kit.inference.embedding_store import EmbeddingStore
from tinysam_kit.inference.policy import EngineOptions, ModelChoice, prompt_tokens, report_score
from tinysam_kit.inference.upsampling import mask_from_low_res, resize_logits
from tinysam_kit.runtime import ALL_TOKENS, BEST_MULTIMASK, MULTIMASK_TOKENS, SINGLE_MASK_TOKENS, Engine, create_engine

DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
# Full-resolution logits are produced in chunks of at most this many float32 pixels (~64 MB).
UPSAMPLE_PIXEL_BUDGET = 16 * 1024 * 1024


class PromptError(ValueError):
    """A prompt cannot be used as given; the message says which value and why."""


@dataclass
class ImageEmbedding:
    """An encoded image plus the geometry needed to map prompts in and masks out."""

    key: str
    embedding: Any
    original_size: tuple[int, int]  # (H, W) of the user's image
    input_size: tuple[int, int]  # (h, w) after resizing the long side to the model's input size
    nbytes: int


class EmbeddingCache:
    """Thread-safe LRU of image embeddings bounded by their total size in bytes."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, ImageEmbedding] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> ImageEmbedding | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return item

    def put(self, item: ImageEmbedding) -> None:
        if item.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._items.pop(item.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._items[item.key] = item
            self._bytes += item.nbytes
            while self._bytes > self.max_bytes:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= evicted.nbytes

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, key: str) -> bool:
        return key in self._items



def content_key(image: np.ndarray) -> str:
    digest = hashlib.blake2b(image.tobytes(), digest_size=16)
    digest.update(repr(image.shape).encode())
    return digest.hexdigest()


def _as_float_array(value, name: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise PromptError(f"{name} must be numeric, got {value!r}") from exc
    if not np.isfinite(arr).all():
        raise PromptError(f"{name} contains NaN or infinite values")
    return arr


class TinySamPredictor:
    """Encode an image once (cached), then answer any number of prompts against it.

    Coordinates are pixels of the original image, x = column, y = row. `predict` returns TinySAM's
    three masks (mask tokens 1..3) with their predicted IoUs; `multimask_output=False` gives SAM's
    single-mask token 0 instead.
    """

    def __init__(self, engine: Engine, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 store: EmbeddingStore | None = None) -> None:
        self.engine = engine
        self.cache = EmbeddingCache(cache_bytes)
        self.store = store
        self.current: ImageEmbedding | None = None
        self.img_size = engine.info.img_size
        self.model_choice = ModelChoice(engine.info.model_name, engine.info.model_name)

    @classmethod
    def from_pretrained(cls, model: str = "tinysam", *, engine: str = "torch", precision: str = "fp32",
                        device: str = "auto", threads: int | None = None,
                        cache_bytes: int = DEFAULT_CACHE_BYTES, store: EmbeddingStore | None = None,
                        **options) -> TinySamPredictor:
        """`model`: a registered name, a checkpoint path, or "auto" (see `policy.resolve_model`; the choice and
        any fallback note are in `model_choice`)."""
        return cls.from_options(EngineOptions(str(model), engine, precision, device, threads),
                                cache_bytes=cache_bytes, store=store, **options)

    @classmethod
    def from_options(cls, options: EngineOptions, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                     store: EmbeddingStore | None = None, **engine_options) -> TinySamPredictor:
        resolved, choice = options.resolved()
        predictor = cls(create_engine(resolved.model, engine=resolved.engine, precision=resolved.precision,
                                      device=resolved.device, threads=resolved.threads, **engine_options),
                        cache_bytes=cache_bytes, store=store)
        predictor.model_choice = choice
        return predictor

    @property
    def model_name(self) -> str:
        return self.engine.info.model_name

    @property
    def model_version(self) -> str:
        return self.engine.info.model_version

    # ----------------------------------------------------------------- images
    def preprocess(self, image: np.ndarray) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pillow's antialiased bilinear resize of the uint8 image (bit-exact with the reference),
        normalisation, zero padding to the square input."""
        return to_model_input(image, self.img_size)

    def embed(self, image, image_format: str = "RGB", key: str | None = None,
              cache: bool = True) -> ImageEmbedding:
        """Embedding of `image` (array, PIL image, path or bytes), from the cache when possible.

        `cache=False` for images seen once (batch runs), so they don't evict interactive ones.
        """
        if key is not None and cache:
            hit = self.cached(key)
            if hit is not None:
                return hit
        if isinstance(image, np.ndarray):
            rgb = to_rgb_uint8(image, image_format)
        else:
            rgb = load_image(image)
        if key is not None:
            cache_key = f"user:{key}"
        elif cache:
            cache_key = f"content:{content_key(rgb)}"
            hit = self.cache.get(cache_key) or self._from_store(cache_key)
            if hit is not None:
                return hit
        else:
            cache_key = "uncached"
        tensor, input_size = self.preprocess(rgb)
        emb = self.engine.encode(tensor)
        item = ImageEmbedding(cache_key, emb, (rgb.shape[0], rgb.shape[1]), input_size,
                              self.engine.embedding_nbytes(emb))
        if cache:
            self.cache.put(item)
            if self.store is not None:
                array = emb.float().cpu().numpy() if isinstance(emb, torch.Tensor) else np.asarray(emb)
                self.store.put(self.model_version, cache_key, array, item.original_size, input_size)
        return item

    def _from_store(self, cache_key: str) -> ImageEmbedding | None:
        """An embedding from the persistent store, as the engine's own type, also put in the memory cache."""
        if self.store is None:
            return None
        stored = self.store.get(self.model_version, cache_key)
        if stored is None:
            return None
        array = stored.embedding.astype(np.float32)
        if self.engine.info.engine == "torch":
            emb = torch.from_numpy(array).to(self.engine.device, self.engine.dtype)
        else:
            emb = array
        item = ImageEmbedding(cache_key, emb, stored.original_size, stored.input_size,
                              self.engine.embedding_nbytes(emb))
        self.cache.put(item)
        return item

    def has_embedding(self, key: str | None = None, image=None, image_format: str = "RGB") -> bool:
        """Whether an embedding of the caller's `key` (or of `image`'s content) is in memory or in the store,
        without loading or encoding anything."""
        if key is not None:
            cache_key = f"user:{key}"
        else:
            rgb = to_rgb_uint8(image, image_format) if isinstance(image, np.ndarray) else load_image(image)
            cache_key = f"content:{content_key(rgb)}"
        if cache_key in self.cache:
            return True
        return self.store is not None and (self.model_version, cache_key) in self.store

    def cached(self, key: str) -> ImageEmbedding | None:
        """The embedding stored under the caller's `key` by an earlier `embed(..., key=key)`, if still cached
        (so a caller can skip fetching an image whose embedding it already has)."""
        return self.cache.get(f"user:{key}") or self._from_store(f"user:{key}")

    def set_image(self, image, image_format: str = "RGB", key: str | None = None) -> ImageEmbedding:
        self.current = self.embed(image, image_format, key)
        return self.current

    def reset_image(self) -> None:
        self.current = None

    def _state(self, image_embedding: ImageEmbedding | None) -> ImageEmbedding:
        state = image_embedding or self.current
        if state is None:
            raise PromptError("no image set: call set_image() before predict()")
        return state

    # ---------------------------------------------------------------- prompts
    @staticmethod
    def transform_coords(coords: np.ndarray, state: ImageEmbedding) -> np.ndarray:
        """Original pixels → resized frame (float64 scale, then float32, as the reference does)."""
        (h, w), (nh, nw) = state.original_size, state.input_size
        out = np.array(coords, dtype=np.float64, copy=True)
        out[..., 0] = out[..., 0] * (nw / w)
        out[..., 1] = out[..., 1] * (nh / h)
        return out.astype(np.float32)

    def _check_points(self, coords, labels, state: ImageEmbedding, batched: bool):
        pts = _as_float_array(coords, "point_coords")
        want = 3 if batched else 2
        if pts.ndim != want or pts.shape[-1] != 2:
            shape = "(B, N, 2)" if batched else "(N, 2)"
            raise PromptError(f"point_coords must have shape {shape}, got {pts.shape}")
        if pts.shape[-2] == 0:
            raise PromptError("point_coords is empty")
        if labels is None:
            raise PromptError("point_labels are required with point_coords (1 = foreground, 0 = background)")
        lab = _as_float_array(labels, "point_labels")
        if lab.shape != pts.shape[:-1]:
            raise PromptError(f"point_labels shape {lab.shape} does not match point_coords {pts.shape[:-1]}")
        bad = ~np.isin(lab, (0, 1))
        if bad.any():
            raise PromptError(f"point_labels must be 0 (background) or 1 (foreground), got {lab[bad][0]:g}")
        h, w = state.original_size
        outside = (pts[..., 0] < 0) | (pts[..., 0] > w) | (pts[..., 1] < 0) | (pts[..., 1] > h)
        if outside.any():
            x, y = pts[outside][0]
            raise PromptError(f"point ({x:g}, {y:g}) is outside the {w}×{h} image")
        return pts, lab

    def _check_boxes(self, boxes, state: ImageEmbedding, batched: bool) -> np.ndarray:
        arr = _as_float_array(boxes, "box")
        if batched:
            if arr.ndim != 2 or arr.shape[1] != 4:
                raise PromptError(f"boxes must have shape (B, 4), got {arr.shape}")
        else:
            if arr.size != 4:
                raise PromptError(f"box must be 4 numbers x0, y0, x1, y1, got shape {arr.shape}")
            arr = arr.reshape(1, 4)
        h, w = state.original_size
        for x0, y0, x1, y1 in arr:
            if x1 < x0 or y1 < y0:
                raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) must have x0 <= x1 and y0 <= y1")
            if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
                raise PromptError(f"box ({x0:g}, {y0:g}, {x1:g}, {y1:g}) is outside the {w}×{h} image")
        return arr

    def _check_mask_input(self, mask_input, batch: int) -> torch.Tensor:
        arr = _as_float_array(mask_input, "mask_input").astype(np.float32)
        s = self.engine.info.low_res_size
        if arr.shape[-2:] != (s, s):
            raise PromptError(f"mask_input must be low-resolution logits of shape (1, {s}, {s}), got {arr.shape}")
        arr = arr.reshape(-1, 1, s, s)
        if arr.shape[0] == 1 and batch > 1:
            arr = np.repeat(arr, batch, axis=0)
        if arr.shape[0] != batch:
            raise PromptError(f"mask_input has {arr.shape[0]} masks for {batch} prompts")
        return torch.from_numpy(arr)

    def prepare_prompts(self, state: ImageEmbedding, point_coords=None, point_labels=None, boxes=None,
                        mask_input=None, batched: bool = False):
        """Validate user prompts and map them into the model's input frame."""
        if point_coords is None and point_labels is not None:
            raise PromptError("point_labels given without point_coords")
        if point_coords is None and boxes is None and mask_input is None:
            raise PromptError("empty prompt: give at least one point, a box or a mask_input")
        coords_t = labels_t = boxes_t = None
        batch = None
        if point_coords is not None:
            pts, lab = self._check_points(point_coords, point_labels, state, batched)
            pts = pts if batched else pts[None]
            lab = lab if batched else lab[None]
            coords_t = torch.from_numpy(self.transform_coords(pts, state))
            labels_t = torch.from_numpy(lab.astype(np.float32))
            batch = pts.shape[0]
        if boxes is not None:
            arr = self._check_boxes(boxes, state, batched)
            if batch is not None and arr.shape[0] != batch:
                raise PromptError(f"{arr.shape[0]} boxes but {batch} point sets")
            boxes_t = torch.from_numpy(self.transform_coords(arr.reshape(-1, 2, 2), state).reshape(-1, 4))
            batch = arr.shape[0]
        mask_t = self._check_mask_input(mask_input, batch or 1) if mask_input is not None else None
        return coords_t, labels_t, boxes_t, mask_t

    # --------------------------------------------------------------- decoding
    def decode(self, state: ImageEmbedding, coords=None, labels=None, boxes=None, mask_input=None,
               tokens=ALL_TOKENS, keep_on_device: bool = False):
        """Input-frame prompts → (low-res logits (B, K, s, s), IoU predictions (B, K)) of the mask tokens
        chosen by `tokens` (see `runtime.base`; default all four), on the engine's device with
        `keep_on_device`."""
        return self.engine.decode(state.embedding, coords, labels, boxes, mask_input, tokens,
                                  keep_on_device=keep_on_device)

    def _decode_prompts(self, image_embedding, point_coords, point_labels, boxes, mask_input, batched=False,
                        tokens=ALL_TOKENS):
        """Validated user prompts → (state, low-res logits of the chosen tokens, their IoU predictions)."""
        state = self._state(image_embedding)
        prompts = self.prepare_prompts(state, point_coords, point_labels, boxes, mask_input, batched=batched)
        return (state, *self.decode(state, *prompts, tokens=tokens))

    def iter_upsampled(self, low_res: torch.Tensor, state: ImageEmbedding,
                       pixel_budget: int = UPSAMPLE_PIXEL_BUDGET) -> Iterator[tuple[int, torch.Tensor]]:
        """Full-resolution logits of (K, s, s) low-res logits, in chunks bounded in memory.

        Same two bilinear steps as the reference: to the padded input size, crop, to the original size.
        """
        h, w = state.original_size
        per_mask = max(h * w, self.img_size * self.img_size)
        step = max(1, pixel_budget // per_mask)
        for start in range(0, low_res.shape[0], step):
            yield start, resize_logits(low_res[start : start + step], self.img_size, state.input_size,
                                       state.original_size)

    def upsample_logits(self, low_res: torch.Tensor, state: ImageEmbedding) -> torch.Tensor:
        h, w = state.original_size
        out = torch.empty((low_res.shape[0], h, w), dtype=torch.float32)
        for start, chunk in self.iter_upsampled(low_res, state):
            out[start : start + chunk.shape[0]] = chunk
        return out

    def masks_from_low_res(self, low_res: torch.Tensor, state: ImageEmbedding) -> np.ndarray:
        """(K, s, s) logits → (K, H, W) bool masks of the original image, equal to thresholding
        `upsample_logits` but interpolating only where a mask can be true."""
        h, w = state.original_size
        out = np.empty((low_res.shape[0], h, w), dtype=bool)
        for logits, mask in zip(low_res, out):
            mask_from_low_res(logits, self.img_size, state.input_size, state.original_size,
                              0.0, out=mask)
        return out

    def _finish(self, low_res, iou, state, return_logits):
        b, k = iou.shape
        flat = low_res.reshape(b * k, *low_res.shape[-2:])
        if return_logits:
            masks = self.upsample_logits(flat, state).numpy()
        else:
            masks = self.masks_from_low_res(flat, state)
        return masks.reshape(b, k, *masks.shape[-2:]), iou.numpy(), low_res.numpy()

    def predict(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                multimask_output: bool = True, return_logits: bool = False,
                image_embedding: ImageEmbedding | None = None):
        """One prompt → (masks (K, H, W) bool, predicted IoUs (K,), low-res logits (K, s, s)); K = 3 or 1."""
        state, low_res, iou = self._decode_prompts(image_embedding, point_coords, point_labels, box, mask_input,
                                                   tokens=_tokens(multimask_output))
        masks, scores, logits = self._finish(low_res, iou, state, return_logits)
        return masks[0], scores[0], logits[0]

    def predict_best(self, point_coords=None, point_labels=None, box=None, mask_input=None,
                     image_embedding: ImageEmbedding | None = None) -> tuple[np.ndarray, float]:
        """The mask with the highest predicted IoU of the three, and that IoU (only it is made)."""
        state, low_res, iou = self._decode_prompts(image_embedding, point_coords, point_labels, box, mask_input,
                                                   tokens=(BEST_MULTIMASK,))
        return self.masks_from_low_res(low_res[0], state)[0], float(iou[0, 0])

    def predict_batch(self, point_coords=None, point_labels=None, boxes=None, mask_input=None,
                      multimask_output: bool = True, return_logits: bool = False,
                      image_embedding: ImageEmbedding | None = None):
        """B prompts (point sets (B, N, 2) and/or boxes (B, 4)) in one decoder call →
        masks (B, K, H, W), IoUs (B, K), low-res logits (B, K, s, s)."""
        state, low_res, iou = self._decode_prompts(image_embedding, point_coords, point_labels, boxes, mask_input,
                                                   batched=True, tokens=_tokens(multimask_output))
        return self._finish(low_res, iou, state, return_logits)

    # ------------------------------------------------------------ one answer per prompt
    def segment_logits(self, point_coords=None, point_labels=None, box=None,
                       image_embedding: ImageEmbedding | None = None) -> tuple[torch.Tensor, float]:
        """The low-resolution logits (1, s, s) of the mask that answers one prompt, and its raw predicted IoU.

        Which mask answers is `policy.prompt_tokens`: the best of three for a single click, SAM's single-mask
        output for several clicks or a box. `masks_from_low_res` turns the logits into the full mask.
        """
        n_points = 0 if point_coords is None else int(np.asarray(point_coords).reshape(-1, 2).shape[0])
        state, low_res, iou = self._decode_prompts(image_embedding, point_coords, point_labels, box, None,
                                                   tokens=prompt_tokens(n_points, box is not None))
        return low_res[0], float(iou[0, 0])

    def segment(self, point_coords=None, point_labels=None, box=None,
                image_embedding: ImageEmbedding | None = None) -> tuple[np.ndarray, float, float]:
        """One prompt → (full-resolution bool mask, score in [0, 1], raw predicted IoU): what every front end
        answers a click or a box with."""
        state = self._state(image_embedding)
        low_res, iou = self.segment_logits(point_coords, point_labels, box, image_embedding=state)
        return self.masks_from_low_res(low_res, state)[0], report_score(iou), iou

    def segment_batch(self, point_coords=None, point_labels=None, boxes=None,
                      image_embedding: ImageEmbedding | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """B prompts of one shape (point sets (B, N, 2) and/or boxes (B, 4)) in one decoder call, each answered
        as `segment` answers it alone → masks (B, H, W), scores in [0, 1] (B,), raw predicted IoUs (B,)."""
        n_points = 0 if point_coords is None else int(np.asarray(point_coords).shape[-2])
        state, low_res, iou = self._decode_prompts(image_embedding, point_coords, point_labels, boxes, None,
                                                   batched=True, tokens=prompt_tokens(n_points, boxes is not None))
        raw = iou[:, 0].numpy().astype(np.float64)
        masks = self.masks_from_low_res(low_res[:, 0], state)
        return masks, np.array([report_score(v) for v in raw]), raw


def _tokens(multimask_output: bool) -> tuple[int, ...]:
    return MULTIMASK_TOKENS if multimask_output else SINGLE_MASK_TOKENS
