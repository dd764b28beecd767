"""Turning images, targets and prompts into network inputs, and running prompt groups through a model."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tinysam_kit.data.preprocess import PIXEL_MEAN, PIXEL_STD
from tinysam_kit.models.mask_decoder import best_multimask_token
from tinysam_kit.models.sam import TinySam
from tinysam_kit.training.prompts import correction_click, jitter_box, sample_point

_MEAN = torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(PIXEL_STD).view(1, 3, 1, 1)


def normalize_images(images: list[np.ndarray], img_size: int) -> torch.Tensor:
    """Square uint8 RGB images of the model's input size → normalised NCHW float tensor."""
    for im in images:
        if im.shape[:2] != (img_size, img_size):
            raise ValueError(f"training images must be {img_size}×{img_size}, got {im.shape[1]}×{im.shape[0]}")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()
    return (x - _MEAN) / _STD


@dataclass
class PromptGroup:
    """Prompts of one kind (same number of points, with or without a box), one target each."""

    image_index: torch.Tensor  # (P,) which image of the batch
    targets: torch.Tensor  # (P, H, W) float in [0, 1]
    coords: torch.Tensor | None = None  # (P, N, 2) input-frame pixels
    labels: torch.Tensor | None = None  # (P, N)
    boxes: torch.Tensor | None = None  # (P, 4)
    mask_input: torch.Tensor | None = None  # (P, 1, s, s) logits of the previous round

    def __len__(self) -> int:
        return int(self.image_index.shape[0])

    def to(self, device: torch.device) -> PromptGroup:
        def mv(t):
            return None if t is None else t.to(device)

        return PromptGroup(mv(self.image_index), mv(self.targets), mv(self.coords), mv(self.labels),
                           mv(self.boxes), mv(self.mask_input))


def decode_group(model: TinySam, embeddings: torch.Tensor, group: PromptGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Low-res logits (P, 4, s, s) and IoU predictions (P, 4) of a prompt group."""
    emb = embeddings[group.image_index]
    return model.decode(emb, group.coords, group.labels, group.boxes, group.mask_input)


def upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits, (size, size), mode="bilinear", align_corners=False)


def resize_targets(targets: torch.Tensor, size: int) -> torch.Tensor:
    """(P, H, W) binary targets → (P, size, size) pixel coverage in [0, 1] (area average): the loss
    resolution can be below the image's without losing sub-pixel boundary positions."""
    if targets.shape[-1] == size:
        return targets
    if targets.shape[-1] % size == 0:
        return F.avg_pool2d(targets[:, None], targets.shape[-1] // size)[:, 0]
    return F.interpolate(targets[:, None], (size, size), mode="area")[:, 0]


def initial_groups(rng: np.random.Generator, targets_per_image: list[list[np.ndarray]], box_fraction: float,
                   size: int) -> list[PromptGroup]:
    """One click or one jittered box per target; returns the point group and the box group (if any)."""
    points, boxes = [], []
    for i, targets in enumerate(targets_per_image):
        for t in targets:
            if rng.random() < box_fraction:
                ys, xs = np.nonzero(t)
                box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float32)
                boxes.append((i, t, jitter_box(rng, box, t.shape)))
            else:
                points.append((i, t, sample_point(rng, t)))
    groups = []
    if points:
        groups.append(PromptGroup(
            torch.tensor([p[0] for p in points]), torch.from_numpy(np.stack([p[1] for p in points])).float(),
            coords=torch.tensor([[p[2]] for p in points], dtype=torch.float32),
            labels=torch.ones((len(points), 1))))
    if boxes:
        groups.append(PromptGroup(
            torch.tensor([b[0] for b in boxes]), torch.from_numpy(np.stack([b[1] for b in boxes])).float(),
            boxes=torch.from_numpy(np.stack([b[2] for b in boxes]))))
    return groups


def refinement_group(rng: np.random.Generator, group: PromptGroup, logits: torch.Tensor,
                     iou_pred: torch.Tensor, fraction: float = 1.0) -> PromptGroup | None:
    """SAM's next interactive round: the previous prompts plus a corrective click on the error of the
    mask the user would have seen (highest predicted IoU), with that mask's logits as mask input.

    `fraction` < 1 continues only a random subset of the prompts (cheaper; None if none is drawn).
    """
    keep = np.nonzero(rng.random(len(group)) < fraction)[0]
    if len(keep) == 0:
        return None
    if len(keep) < len(group):
        sel = torch.from_numpy(keep)
        group = PromptGroup(group.image_index[sel], group.targets[sel],
                            None if group.coords is None else group.coords[sel],
                            None if group.labels is None else group.labels[sel],
                            None if group.boxes is None else group.boxes[sel],
                            None if group.mask_input is None else group.mask_input[sel])
        logits, iou_pred = logits[sel.to(logits.device)], iou_pred[sel.to(iou_pred.device)]
    with torch.no_grad():
        best = best_multimask_token(iou_pred)
        low = logits[torch.arange(len(best)), best].detach().float()
        size = group.targets.shape[-1]
        pred = (upsample(low[:, None], size)[:, 0] > 0).cpu().numpy()
    targets = group.targets.cpu().numpy() > 0.5
    clicks, labels = [], []
    for p, t in zip(pred, targets):
        c = correction_click(rng, p, t)
        if c is None:  # already perfect: repeat a positive click inside the target
            c = (sample_point(rng, t), 1)
        clicks.append(c[0])
        labels.append(c[1])
    new_coords = torch.tensor(clicks, dtype=torch.float32)[:, None]
    new_labels = torch.tensor(labels, dtype=torch.float32)[:, None]
    if group.coords is not None:
        coords = torch.cat([group.coords.cpu(), new_coords], dim=1)
        lab = torch.cat([group.labels.cpu(), new_labels], dim=1)
    else:
        coords, lab = new_coords, new_labels
    return PromptGroup(group.image_index.cpu(), group.targets.cpu(), coords, lab,
                       None if group.boxes is None else group.boxes.cpu(), low[:, None].cpu())
