"""Segment everything: SAM's dense point grid and TinySAM's hierarchical (sparse-then-fill) strategy.

Memory stays bounded: candidates are first filtered on their predicted IoU (no full-resolution work for
them), the stability score of the survivors is computed from pixel counts of the windows where their
full-resolution masks can be true (no full-size logits), only the masks that pass are made, and every kept
mask is stored as a run-length encoding right away. Only the final records are decoded to full masks.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields

import numpy as np
import torch

from tinysam_kit.data.images import load_image, to_rgb_uint8
from tinysam_kit.inference import device_masks
from tinysam_kit.inference.encodings.coco import (
    masks_to_uncompressed_rle,
    rle_area,
    to_coco_rle,
    uncompressed_rle_to_mask,
)
from tinysam_kit.inference.nms import masks_to_boxes, single_class_nms
from tinysam_kit.inference.policy import everything_params, keep_record, postprocess_on_device
from tinysam_kit.inference.predictor import (
    MULTIMASK_TOKENS,
    UPSAMPLE_PIXEL_BUDGET,
    ImageEmbedding,
    PromptError,
    TinySamPredictor,
)
from tinysam_kit.inference.upsampling import FullResolution, resize_logits, whole_resize_is_cheap

MODES = ("hierarchical", "dense")
OUTPUT_MODES = ("binary_mask", "coco_rle", "uncompressed_rle")


@dataclass
class EverythingParams:
    """Defaults are those of TinySAM's hierarchical generator and SAM's automatic mask generator."""

    points_per_side: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    high_score_thresh: float = 8.5  # hierarchical only: logit above which stage 1 counts a pixel as covered
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    crop_n_layers: int = 0  # dense only: extra layers of overlapping image crops, as in SAM
    crop_nms_thresh: float = 0.7
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 1
    min_mask_region_area: int = 0
    max_masks: int | None = None  # keep only the best-scoring records (None: all)
    output_mode: str = "binary_mask"
    # drop masks covering more than this fraction of the image (None: keep all, as SAM does)
    max_area_fraction: float | None = None

    def validate(self) -> None:
        if self.points_per_side < 2:
            raise ValueError(f"points_per_side must be at least 2, got {self.points_per_side}")
        if self.points_per_batch < 1:
            raise ValueError(f"points_per_batch must be positive, got {self.points_per_batch}")
        for name in ("pred_iou_thresh", "stability_score_thresh", "box_nms_thresh", "crop_nms_thresh"):
            value = getattr(self, name)
            if not np.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        if self.crop_n_layers < 0 or self.crop_n_points_downscale_factor < 1:
            raise ValueError("crop_n_layers must be >= 0 and crop_n_points_downscale_factor >= 1")
        if self.min_mask_region_area < 0:
            raise ValueError(f"min_mask_region_area must be >= 0, got {self.min_mask_region_area}")
        if self.max_area_fraction is not None and not 0.0 < self.max_area_fraction <= 1.0:
            raise ValueError(f"max_area_fraction must be in (0, 1] or None, got {self.max_area_fraction}")
        if self.max_masks is not None and self.max_masks < 1:
            raise ValueError(f"max_masks must be positive or None, got {self.max_masks}")
        if self.output_mode not in OUTPUT_MODES:
            raise ValueError(f"output_mode must be one of {', '.join(OUTPUT_MODES)}, got {self.output_mode!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> EverythingParams:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown everything-mode parameter(s): {', '.join(unknown)}")
        params = cls(**kwargs)
        params.validate()
        return params


@dataclass
class Candidates:
    """Masks that passed the IoU and stability filters, kept as RLE plus what NMS and records need."""

    rles: list[dict] = field(default_factory=list)
    boxes: list[torch.Tensor] = field(default_factory=list)
    iou: list[torch.Tensor] = field(default_factory=list)
    stability: list[torch.Tensor] = field(default_factory=list)
    points: list[np.ndarray] = field(default_factory=list)
    crop_boxes: list[list[int]] = field(default_factory=list)  # XYXY crop each mask came from

    def extend(self, other: Candidates) -> None:
        self.rles += other.rles
        self.boxes += other.boxes
        self.iou += other.iou
        self.stability += other.stability
        self.points += other.points
        self.crop_boxes += other.crop_boxes

    def subset(self, keep: torch.Tensor) -> Candidates:
        boxes, iou, stability, points = self.tensors()
        idx = keep.tolist()
        return Candidates([self.rles[i] for i in idx], [boxes[keep]], [iou[keep]], [stability[keep]],
                          [points[keep.numpy()]], [self.crop_boxes[i] for i in idx])

    def __len__(self) -> int:
        return len(self.rles)

    def tensors(self):
        boxes = torch.cat(self.boxes) if self.boxes else torch.zeros((0, 4), dtype=torch.int64)
        iou = torch.cat(self.iou) if self.iou else torch.zeros((0,))
        stability = torch.cat(self.stability) if self.stability else torch.zeros((0,))
        points = np.concatenate(self.points) if self.points else np.zeros((0, 2))
        return boxes, iou, stability, points


def build_point_grid(n: int) -> np.ndarray:
    """n×n points at cell centres in [0, 1]², row by row (x varies fastest)."""
    offset = 1 / (2 * n)
    side = np.linspace(offset, 1 - offset, n)
    xs = np.tile(side[None, :], (n, 1))
    ys = np.tile(side[:, None], (1, n))
    return np.stack([xs, ys], axis=-1).reshape(-1, 2)


def generate_crop_boxes(height: int, width: int, n_layers: int, overlap_ratio: float) -> list[tuple[list[int], int]]:
    """SAM's crops: the whole image, then 2^k × 2^k overlapping crops for each layer k = 1..n_layers."""
    crops = [([0, 0, width, height], 0)]
    short = min(height, width)
    for layer in range(n_layers):
        n = 2 ** (layer + 1)
        overlap = int(overlap_ratio * short * (2 / n))
        crop_w = int(np.ceil((overlap * (n - 1) + width) / n))
        crop_h = int(np.ceil((overlap * (n - 1) + height) / n))
        xs = [int((crop_w - overlap) * i) for i in range(n)]
        ys = [int((crop_h - overlap) * i) for i in range(n)]
        for x0 in xs:
            for y0 in ys:
                crops.append(([x0, y0, min(x0 + crop_w, width), min(y0 + crop_h, height)], layer + 1))
    return crops


