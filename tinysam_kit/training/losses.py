"""Mask losses of SAM (focal + dice, MSE on the IoU head) and TinySAM's distillation terms."""

from __future__ import annotations

import torch
import torch.nn.functional as F

FOCAL_WEIGHT = 20.0  # SAM's 20:1 focal:dice ratio
DICE_WEIGHT = 1.0


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask sigmoid focal loss averaged over pixels: (...,H,W) → (...)."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    prob = logits.sigmoid().flatten(-2)
    target = target.flatten(-2)
    inter = (prob * target).sum(-1)
    return 1 - (2 * inter + eps) / (prob.sum(-1) + target.sum(-1) + eps)


def mask_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SAM's segmentation loss per mask; `target` may be soft (teacher probabilities)."""
    return FOCAL_WEIGHT * focal_loss(logits, target) + DICE_WEIGHT * dice_loss(logits, target)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of the thresholded logits with a binary target, per mask (no gradient)."""
    with torch.no_grad():
        pred = (logits > 0).flatten(-2)
        tgt = (target > 0.5).flatten(-2)
        inter = (pred & tgt).sum(-1).float()
        union = (pred | tgt).sum(-1).float()
        return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def prompt_loss(logits: torch.Tensor, iou_pred: torch.Tensor, target: torch.Tensor,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of all four mask tokens for a batch of prompts, as the demo and teachers are trained.

    logits (P, 4, H, W) at the target's resolution, iou_pred (P, 4), target (P, H, W) in [0, 1].
    Token 0 (single-mask output) is always supervised; of the three multimask tokens only the best
    one is (SAM's ambiguity-aware minimum), and the IoU head learns the true IoU of every token.
    `weights` (P,) reweights prompts, e.g. TinySAM's hard-mask weighting.
    """
    tgt = target[:, None].expand_as(logits)
    per_token = mask_loss(logits, tgt)  # (P, 4)
    seg = per_token[:, 0] + per_token[:, 1:].min(dim=1).values
    actual = mask_iou(logits, tgt)
    iou = F.mse_loss(iou_pred.float(), actual, reduction="none").mean(1)
    total = seg + iou
    if weights is not None:
        total = total * weights
    loss = total.mean()
    return loss, {"seg": float(seg.detach().mean()), "iou_head": float(iou.detach().mean()),
                  "miou": float(actual[:, 1:].max(dim=1).values.mean())}


def hard_mask_weights(student_logits: torch.Tensor, teacher_logits: torch.Tensor, floor: float = 1.0,
                      gain: float = 2.0) -> torch.Tensor:
    """TinySAM's hard-mask weighting: prompts where the student's mask differs most from the teacher's
    (low IoU) weigh more. Returns (P,) weights with mean 1, no gradient."""
    with torch.no_grad():
        iou = mask_iou(student_logits, (teacher_logits > 0).float())
        w = floor + gain * (1 - iou)
        return w / w.mean().clamp(min=1e-6)
