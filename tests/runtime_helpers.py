"""Prompt sets and checks shared by the engine tests (torch and ONNX Runtime)."""

from __future__ import annotations

import torch

from tinysam_kit.runtime import BEST_MULTIMASK


def prompt_sets(size: int, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    coords = torch.rand((batch, 3, 2), generator=g) * size
    labels = torch.randint(0, 2, (batch, 3), generator=g).float()
    boxes = torch.sort(torch.rand((batch, 2, 2), generator=g) * size, dim=1).values.reshape(batch, 4)
    mask = torch.randn((batch, 1, size // 4, size // 4), generator=g) * 8
    return {
        "points": (coords, labels, None, None),
        "points_box": (coords, labels, boxes, None),
        "box": (None, None, boxes, None),
        "points_mask": (coords, labels, None, mask),
        "mask_only": (None, None, None, mask[:1]),
    }


def chosen_from_all(logits: torch.Tensor, iou: torch.Tensor, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """What a token choice must return, picked by hand from the decode of all four tokens."""
    rows = []
    for b in range(iou.shape[0]):
        picks = [1 + int(torch.argmax(iou[b, 1:])) if t == BEST_MULTIMASK else t for t in tokens]
        rows.append((logits[b, picks], iou[b, picks]))
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def assert_token_choices_match_full_decode(engine, emb, args):
    full_logits, full_iou = engine.decode(emb, *args)
    assert full_logits.shape[1] == 4
    for tokens in [(BEST_MULTIMASK,), (0,), (1, 2, 3), (3, BEST_MULTIMASK, 0)]:
        logits, iou = engine.decode(emb, *args, tokens=tokens)
        want_logits, want_iou = chosen_from_all(full_logits, full_iou, tokens)
        assert logits.shape == want_logits.shape and iou.shape == want_iou.shape == (full_iou.shape[0], len(tokens))
        assert torch.allclose(logits, want_logits, atol=1e-4, rtol=1e-5) and torch.allclose(iou, want_iou)
