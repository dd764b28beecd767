"""SAM ViT teachers: official key layout, config inference, attention maths, predictor end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tinysam_kit.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint
from tinysam_kit.models.config import SAM_VIT_B, SAM_VIT_H, SAM_VIT_L, DecoderConfig, ModelConfig, ViTConfig
from tinysam_kit.models.registry import infer_config
from tinysam_kit.models.sam import build_model
from tinysam_kit.models.sam_vit import (
    Attention,
    ImageEncoderViT,
    from_windows,
    infer_vit_config,
    relative_table,
    to_windows,
)

TINY_VIT = ModelConfig(
    encoder=ViTConfig(img_size=128, patch_size=16, embed_dim=32, depth=3, num_heads=2, global_attn_indexes=(1,),
                      window_size=3, mlp_ratio=2.0, out_chans=32),
    decoder=DecoderConfig(prompt_embed_dim=32, transformer_mlp_dim=64, transformer_heads=2, iou_head_hidden_dim=32),
)


def test_vit_b_state_dict_has_the_official_layout_and_round_trips_strictly(tmp_path):
    torch.manual_seed(0)
    model = build_model(SAM_VIT_B)
    state = model.state_dict()
    # names and shapes of SAM's sam_vit_b checkpoint
    assert state["image_encoder.pos_embed"].shape == (1, 64, 64, 768)
    assert state["image_encoder.patch_embed.proj.weight"].shape == (768, 3, 16, 16)
    assert state["image_encoder.blocks.0.attn.rel_pos_h"].shape == (27, 64)  # 14×14 windows
    assert state["image_encoder.blocks.2.attn.rel_pos_w"].shape == (127, 64)  # global block
    assert state["image_encoder.blocks.11.mlp.lin1.weight"].shape == (3072, 768)
    assert state["image_encoder.neck.0.weight"].shape == (256, 768, 1, 1)
    assert state["image_encoder.neck.3.bias"].shape == (256,)
    assert "image_encoder.blocks.12.norm1.weight" not in state
    n_encoder = sum(v.numel() for k, v in state.items() if k.startswith("image_encoder."))
    assert 89_000_000 < n_encoder < 90_000_000  # ViT-B image encoder: 89.7 M parameters

    path = save_checkpoint(model, tmp_path / "sam_vit_b.pth")
    loaded_state = read_state_dict(path)
    assert infer_config(loaded_state) == SAM_VIT_B
    reloaded = load_checkpoint(path, SAM_VIT_B)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    del model, reloaded


@pytest.mark.parametrize("config", [SAM_VIT_L, SAM_VIT_H], ids=["vit_l", "vit_h"])
def test_infer_config_recognises_vit_l_and_h_from_shapes_alone(config):
    # shapes only (meta tensors): no memory for 300M-600M parameters
    with torch.device("meta"):
        encoder = ImageEncoderViT(config.encoder, out_chans=256)
    state = {f"image_encoder.{k}": v for k, v in encoder.state_dict().items()}
    assert infer_vit_config(state) == config.encoder


def test_infer_config_rejects_incomplete_vit_checkpoints():
    with pytest.raises(CheckpointError, match="lacks"):
        infer_vit_config({"image_encoder.pos_embed": torch.zeros(1, 4, 4, 8)})


def test_mismatching_checkpoint_names_the_offending_keys(tmp_path):
    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    state = dict(model.state_dict())
    state.pop("image_encoder.blocks.1.attn.rel_pos_h")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) image_encoder\.blocks\.1\.attn\.rel_pos_h"):
        load_checkpoint(tmp_path / "broken.pth", TINY_VIT)


def test_decomposed_relative_positions_equal_the_explicit_per_pair_bias():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, grid=3)
    with torch.no_grad():
        attn.rel_pos_h.normal_()
        attn.rel_pos_w.normal_()
    x = torch.randn(1, 3, 3, 8)
    out = attn(x)

    # independent formulation: logits[i,j → k,l] = q·k * scale + q·Rh[i-k+2] + q·Rw[j-l+2]
    qkv = attn.qkv(x).reshape(9, 3, 2, 4)
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]  # (tokens, heads, head_dim)
    expected = torch.zeros(9, 2, 4)
    for h in range(2):
        logits = torch.zeros(9, 9)
        for a in range(9):
            for b in range(9):
                (i, j), (kk, ll) = divmod(a, 3), divmod(b, 3)
                logits[a, b] = (q[a, h] @ k[b, h]) * attn.scale + q[a, h] @ attn.rel_pos_h[i - kk + 2] \
                    + q[a, h] @ attn.rel_pos_w[j - ll + 2]
        expected[:, h] = logits.softmax(-1) @ v[:, h]
    expected = attn.proj(expected.reshape(9, 8)).reshape(1, 3, 3, 8)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_relative_table_is_resized_for_other_input_sizes():
    table = torch.arange(5, dtype=torch.float32)[:, None].repeat(1, 2)  # trained for 3 positions
    rel = relative_table(4, 4, table)
    assert rel.shape == (4, 4, 2)
    assert rel[0, 0, 0] == rel[3, 3, 0]  # same offset, same value
    assert rel[3, 0, 0] > rel[0, 3, 0]


def test_windows_round_trip_with_padding():
    x = torch.randn(2, 5, 7, 3)
    win, padded = to_windows(x, 3)
    assert win.shape == (2 * 2 * 3, 3, 3, 3) and padded == (6, 9)
    assert torch.equal(from_windows(win, 3, padded, (5, 7)), x)


def test_tiny_vit_teacher_runs_end_to_end_through_the_predictor(tmp_path):
    from tinysam_kit.inference.predictor import TinySamPredictor

    torch.manual_seed(0)
    model = build_model(TINY_VIT)
    path = save_checkpoint(model, tmp_path / "vit_tiny.pth")
    path.with_name(path.name + ".json").write_text(json.dumps({"config": TINY_VIT.to_dict()}))
    # the architecture (except decoder heads) is also recoverable from the weights alone
    inferred = infer_config(read_state_dict(path))
    assert inferred.encoder == TINY_VIT.encoder

    predictor = TinySamPredictor.from_pretrained(str(path), device="cpu")
    image = np.random.default_rng(0).integers(0, 255, (90, 120, 3), dtype=np.uint8)
    state = predictor.set_image(image)
    assert tuple(state.embedding.shape) == (1, 32, 8, 8)
    masks, ious, low_res = predictor.predict(point_coords=[[60, 40]], point_labels=[1])
    assert masks.shape == (3, 90, 120) and masks.dtype == bool
    assert ious.shape == (3,) and low_res.shape == (3, 32, 32)
    masks, _, _ = predictor.predict_batch(boxes=[[10, 10, 60, 50], [0, 0, 119, 89]])
    assert masks.shape == (2, 3, 90, 120)
    # same numbers as the network called directly on the same input
    x, _ = predictor.preprocess(image)
    with torch.no_grad():
        direct = model.encode(x)
    torch.testing.assert_close(state.embedding, direct)
