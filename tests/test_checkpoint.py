"""Official checkpoint format: strict keys and shapes, weights-only loading, precise errors."""

from __future__ import annotations

import json
import pickle
from collections import OrderedDict

import pytest
import torch

from tinysam_kit.models.checkpoint import CheckpointError, load_checkpoint, read_state_dict, save_checkpoint
from tinysam_kit.models.config import TINYSAM_VIT_T, ModelConfig
from tinysam_kit.models.registry import infer_config
from tinysam_kit.models.sam import build_model


@pytest.fixture(scope="module")
def manifest(reference_dir):
    return json.loads((reference_dir.parent / "tinysam_state_dict_manifest.json").read_text())


@pytest.fixture(scope="module")
def manifest_checkpoint(manifest, tmp_path_factory):
    gen = torch.Generator().manual_seed(7)
    state = OrderedDict()
    for entry in manifest:
        if entry["dtype"] == "int64":
            state[entry["key"]] = torch.tensor(0, dtype=torch.int64)
        else:
            state[entry["key"]] = torch.randn(entry["shape"], generator=gen) * 0.02
    path = tmp_path_factory.mktemp("ckpt") / "manifest_random.pth"
    torch.save(state, path)
    return path, state


def test_state_dict_matches_manifest(manifest):
    sd = build_model().state_dict()
    assert [(k, list(v.shape)) for k, v in sd.items()] == [(e["key"], e["shape"]) for e in manifest]


def test_manifest_checkpoint_round_trips(manifest_checkpoint, tmp_path):
    path, state = manifest_checkpoint
    model = load_checkpoint(path)
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    out = save_checkpoint(model, tmp_path / "again.pth")
    again = read_state_dict(out)
    assert list(again) == list(state)
    assert all(torch.equal(again[k], state[k]) for k in state)
    assert infer_config(again) == TINYSAM_VIT_T


def test_missing_key_is_named(manifest_checkpoint, tmp_path):
    _, state = manifest_checkpoint
    broken = OrderedDict(state)
    del broken["mask_decoder.iou_token.weight"]
    torch.save(broken, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key\(s\) mask_decoder\.iou_token\.weight"):
        load_checkpoint(tmp_path / "missing.pth", TINYSAM_VIT_T)


def test_extra_key_is_named(manifest_checkpoint, tmp_path):
    _, state = manifest_checkpoint
    broken = OrderedDict(state)
    broken["image_encoder.extra.weight"] = torch.zeros(3)
    torch.save(broken, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\) image_encoder\.extra\.weight"):
        load_checkpoint(tmp_path / "extra.pth", TINYSAM_VIT_T)


def test_wrong_shape_is_named(manifest_checkpoint, tmp_path):
    _, state = manifest_checkpoint
    broken = OrderedDict(state)
    broken["mask_decoder.iou_token.weight"] = torch.zeros(1, 128)
    torch.save(broken, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError, match=r"wrong shape for mask_decoder\.iou_token\.weight \(1, 128\)"):
        load_checkpoint(tmp_path / "shape.pth", TINYSAM_VIT_T)


class Evil:
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_code_is_refused(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"x": Evil()}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        read_state_dict(path)
    assert "pickled code ran" not in capsys.readouterr().out


def test_plain_pickle_and_truncated_files_are_refused(tmp_path, manifest_checkpoint):
    (tmp_path / "plain.pth").write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(CheckpointError):
        read_state_dict(tmp_path / "plain.pth")
    data = manifest_checkpoint[0].read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a loadable weights file"):
        read_state_dict(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        read_state_dict(tmp_path / "nope.pth")


def test_config_round_trips_through_dict():
    assert ModelConfig.from_dict(json.loads(json.dumps(TINYSAM_VIT_T.to_dict()))) == TINYSAM_VIT_T


def test_infer_config_of_small_architecture(tiny_random_checkpoint):
    state = read_state_dict(tiny_random_checkpoint)
    cfg = infer_config(state, img_size=256)
    assert cfg.encoder.embed_dims == (16, 32, 48, 64)
    assert cfg.decoder.prompt_embed_dim == 64
    assert cfg.decoder.transformer_mlp_dim == 256