def boxes_near_crop_edge(boxes: torch.Tensor, crop_box: list[int], full_box: list[int], atol: float = 20.0):
    """Masks cut by a crop border (but not by the image border) are incomplete: SAM drops them."""
    crop = torch.as_tensor(crop_box, dtype=torch.float)
    full = torch.as_tensor(full_box, dtype=torch.float)
    offset = torch.as_tensor([crop_box[0], crop_box[1], crop_box[0], crop_box[1]])
    boxes = (boxes + offset).float()
    near_crop = torch.isclose(boxes, crop[None, :], atol=atol, rtol=0)
    near_image = torch.isclose(boxes, full[None, :], atol=atol, rtol=0)
    return torch.any(near_crop & ~near_image, dim=1)


def stage2_points(stage1_normalized: np.ndarray, covered: np.ndarray, points_per_side: int) -> np.ndarray:
    """TinySAM's stage-2 proposals around every stage-1 point, dropped where stage 1 is confident."""
    h, w = covered.shape
    sw, sh = w // points_per_side, h // points_per_side
    out = []

    def propose(x: float, y: float) -> None:
        if not covered[int(y), int(x)]:
            out.append([x / w, y / h])

    for nx, ny in stage1_normalized:
        px, py = nx * w, ny * h
        for a in (-1, 0, 1):
            for b in (-1, 0, 1):
                if a or b:
                    propose(px + a * sw, py + b * sh)
        right = px + 2 * sw < w
        below = py + 2 * sh < h
        if right:
            for b in (-1, 0, 1):
                propose(px + 2 * sw, py + b * sh)
        if below:
            for a in (-1, 0, 1):
                propose(px + a * sw, py + 2 * sh)
        if right and below:
            propose(px + 2 * sw, py + 2 * sh)
    return np.array(out, dtype=np.float64).reshape(-1, 2)


