"""Training machinery: synthetic world, prompts, losses, precision/DDP logic, supervised training and
both distillation modes (smoke runs on tiny models: loss decreases, strict loading, exact resume)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket

import numpy as np
import pytest
import torch
from training_helpers import STUDENT, TEACHER, TINY_WORLD, save_model, state_of

from tinysam_kit.data.preprocess import to_model_input
from tinysam_kit.data.synthetic import SyntheticWorld, WorldConfig
from tinysam_kit.models.checkpoint import load_checkpoint
from tinysam_kit.models.registry import load_model
from tinysam_kit.training.data import ImageFolder, TeacherEmbeddingStore, batch_indices
from tinysam_kit.training.distill import DistillConfig, Distiller, check_compatible, load_student_config
from tinysam_kit.training.loop import (
    DistributedContext,
    TrainingError,
    distributed_from_env,
    select_precision,
)
from tinysam_kit.training.losses import dice_loss, focal_loss, hard_mask_weights, prompt_loss
from tinysam_kit.training.prompts import correction_click, disagreement_click, jitter_box, sample_point
from tinysam_kit.training.supervised import SupervisedConfig, tie_weights, train_supervised

# ------------------------------------------------------------------------------------ synthetic world


def test_world_is_deterministic_and_masks_are_disjoint_visible_objects():
    world = SyntheticWorld(seed=3)
    a, b = world[5], world[5]
    assert np.array_equal(a.image, b.image) and np.array_equal(a.masks, b.masks)
    assert not np.array_equal(world[6].image, a.image)
    assert not np.array_equal(SyntheticWorld(seed=4)[5].image, a.image)
    cfg = WorldConfig()
    for i in range(6):
        s = world[i]
        assert s.image.shape == (256, 256, 3) and s.image.dtype == np.uint8
        assert cfg.min_objects <= len(s.masks) <= cfg.max_objects
        assert (s.masks.sum(axis=0) <= 1).all(), "visible masks must not overlap"
        assert (s.masks.reshape(len(s.masks), -1).sum(1) >= cfg.min_visible_area).all()
        x0, y0, x1, y1 = s.boxes[0]
        ys, xs = np.nonzero(s.masks[0])
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max(), ys.max())
        assert not (s.background & s.masks.any(axis=0)).any()


def test_world_objects_differ_in_colour_from_their_surroundings():
    s = SyntheticWorld(seed=0)[1]
    for m in s.masks:
        inside = s.image[m].astype(float).mean(0)
        ring = np.zeros_like(m)
        ys, xs = np.nonzero(m)
        ring[max(ys.min() - 4, 0):ys.max() + 5, max(xs.min() - 4, 0):xs.max() + 5] = True
        ring &= s.background
        if ring.sum() > 20:
            assert np.linalg.norm(inside - s.image[ring].astype(float).mean(0)) > 30


def test_resized_sample_keeps_geometry():
    s = SyntheticWorld(seed=1)[0]
    small = s.resized(128)
    assert small.image.shape == (128, 128, 3)
    assert len(small.masks) == len(s.masks)
    for big, little in zip(s.masks, small.masks):
        assert abs(little.sum() * 4 - big.sum()) < 0.15 * big.sum()


# ------------------------------------------------------------------------------------------ prompts


def test_prompt_samplers():
    rng = np.random.default_rng(0)
    mask = np.zeros((40, 50), bool)
    mask[10:20, 5:15] = True
    for _ in range(20):
        x, y = sample_point(rng, mask)
        assert mask[int(y), int(x)]
    with pytest.raises(ValueError, match="empty mask"):
        sample_point(rng, np.zeros((4, 4), bool))
    for _ in range(20):
        box = jitter_box(rng, np.array([5, 10, 14, 19]), (40, 50))
        assert 0 <= box[0] <= box[2] <= 49 and 0 <= box[1] <= box[3] <= 39
        assert np.abs(box - [5, 10, 14, 19]).max() <= 20
    pred = np.zeros_like(mask)
    (x, y), label = correction_click(rng, pred, mask)
    assert label == 1 and mask[int(y), int(x)]
    (x, y), label = correction_click(rng, np.ones_like(mask), mask)
    assert label == 0 and not mask[int(y), int(x)]
    assert correction_click(rng, mask, mask) is None
    (x, y), label = disagreement_click(rng, pred, mask)
    assert label == 1 and mask[int(y), int(x)]
    assert disagreement_click(rng, mask, mask) is None


# ------------------------------------------------------------------------------------------- losses


def test_losses_reward_the_right_mask_and_the_best_multimask_token():
    target = torch.zeros(1, 16, 16)
    target[0, 4:12, 4:12] = 1
    good = (target * 2 - 1) * 20
    bad = -good
    assert focal_loss(good, target) < 1e-6 < focal_loss(bad, target)
    assert dice_loss(good, target) < 0.01 and dice_loss(bad, target) > 0.9
    # one good multimask token is enough; the IoU head is asked for the true IoUs
    logits = torch.stack([good[0], bad[0], good[0], bad[0]])[None]
    iou_pred = torch.tensor([[1.0, 0.0, 1.0, 0.0]])
    loss, stats = prompt_loss(logits, iou_pred, target)
    assert float(loss) < 0.01 and stats["miou"] == pytest.approx(1.0)
    loss_wrong_head, _ = prompt_loss(logits, torch.tensor([[0.0, 1.0, 0.0, 1.0]]), target)
    assert float(loss_wrong_head) > float(loss) + 0.5
    all_bad = torch.stack([bad[0]] * 4)[None]
    assert float(prompt_loss(all_bad, iou_pred, target)[0]) > 5


def test_hard_mask_weighting_favours_prompts_the_student_gets_wrong():
    teacher = torch.full((2, 8, 8), -5.0)
    teacher[:, 2:6, 2:6] = 5.0
    student = teacher.clone()
    student[1] = -student[1]
    w = hard_mask_weights(student, teacher)
    assert w.mean() == pytest.approx(1.0) and w[1] > w[0]


# -------------------------------------------------------------------------------- devices, AMP, DDP


def test_precision_selection_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert select_precision(cpu, "auto").dtype is None  # exact, deterministic CPU training
    assert select_precision(cuda, "auto").dtype == torch.float16 and select_precision(cuda, "auto").scaled
    assert select_precision(cpu, "bf16").dtype == torch.bfloat16 and not select_precision(cpu, "bf16").scaled
    with pytest.raises(TrainingError, match="fp16 mixed precision needs a CUDA device"):
        select_precision(cpu, "fp16")
    with pytest.raises(TrainingError, match="unknown amp mode"):
        select_precision(cpu, "fp8")
    with select_precision(cpu, "bf16").autocast():
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    assert not select_precision(cpu, "off").scaler().is_enabled()


def test_distributed_context_from_torchrun_environment():
    assert distributed_from_env({}) == DistributedContext(0, 1, 0)
    ctx = distributed_from_env({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert ctx.enabled and not ctx.is_main and ctx.shard(list(range(8))) == [2, 6]
    with pytest.raises(TrainingError, match="inconsistent torchrun environment"):
        distributed_from_env({"WORLD_SIZE": "2", "RANK": "2"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from tinysam_kit.training.distill import DistillConfig, Distiller

    d = Distiller(DistillConfig(**cfg_dict))
    d.run()
    torch.save({k: v.clone() for k, v in d.student.state_dict().items()}, f"{out}/rank{rank}.pt")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_distributed_data_parallel_keeps_ranks_in_sync(tmp_path):
    """Two Gloo processes on CPU: same code path as multi-GPU training (NCCL) except the backend."""
    teacher = save_model(TEACHER, tmp_path / "teacher.pth")
    cfg = DistillConfig(teacher=str(teacher), student=STUDENT.to_dict(), out_dir=str(tmp_path / "run"),
                        mode="full", synthetic_images=4, world=TINY_WORLD.to_dict(), steps=1, batch_images=1,
                        prompts_per_image=2, hps_rounds=1, device="cpu", log_every=1)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), dataclasses.asdict(cfg), str(tmp_path)),
                                nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    for k in a:
        if a[k].is_floating_point() and "running_" not in k:  # BatchNorm statistics stay per rank
            torch.testing.assert_close(a[k], b[k], msg=k)
    initial = build_student_like(cfg)
    moved = [k for k, v in initial.items() if v.is_floating_point() and not torch.equal(v, a[k])]
    assert any(k.startswith("image_encoder.") for k in moved) and any(k.startswith("mask_decoder.") for k in moved)
    assert (tmp_path / "run" / "student.pth").is_file()


def build_student_like(cfg: DistillConfig) -> dict:
    torch.manual_seed(cfg.seed)
    from tinysam_kit.models.config import ModelConfig
    from tinysam_kit.models.sam import build_model

    return build_model(ModelConfig.from_dict(cfg.student)).state_dict()


# ------------------------------------------------------------------------------------------ data


def test_model_input_and_image_folder(tmp_path):
    from PIL import Image

    img = np.random.default_rng(0).integers(0, 255, (30, 60, 3), dtype=np.uint8)
    x, (h, w) = to_model_input(img, 64)
    assert x.shape == (1, 3, 64, 64) and (h, w) == (32, 64)
    assert torch.all(x[..., 32:, :] == 0)  # zero padding below the resized image
    (tmp_path / "sub").mkdir()
    Image.fromarray(img).save(tmp_path / "sub" / "b.png")
    Image.fromarray(img).save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = ImageFolder(tmp_path)
    assert [folder.key(i) for i in range(len(folder))] == ["a.jpg", "sub/b.png"]
    assert folder[1][1].shape == (30, 60, 3)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        ImageFolder(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="image directory not found"):
        ImageFolder(tmp_path / "missing")
    cache = TeacherEmbeddingStore(tmp_path / "cache", "abc123")
    assert cache.get("a.jpg") is None
    cache.put("a.jpg", torch.ones(4, 2, 2))
    assert torch.equal(cache.get("a.jpg"), torch.ones(4, 2, 2))


def test_batches_cover_every_image_once_per_epoch():
    seen = [i for step in range(5) for i in batch_indices(10, 2, step, seed=1)]
    assert sorted(seen) == list(range(10))
    assert batch_indices(10, 2, 7, seed=1) == batch_indices(10, 2, 7, seed=1)


# ------------------------------------------------------------------------------ supervised training


def test_supervised_training_smoke(tmp_path):
    cfg = SupervisedConfig(model=STUDENT.to_dict(), out_dir=str(tmp_path / "sup"), steps=4, batch_images=2,
                           prompts_per_image=2, refine_rounds=1, refine_fraction=1.0, warmup=1, lr=1e-3,
                           world=TINY_WORLD.to_dict(), device="cpu", checkpoint_every=2, log_every=1,
                           warm_steps=2, warm_size=32)
    logs: list[str] = []
    path = train_supervised(cfg, log=logs.append)
    assert any("step 4/4" in line for line in logs) and any("seg1" in line for line in logs)
    model = load_model(str(path), device="cpu")  # strict load through the registry + sidecar
    assert model.config == STUDENT
    with pytest.raises(TrainingError, match="cannot resume"):
        train_supervised(dataclasses.replace(cfg, lr=5e-4), log=logs.append)


def test_batchnorm_recalibration_then_frozen_fine_tuning(tmp_path):
    """Stage 2 of the demo recipe: running statistics re-estimated on world images, then kept fixed while
    the weights train (inference-mode BatchNorm)."""
    from tinysam_kit.models.checkpoint import read_state_dict
    from tinysam_kit.models.sam import build_model
    from tinysam_kit.training.supervised import recalibrate_batchnorm

    world = SyntheticWorld(0, TINY_WORLD)
    model = build_model(STUDENT).train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)
    recalibrate_batchnorm(model, world, images=8, device=torch.device("cpu"))
    first = bns[0]
    assert not torch.equal(first.running_mean, torch.zeros_like(first.running_mean))
    assert first.momentum == 0.1 and first.training  # settings restored
    from tinysam_kit.models.checkpoint import save_checkpoint

    init = save_checkpoint(model, tmp_path / "init.pth")
    cfg = SupervisedConfig(model=STUDENT.to_dict(), out_dir=str(tmp_path / "bn"), steps=2, batch_images=2,
                           prompts_per_image=2, refine_rounds=0, warmup=1, lr=1e-3, world=TINY_WORLD.to_dict(),
                           device="cpu", init_checkpoint=str(init), recalibrate_batchnorm=8,
                           frozen_batchnorm=True)
    out = read_state_dict(train_supervised(cfg, log=lambda _m: None))
    before = read_state_dict(init)
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.allclose(out[k], before[k]) for k in stats)  # same images, frozen afterwards
    weights = [k for k in before if k.endswith("weight") and "bn" not in k]
    assert any(not torch.equal(out[k], before[k]) for k in weights)


def test_tied_models_share_parameters_across_input_sizes():
    from tinysam_kit.models.sam import build_model

    big = build_model(STUDENT)
    small = tie_weights(build_model(dataclasses.replace(
        STUDENT, encoder=dataclasses.replace(STUDENT.encoder, img_size=32))), big)
    with torch.no_grad():
        big.mask_decoder.iou_token.weight.add_(1.0)
    assert torch.equal(small.mask_decoder.iou_token.weight, big.mask_decoder.iou_token.weight)
    small_qkv = small.image_encoder.layers[1].blocks[0].attn.qkv
    assert small_qkv.weight is big.image_encoder.layers[1].blocks[0].attn.qkv.weight
    assert small.encode(torch.zeros(1, 3, 32, 32)).shape[-1] == 2


# ----------------------------------------------------------------------------------- distillation


def _distill_cfg(tmp_path, teacher, mode, **kw) -> DistillConfig:
    base = dict(teacher=str(teacher), student=STUDENT.to_dict(), out_dir=str(tmp_path / mode), mode=mode,
                synthetic_images=2, world=TINY_WORLD.to_dict(), steps=12, batch_images=2, prompts_per_image=3,
                hps_rounds=1, lr=3e-3, warmup=1, device="cpu", checkpoint_every=100, log_every=1)
    base.update(kw)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_model(TEACHER, tmp_path_factory.mktemp("teacher") / "teacher.pth", seed=1)


@pytest.mark.parametrize("mode", ["full", "decoupled"])
def test_distillation_loss_decreases_and_student_loads_strictly(tmp_path, teacher_path, mode):
    logs: list[str] = []
    d = Distiller(_distill_cfg(tmp_path, teacher_path, mode), log=logs.append)
    losses = []
    original = d.log

    def capture(line):
        original(line)
        losses.append(float(line.split("loss=")[1].split()[0]))

    d.log = capture
    path = d.run()
    assert len(losses) == 12
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    student = load_checkpoint(path, STUDENT)
    assert student.config == STUDENT
    side = json.loads(path.with_name(path.name + ".json").read_text())
    assert side["config"] == json.loads(json.dumps(STUDENT.to_dict()))
    teacher = state_of(teacher_path)
    final = state_of(path)
    if mode == "decoupled":  # MobileSAM: the teacher's decoder, copied and frozen
        for k, v in teacher.items():
            if not k.startswith("image_encoder."):
                assert torch.equal(final[k], v), k
    else:  # TinySAM: the decoder learns too
        assert not torch.equal(final["mask_decoder.iou_token.weight"], teacher["mask_decoder.iou_token.weight"])


def test_interrupted_distillation_resumes_to_the_same_weights(tmp_path, teacher_path):
    straight = Distiller(_distill_cfg(tmp_path / "a", teacher_path, "full", steps=4), log=lambda _: None).run()
    cfg = _distill_cfg(tmp_path / "b", teacher_path, "full", steps=4)
    assert Distiller(cfg, log=lambda _: None).run(until=2) is None
    logs: list[str] = []
    resumed = Distiller(cfg, log=logs.append).run()
    assert any("resumed" in line and "step 2" in line for line in logs)
    a, b = state_of(straight), state_of(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_precomputed_teacher_embeddings_are_used(tmp_path, teacher_path):
    cfg = _distill_cfg(tmp_path, teacher_path, "decoupled", steps=2, embedding_cache=str(tmp_path / "emb"))
    d = Distiller(cfg, log=lambda _: None)
    assert d.precompute() == 2
    assert d.precompute() == 0  # already there
    files = list((tmp_path / "emb").rglob("*.pt"))
    assert len(files) == 2
    # the run must read the cache, not the teacher: poison the teacher's encoder
    with torch.no_grad():
        for p in d.teacher.image_encoder.parameters():
            p.fill_(float("nan"))
    d.run()
    assert np.isfinite(d.last_stats["loss"])


def test_distillation_refuses_incompatible_settings(tmp_path, teacher_path):
    other = dataclasses.replace(STUDENT, encoder=dataclasses.replace(STUDENT.encoder, img_size=128))
    with pytest.raises(TrainingError, match="input size 128 differs"):
        check_compatible(other, TEACHER, "full")
    other_dec = dataclasses.replace(STUDENT, decoder=dataclasses.replace(STUDENT.decoder, transformer_mlp_dim=32))
    with pytest.raises(TrainingError, match="reuses the teacher's decoder"):
        check_compatible(other_dec, TEACHER, "decoupled")
    check_compatible(other_dec, TEACHER, "full")
    with pytest.raises(TrainingError, match="exactly one image source"):
        Distiller(_distill_cfg(tmp_path, teacher_path, "full", synthetic_images=0))
    with pytest.raises(TrainingError, match="unknown distillation mode"):
        Distiller(_distill_cfg(tmp_path, teacher_path, "half"))
    with pytest.raises(TrainingError, match="unknown student"):
        load_student_config("vit_q")
    assert load_student_config("vit_t").encoder.embed_dims == (64, 128, 160, 320)


def test_cli_distill_end_to_end(tmp_path, teacher_path, capsys):
    from tinysam_kit.cli.training import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    student_json = tmp_path / "student.json"
    student_json.write_text(json.dumps({"config": STUDENT.to_dict()}))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    world = SyntheticWorld(0, TINY_WORLD)
    for i in range(2):
        Image.fromarray(world[i].image).save(images / f"{i}.png")
    args = parser.parse_args(["distill", "--teacher", str(teacher_path), "--images", str(images), "--student",
                              str(student_json), "--mode", "decoupled", "--out", str(tmp_path / "run"), "--steps",
                              "2", "--batch-size", "1", "--device", "cpu", "--embedding-cache",
                              str(tmp_path / "emb"), "--precompute"])
    assert args.func(args) == 0
    out = capsys.readouterr().out.strip().splitlines()[-1]
    assert out.endswith("student.pth") and load_checkpoint(out, STUDENT) is not None
    with pytest.raises(SystemExit):
        parser.parse_args(["distill", "--teacher", "x", "--out", "y"])  # no image source