class HostMasks:
    """The host path's mask operations (NumPy masks), named as their device counterparts in `device_masks`."""

    masks_to_boxes = staticmethod(masks_to_boxes)
    masks_to_uncompressed_rle = staticmethod(masks_to_uncompressed_rle)

    @staticmethod
    def masks_per_chunk(img_size: int, original_size: tuple[int, int]) -> int:
        return max(1, UPSAMPLE_PIXEL_BUDGET // (original_size[0] * original_size[1]))

    @staticmethod
    def pad_to(masks: np.ndarray, keep: torch.Tensor, full_size: tuple[int, int], x0: int, y0: int) -> np.ndarray:
        kept = masks[keep.numpy()]
        out = np.zeros((kept.shape[0], *full_size), dtype=bool)
        out[:, y0 : y0 + kept.shape[1], x0 : x0 + kept.shape[2]] = kept
        return out

    @staticmethod
    def coverage_map(size: tuple[int, int], info) -> np.ndarray:
        return np.zeros(size, dtype=bool)

    @staticmethod
    def on_host(coverage: np.ndarray) -> np.ndarray:
        return coverage


class EverythingGenerator:
    """Automatic mask generation on top of a `TinySamPredictor` (any engine).

    `postprocess`: where masks are made from the decoder's logits — `auto` (on the engine's device when it is
    an accelerator, see `policy.postprocess_on_device`), `host`, or `device`.
    """

    def __init__(self, predictor: TinySamPredictor, mode: str = "hierarchical", *, postprocess: str = "auto",
                 **params) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.predictor = predictor
        self.mode = mode
        self.params = EverythingParams.from_kwargs(**everything_params(predictor.engine.info.model_name, params))
        self.on_device = postprocess_on_device(predictor.engine.info, postprocess)
        self.masks = device_masks if self.on_device else HostMasks
        self.stats: dict = {}

    # ------------------------------------------------------------- stages
    def _process_points(self, state: ImageEmbedding, normalized: np.ndarray, union: np.ndarray | None,
                        crop_box: list[int] | None = None, full_size: tuple[int, int] | None = None) -> Candidates:
        """Decode single positive points in batches; keep filtered masks as RLE; OR confident pixels into
        `union` when given. With a crop, `state` is the crop's embedding and results are mapped back to
        the `full_size` image."""
        p = self.params
        h, w = state.original_size
        full_h, full_w = full_size or (h, w)
        crop_box = crop_box or [0, 0, w, h]
        is_crop = crop_box != [0, 0, full_w, full_h]
        x0, y0 = crop_box[0], crop_box[1]
        points = normalized * np.array([[w, h]])
        out = Candidates()
        for start in range(0, len(points), p.points_per_batch):
            batch = points[start : start + p.points_per_batch]
            coords = torch.from_numpy(self.predictor.transform_coords(batch, state))[:, None, :]
            labels = torch.ones((len(batch), 1), dtype=torch.float32)
            low_res, iou = self.predictor.decode(state, coords, labels, tokens=MULTIMASK_TOKENS,
                                                 keep_on_device=self.on_device)
            self.stats["prompts_decoded"] += len(batch)
            k = iou.shape[1]
            low_res = low_res.reshape(-1, *low_res.shape[-2:])
            iou = iou.reshape(-1).cpu()
            batch_points = np.repeat(batch, k, axis=0) + np.array([[x0, y0]])
            keep = iou > p.pred_iou_thresh if p.pred_iou_thresh > 0.0 else torch.ones_like(iou, dtype=torch.bool)
            keep_idx = keep.nonzero().flatten()
            if keep_idx.numel() == 0:
                continue
            low_res, iou, batch_points = (low_res[keep_idx.to(low_res.device)], iou[keep_idx],
                                          batch_points[keep_idx.numpy()])
            # masks of a chunk are full-size: bound their number by the pixel budget
            chunk = self.masks.masks_per_chunk(self.predictor.img_size, (h, w))
            for first in range(0, len(low_res), chunk):
                sel = slice(first, first + chunk)
                stability, masks = self._full_resolution(low_res[sel], state, union)
                ok = stability >= p.stability_score_thresh if p.stability_score_thresh > 0.0 else \
                    torch.ones_like(stability, dtype=torch.bool)
                if not ok.any():
                    continue
                boxes = self.masks.masks_to_boxes(masks)
                chunk_iou, chunk_stab, chunk_pts = iou[sel][ok], stability[ok], batch_points[sel][ok.numpy()]
                if is_crop:
                    edge = boxes_near_crop_edge(boxes, crop_box, [0, 0, full_w, full_h])
                    if edge.all():
                        continue
                    inside = ~edge
                    boxes = boxes[inside] + torch.as_tensor([x0, y0, x0, y0])
                    chunk_iou, chunk_stab, chunk_pts = chunk_iou[inside], chunk_stab[inside], chunk_pts[inside.numpy()]
                    masks = self.masks.pad_to(masks, inside, (full_h, full_w), x0, y0)
                out.rles += self.masks.masks_to_uncompressed_rle(masks)
                out.boxes.append(boxes)
                out.iou.append(chunk_iou)
                out.stability.append(chunk_stab)
                out.points.append(chunk_pts)
                out.crop_boxes += [list(crop_box)] * masks.shape[0]
        return out

    def _full_resolution(self, low_res: torch.Tensor, state: ImageEmbedding, union
                         ) -> tuple[torch.Tensor, np.ndarray | torch.Tensor]:
        """SAM's stability score of every (s, s) logit map at full resolution (IoU of its masks at ±offset),
        and the full-resolution masks of those that pass the stability filter (in order); `union` gains
        their pixels above `high_score_thresh`.

        On the device, one batched resize (`device_masks`). On the host, one batched whole resize on small
        images; otherwise each map is a `FullResolution`: compact masks are counted and made inside the
        window where they can be true, without full-size logits; ragged ones are resized whole once, as SAM
        does.
        """
        p = self.params
        img_size, input_size, (h, w) = self.predictor.img_size, state.input_size, state.original_size
        offset = p.stability_score_offset
        if self.on_device:
            return device_masks.stability_and_masks(low_res, img_size, input_size, (h, w), offset,
                                                    p.stability_score_thresh, union, p.high_score_thresh)

        def passes(score) -> bool:
            return p.stability_score_thresh <= 0.0 or bool(score >= p.stability_score_thresh)

        if whole_resize_is_cheap(img_size, input_size, (h, w)):
            flat = resize_logits(low_res, img_size, input_size, (h, w)).numpy().reshape(len(low_res), -1)
            stability = stability_score(flat, 0.0, offset)
            flat = flat[[passes(score) for score in stability]]
            if union is not None:
                union |= (flat > p.high_score_thresh).any(axis=0).reshape(h, w)
            return stability, (flat > 0.0).reshape(-1, h, w)
        floor = min(-offset, 0.0, p.high_score_thresh)
        stability = torch.zeros(len(low_res), dtype=torch.float32)
        masks = []
        for i, logits in enumerate(low_res):
            full = FullResolution(logits, img_size, input_size, (h, w), floor)
            with np.errstate(invalid="ignore", divide="ignore"):
                stability[i] = float(np.float32(full.count(offset)) / np.float32(full.count(-offset)))
            if not passes(stability[i]):
                continue
            masks.append(full.mask(0.0))
            part = None if union is None else full.above(p.high_score_thresh)
            if part is not None:
                (r0, r1), (c0, c1), values = part
                union[r0:r1, c0:c1] |= values
        return stability, np.stack(masks) if masks else np.zeros((0, h, w), dtype=bool)


    def _dense(self, image, state: ImageEmbedding) -> Candidates:
        p = self.params
        h, w = state.original_size
        crops = generate_crop_boxes(h, w, p.crop_n_layers, p.crop_overlap_ratio)
        if len(crops) > 1 and image is None:
            raise PromptError("crop layers need the image itself, not only its embedding")
        cands = Candidates()
        for crop_box, layer in crops:
            n_side = int(p.points_per_side / (p.crop_n_points_downscale_factor ** layer))
            if layer == 0:
                crop_state = state
            else:
                cx0, cy0, cx1, cy1 = crop_box
                crop_state = self.predictor.embed(np.ascontiguousarray(image[cy0:cy1, cx0:cx1]), cache=False)
            found = self._process_points(crop_state, build_point_grid(n_side), None, crop_box, (h, w))
            self.stats["candidates"] += len(found)
            if len(found):
                boxes, iou, _, _ = found.tensors()
                found = found.subset(single_class_nms(boxes.float(), iou, p.box_nms_thresh))
            cands.extend(found)
        if len(crops) > 1 and len(cands):
            # Across crops SAM prefers masks from smaller crops (scores = 1 / crop area).
            boxes, _, _, _ = cands.tensors()
            areas = torch.tensor([(c[2] - c[0]) * (c[3] - c[1]) for c in cands.crop_boxes], dtype=torch.float)
            cands = cands.subset(single_class_nms(boxes.float(), 1 / areas, p.crop_nms_thresh))
        return cands

    def generate(self, image=None, *, key: str | None = None, image_embedding: ImageEmbedding | None = None,
                 image_format: str = "RGB") -> list[dict]:
        """Records for every object found: segmentation, area, bbox (XYWH), predicted_iou,
        stability_score, point_coords (+ crop_box in dense mode), best predicted IoU first."""
        t0 = time.perf_counter()
        if image is not None and not isinstance(image, np.ndarray):
            image = load_image(image)
        elif image is not None:
            image = to_rgb_uint8(image, image_format)
        if image_embedding is None:
            if image is None:
                raise PromptError("generate() needs an image or an image_embedding")
            image_embedding = self.predictor.embed(image, key=key)
        state = image_embedding
        p = self.params
        h, w = state.original_size
        self.stats = {"mode": self.mode, "prompts_decoded": 0, "candidates": 0}
        if self.mode == "dense":
            cands = self._dense(image, state)
        else:
            grid = build_point_grid(p.points_per_side // 4)
            union = self.masks.coverage_map((h, w), self.predictor.engine.info)
            stage1 = self._process_points(state, grid, union)
            extra = stage2_points(grid, self.masks.on_host(union), p.points_per_side)
            self.stats.update(stage1_points=len(grid), stage2_points=len(extra), stage1_masks=len(stage1))
            # The official code crashes when stage 1 covers every stage-2 proposal; stage 1 alone is the answer.
            cands = self._process_points(state, extra, None) if len(extra) else Candidates()
            cands.extend(stage1)
            self.stats["candidates"] = len(cands)
        records = self._records(cands, state, dense=self.mode == "dense")
        self.stats["records"] = len(records)
        self.stats["seconds"] = time.perf_counter() - t0
        return records

    # ------------------------------------------------------------ records
    def _records(self, cands: Candidates, state: ImageEmbedding, dense: bool) -> list[dict]:
        p = self.params
        h, w = state.original_size
        if not dense:  # dense candidates were NMS-ed per crop already
            boxes, iou, _, _ = cands.tensors()
            cands = cands.subset(single_class_nms(boxes.float(), iou, p.box_nms_thresh))
        boxes, iou, stability, points = cands.tensors()
        rles, crop_boxes = cands.rles, cands.crop_boxes
        if p.min_mask_region_area > 0 and rles:
            rles, boxes, keep2 = remove_small_regions_and_renms(
                rles, boxes, p.min_mask_region_area, max(p.box_nms_thresh, p.crop_nms_thresh))
            iou, stability, points = iou[keep2], stability[keep2], points[keep2.numpy()]
            crop_boxes = [crop_boxes[i] for i in keep2.tolist()]
        order = torch.sort(iou, stable=True, descending=True).indices.tolist()
        if p.max_area_fraction is not None:
            order = [i for i in order if keep_record({"area": rle_area(rles[i])}, h, w, p.max_area_fraction)]
        if p.max_masks is not None:
            order = order[: p.max_masks]
        records = []
        for i in order:
            rle = rles[i]
            x0, y0, x1, y1 = (float(v) for v in boxes[i])
            record = {
                "segmentation": self._encode(rle),
                "area": rle_area(rle),
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "predicted_iou": float(iou[i]),
                "point_coords": [points[i].tolist()],
                "stability_score": float(stability[i]),
            }
            if dense:
                cx0, cy0, cx1, cy1 = crop_boxes[i]
                record["crop_box"] = [float(cx0), float(cy0), float(cx1 - cx0), float(cy1 - cy0)]
            records.append(record)
        return records

    def _encode(self, rle: dict):
        mode = self.params.output_mode
        if mode == "uncompressed_rle":
            return rle
        if mode == "coco_rle":
            return to_coco_rle(rle)
        return uncompressed_rle_to_mask(rle)


def stability_score(logits, threshold: float, offset: float) -> torch.Tensor:
    """IoU between the masks thresholded at threshold ± offset, per row of an (N, pixels) array or an
    (N, H, W) tensor; float32 ratio of pixel counts as SAM computes it."""
    flat = logits.numpy() if isinstance(logits, torch.Tensor) else logits
    flat = flat.reshape(flat.shape[0], -1)
    inter = np.count_nonzero(flat > threshold + offset, axis=1).astype(np.float32)
    union = np.count_nonzero(flat > threshold - offset, axis=1).astype(np.float32)
    with np.errstate(invalid="ignore", divide="ignore"):
        return torch.from_numpy(inter / union)


def remove_small_regions(mask: np.ndarray, area_thresh: int, mode: str) -> tuple[np.ndarray, bool]:
    """Fill holes (mode="holes") or drop islands (mode="islands") smaller than `area_thresh` pixels."""
    import cv2

    holes = mode == "holes"
    working = (holes ^ mask).astype(np.uint8)
    n_labels, regions, stats, _ = cv2.connectedComponentsWithStats(working, 8)
    sizes = stats[:, -1][1:]
    small = [i + 1 for i, s in enumerate(sizes) if s < area_thresh]
    if not small:
        return mask, False
    fill = [0, *small]
    if not holes:
        fill = [i for i in range(n_labels) if i not in fill]
        if not fill:
            fill = [int(np.argmax(sizes)) + 1]  # keep the largest island rather than nothing
    return np.isin(regions, fill), True


def remove_small_regions_and_renms(rles: list[dict], boxes: torch.Tensor, min_area: int, nms_thresh: float):
    """SAM's post-processing: clean each mask, prefer unchanged masks in a second NMS."""
    new_masks, scores = [], []
    for rle in rles:
        mask = uncompressed_rle_to_mask(rle)
        mask, changed_holes = remove_small_regions(mask, min_area, "holes")
        mask, changed_islands = remove_small_regions(mask, min_area, "islands")
        new_masks.append(mask)
        scores.append(float(not (changed_holes or changed_islands)))
    masks = np.stack(new_masks)
    new_boxes = masks_to_boxes(masks)
    score_t = torch.as_tensor(scores)
    keep = single_class_nms(new_boxes.float(), score_t, nms_thresh)
    rles = list(rles)
    boxes = boxes.clone()
    for i in keep.tolist():
        if scores[i] == 0.0:
            rles[i] = masks_to_uncompressed_rle(masks[i : i + 1])[0]
            boxes[i] = new_boxes[i]
    return [rles[i] for i in keep.tolist()], boxes[keep], keep


def generate_everything(predictor: TinySamPredictor, image=None, mode: str = "hierarchical", *,
                        key: str | None = None, image_embedding: ImageEmbedding | None = None,
                        return_stats: bool = False, **params):
    """Segment everything in one image. See `EverythingParams` for the parameters and their defaults."""
    generator = EverythingGenerator(predictor, mode, **params)
    records = generator.generate(image, key=key, image_embedding=image_embedding)
    return (records, generator.stats) if return_stats else records
