"""Knowledge distillation of a SAM-family teacher into a smaller student.

Two modes, after the papers this project is built on:

* **decoupled** (MobileSAM): only the image encoder learns, by mean-squared error to the teacher's image
  embedding. The teacher's prompt encoder and mask decoder are copied into the student and frozen.
  Teacher embeddings can be precomputed once to disk (`embedding_cache`), so the teacher never runs
  again and training costs little more than the student's encoder.
* **full** (TinySAM's full-stage distillation): the student's encoder *and* decoder learn from the
  teacher at every stage — image embedding (MSE), the decoder's output tokens (MSE), the final mask
  logits of all four mask tokens (focal + dice against the teacher's soft masks) and the IoU head —
  with **online hard prompt sampling** (after each round a new click is drawn where the student still
  disagrees with the teacher, labelled by the teacher, and both decode the enlarged prompt again) and
  **hard-mask weighting** (prompts whose student mask is furthest from the teacher's weigh more).

Prompts need no labels: clicks are drawn uniformly over the image and boxes from the teacher's own
masks, so any folder of the user's images works.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tinysam_kit.data.preprocess import to_model_input
from tinysam_kit.data.synthetic import SyntheticWorld, WorldConfig
from tinysam_kit.models.checkpoint import save_checkpoint
from tinysam_kit.models.config import ModelConfig
from tinysam_kit.models.mask_decoder import best_multimask_token
from tinysam_kit.models.sam import TinySam, build_model
from tinysam_kit.training.data import ImageFolder, TeacherEmbeddingStore, WorldImages, batch_indices
from tinysam_kit.training.loop import (
    TrainingError,
    cosine_lr,
    distributed_from_env,
    init_distributed,
    load_state,
    progress,
    save_state,
    seed_everything,
    select_device,
    select_precision,
    set_lr,
    unwrap,
    wrap_ddp,
)
from tinysam_kit.training.losses import hard_mask_weights, mask_iou, mask_loss
from tinysam_kit.training.prompts import disagreement_click
from tinysam_kit.training.supervised import write_sidecar

MODES = ("decoupled", "full")


@dataclass
class DistillConfig:
    teacher: str  # registered model name or checkpoint path (SAM ViT-B/L/H, TinySAM, ...)
    student: dict  # ModelConfig.to_dict() of the student architecture
    out_dir: str
    mode: str = "full"
    images: str | None = None  # folder of training images
    synthetic_images: int = 0  # or: this many images of the synthetic world
    world_seed: int = 0
    world: dict = field(default_factory=lambda: WorldConfig().to_dict())
    steps: int = 1000
    batch_images: int = 4
    prompts_per_image: int = 8
    box_fraction: float = 0.3
    hps_rounds: int = 1  # online hard prompt sampling rounds (full mode)
    hard_mask_weighting: bool = True
    embedding_weight: float = 1.0
    token_weight: float = 1.0
    mask_weight: float = 1.0
    iou_weight: float = 1.0
    student_init: str | None = None  # checkpoint to start the student from
    embedding_cache: str | None = None  # directory for precomputed teacher embeddings
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    seed: int = 0
    device: str = "auto"
    amp: str = "auto"
    threads: int | None = None
    checkpoint_every: int = 200
    log_every: int = 20

    def resume_key(self) -> dict:
        skip = {"out_dir", "device", "amp", "threads", "checkpoint_every", "log_every", "embedding_cache"}
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k not in skip}))


def load_student_config(spec: str) -> ModelConfig:
    """`vit_t` (TinySAM's TinyViT-5M), `demo`, or a JSON file holding a ModelConfig dict
    (or {"config": ...}, the checkpoint sidecar format)."""
    from tinysam_kit.models.config import TINYSAM_VIT_T

    if spec in ("vit_t", "tinysam"):
        return TINYSAM_VIT_T
    if spec == "demo":
        from tinysam_kit.training.demo import DEMO_MODEL

        return DEMO_MODEL
    path = Path(spec)
    if not path.is_file():
        raise TrainingError(f"unknown student {spec!r}: use vit_t, demo or a JSON file with a model config")
    data = json.loads(path.read_text())
    try:
        return ModelConfig.from_dict(data.get("config", data))
    except (KeyError, TypeError) as exc:
        raise TrainingError(f"{path} is not a model config ({type(exc).__name__}: {exc})") from exc


def load_teacher(spec: str, device: torch.device) -> tuple[TinySam, str]:
    """Teacher network (frozen, eval) and an identifier of its weights (sha256 of the file)."""
    from tinysam_kit.models.registry import load_model_with_info

    model, _, sha = load_model_with_info(spec, device="cpu")
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, sha


def check_compatible(student: ModelConfig, teacher: ModelConfig, mode: str) -> None:
    """Embedding and mask losses compare tensors element-wise: their shapes must agree."""
    if student.img_size != teacher.img_size:
        raise TrainingError(f"student input size {student.img_size} differs from the teacher's "
                            f"{teacher.img_size}: embeddings and masks would not align")
    if student.decoder.prompt_embed_dim != teacher.decoder.prompt_embed_dim:
        raise TrainingError(f"student embedding width {student.decoder.prompt_embed_dim} differs from the "
                            f"teacher's {teacher.decoder.prompt_embed_dim}")
    if mode == "decoupled" and student.decoder != teacher.decoder:
        raise TrainingError("decoupled distillation reuses the teacher's decoder: the student's decoder "
                            f"config must equal the teacher's ({teacher.decoder})")


class _StudentForward(nn.Module):
    """The module DDP wraps: its forward runs the whole student side of a step (encoder, then `body`
    with the decoder), so the reducer sees every parameter the loss uses."""

    def __init__(self, model: TinySam) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, body, precision):
        with precision.autocast():
            embeddings = self.model.encode(images)
        return body(embeddings.float())


class _TokenTap:
    """Captures the two-way transformer's output tokens (the decoder's 'token' stage) via a hook,
    without changing the decoder's interface."""

    def __init__(self, model: TinySam) -> None:
        self.tokens: torch.Tensor | None = None
        self.handle = model.mask_decoder.transformer.register_forward_hook(self._hook)

    def _hook(self, _module, _inputs, output) -> None:
        self.tokens = output[0]

    def take(self) -> torch.Tensor:
        tokens, self.tokens = self.tokens, None
        return tokens


@dataclass
class _Prompts:
    image_index: torch.Tensor
    coords: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None

    def decode(self, model: TinySam, embeddings: torch.Tensor):
        return model.decode(embeddings[self.image_index], self.coords, self.labels, self.boxes)

    def with_click(self, coords: torch.Tensor, labels: torch.Tensor) -> _Prompts:
        c = coords[:, None].to(self.image_index.device)
        lab = labels[:, None].to(self.image_index.device)
        if self.coords is not None:
            c = torch.cat([self.coords, c], dim=1)
            lab = torch.cat([self.labels, lab], dim=1)
        return _Prompts(self.image_index, c, lab, self.boxes)


def _best_token(logits: torch.Tensor, iou: torch.Tensor) -> torch.Tensor:
    best = best_multimask_token(iou)
    return logits[torch.arange(len(best), device=logits.device), best]


def initial_prompts(rng: np.random.Generator, teacher: TinySam, t_emb: torch.Tensor, valid: list[tuple[int, int]],
                    per_image: int, box_fraction: float, device: torch.device) -> list[_Prompts]:
    """Uniform clicks over each image's valid (unpadded) area; some become boxes around the teacher's
    mask for that click, so box prompts cover real objects without labels."""
    idx, pts = [], []
    for i, (h, w) in enumerate(valid):
        for _ in range(per_image):
            idx.append(i)
            pts.append((rng.uniform(0, w - 1), rng.uniform(0, h - 1)))
    index = torch.tensor(idx, device=device)
    coords = torch.tensor(pts, dtype=torch.float32, device=device)[:, None]
    labels = torch.ones((len(idx), 1), device=device)
    is_box = rng.random(len(idx)) < box_fraction
    groups = []
    if (~is_box).any():
        keep = torch.from_numpy(np.nonzero(~is_box)[0]).to(device)
        groups.append(_Prompts(index[keep], coords[keep], labels[keep], None))
    if is_box.any():
        keep = torch.from_numpy(np.nonzero(is_box)[0]).to(device)
        with torch.no_grad():
            logits, iou = teacher.decode(t_emb[index[keep]], coords[keep], labels[keep])
            masks = _best_token(logits, iou) > 0
        scale = teacher.img_size / masks.shape[-1]
        boxes = []
        for m, c in zip(masks.cpu().numpy(), coords[keep, 0].cpu().numpy()):
            ys, xs = np.nonzero(m)
            if len(xs) == 0:  # teacher sees nothing there: a small box around the click
                boxes.append((c[0] - 8, c[1] - 8, c[0] + 8, c[1] + 8))
            else:
                boxes.append((xs.min() * scale, ys.min() * scale, (xs.max() + 1) * scale - 1,
                              (ys.max() + 1) * scale - 1))
        boxes_t = torch.tensor(boxes, dtype=torch.float32, device=device).clamp(0, teacher.img_size - 1)
        groups.append(_Prompts(index[keep], None, None, boxes_t))
    return groups


def hard_prompt_clicks(rng: np.random.Generator, student_logits: torch.Tensor, student_iou: torch.Tensor,
                       teacher_logits: torch.Tensor, teacher_iou: torch.Tensor, img_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """One click per prompt where student and teacher masks disagree, labelled with the teacher's answer
    (a positive click on agreeing foreground when they already agree)."""
    s = (_best_token(student_logits, student_iou) > 0).cpu().numpy()
    t = (_best_token(teacher_logits, teacher_iou) > 0).cpu().numpy()
    scale = img_size / s.shape[-1]
    coords, labels = [], []
    for sm, tm in zip(s, t):
        click = disagreement_click(rng, sm, tm)
        if click is None:
            ys, xs = np.nonzero(tm) if tm.any() else np.nonzero(np.ones_like(tm))
            i = int(rng.integers(len(xs)))
            click = ((float(xs[i]), float(ys[i])), int(tm[ys[i], xs[i]]))
        (x, y), label = click
        coords.append(((x + 0.5) * scale - 0.5, (y + 0.5) * scale - 0.5))
        labels.append(float(label))
    return torch.tensor(coords, dtype=torch.float32), torch.tensor(labels)


class Distiller:
    """One distillation run: teacher, student, optimiser, data; `run()` trains to `steps`, resumably."""

    def __init__(self, cfg: DistillConfig, log=print) -> None:
        if cfg.mode not in MODES:
            raise TrainingError(f"unknown distillation mode {cfg.mode!r} (use {' or '.join(MODES)})")
        if (cfg.images is None) == (cfg.synthetic_images <= 0):
            raise TrainingError("give exactly one image source: a folder (images) or synthetic_images > 0")
        self.cfg, self.log = cfg, log
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.ctx = distributed_from_env()
        self.device = init_distributed(self.ctx, select_device(cfg.device))
        self.precision = select_precision(self.device, cfg.amp)
        seed_everything(cfg.seed)
        self.teacher, self.teacher_id = load_teacher(cfg.teacher, self.device)
        self.student_config = ModelConfig.from_dict(cfg.student)
        check_compatible(self.student_config, self.teacher.config, cfg.mode)
        self.student = self._build_student()
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        self.wrapper = wrap_ddp(_StudentForward(self.student), self.ctx, self.device)
        self.optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = self.precision.scaler()
        if cfg.images is not None:
            self.data = ImageFolder(cfg.images)
        else:
            self.data = WorldImages(SyntheticWorld(cfg.world_seed, WorldConfig(**cfg.world)), cfg.synthetic_images)
        self.cache = TeacherEmbeddingStore(cfg.embedding_cache, self.teacher_id) if cfg.embedding_cache else None
        self.out = Path(cfg.out_dir)
        self.tap_student = _TokenTap(self.student)
        self.tap_teacher = _TokenTap(self.teacher)

    def _build_student(self) -> TinySam:
        cfg = self.cfg
        student = build_model(self.student_config)
        if cfg.student_init:
            from tinysam_kit.models.checkpoint import load_weights, read_state_dict

            load_weights(student, read_state_dict(cfg.student_init), source=cfg.student_init)
        elif self.student_config.decoder == self.teacher.config.decoder:
            # both papers start the student's decoder from the teacher's
            teacher_state = self.teacher.state_dict()
            student.load_state_dict({k: v for k, v in teacher_state.items()
                                     if not k.startswith("image_encoder.")}, strict=False)
        if cfg.mode == "decoupled":
            for name, p in student.named_parameters():
                p.requires_grad_(name.startswith("image_encoder."))
        return student.to(self.device).train()

    # ---------------------------------------------------------------- data
    def teacher_embeddings(self, keys: list[str], images: torch.Tensor) -> torch.Tensor:
        if self.cache is None:
            with torch.no_grad(), self.precision.autocast():
                return self.teacher.encode(images).float()
        out = []
        for key, img in zip(keys, images):
            emb = self.cache.get(key)
            if emb is None:
                with torch.no_grad(), self.precision.autocast():
                    emb = self.teacher.encode(img[None]).float()[0].cpu()
                self.cache.put(key, emb)
            out.append(emb)
        return torch.stack(out).to(self.device)

    def precompute(self) -> int:
        """Fill the embedding cache for every image (MobileSAM's one-off teacher pass). Returns the count."""
        if self.cache is None:
            raise TrainingError("precompute needs an embedding_cache directory")
        done = 0
        with progress(len(self.data), 0, "teacher embeddings", self.ctx.is_main) as bar:
            for i in range(len(self.data)):
                key = self.data.key(i)
                if not self.cache.path(key).is_file():
                    x, _ = to_model_input(self.data[i][1], self.teacher.img_size)
                    self.teacher_embeddings([key], x.to(self.device))
                    done += 1
                bar.update(1)
        return done

    def batch(self, step: int):
        ids = batch_indices(len(self.data), self.cfg.batch_images * self.ctx.world_size, step, self.cfg.seed)
        ids = self.ctx.shard(ids)
        keys, tensors, valid = [], [], []
        for i in ids:
            key, image = self.data[i]
            x, hw = to_model_input(image, self.student_config.img_size)
            keys.append(key)
            tensors.append(x)
            valid.append(hw)
        return keys, torch.cat(tensors).to(self.device), valid

    # ---------------------------------------------------------------- steps
    def step_loss(self, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.cfg
        rng = np.random.default_rng([cfg.seed, step, self.ctx.rank])
        keys, images, valid = self.batch(step)
        t_emb = self.teacher_embeddings(keys, images)

        def body(s_emb: torch.Tensor):
            emb_loss = F.mse_loss(s_emb, t_emb)
            stats = {"embed": float(emb_loss.detach())}
            if cfg.mode == "decoupled":
                return cfg.embedding_weight * emb_loss, stats
            decoder_loss, decoder_stats = self.decoder_loss(rng, s_emb, t_emb, valid)
            stats.update(decoder_stats)
            return cfg.embedding_weight * emb_loss + decoder_loss, stats

        return self.wrapper(images, body, self.precision)

    def decoder_loss(self, rng: np.random.Generator, s_emb: torch.Tensor, t_emb: torch.Tensor,
                     valid: list[tuple[int, int]]) -> tuple[torch.Tensor, dict[str, float]]:
        """Token, mask and IoU-head terms over all prompts and hard-prompt rounds."""
        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        n_terms = 0
        agree = []
        for prompts in initial_prompts(rng, self.teacher, t_emb, valid, cfg.prompts_per_image, cfg.box_fraction,
                                       self.device):
            for round_ in range(1 + cfg.hps_rounds):
                with torch.no_grad(), self.precision.autocast():
                    t_logits, t_iou = prompts.decode(self.teacher, t_emb)
                t_tokens = self.tap_teacher.take().float()
                with self.precision.autocast():
                    s_logits, s_iou = prompts.decode(self.student, s_emb)
                s_tokens = self.tap_student.take().float()
                s_logits, s_iou, t_logits, t_iou = s_logits.float(), s_iou.float(), t_logits.float(), t_iou.float()
                per_prompt = cfg.mask_weight * mask_loss(s_logits, t_logits.sigmoid()).mean(1)
                per_prompt = per_prompt + cfg.token_weight * F.mse_loss(s_tokens, t_tokens, reduction="none"
                                                                        ).flatten(1).mean(1)
                per_prompt = per_prompt + cfg.iou_weight * F.mse_loss(s_iou, t_iou, reduction="none").mean(1)
                s_best, t_best = _best_token(s_logits, s_iou), _best_token(t_logits, t_iou)
                if cfg.hard_mask_weighting:
                    per_prompt = per_prompt * hard_mask_weights(s_best, t_best)
                total = total + per_prompt.mean()
                n_terms += 1
                if round_ == 0:
                    agree.append(float(mask_iou(s_best, (t_best > 0).float()).mean()))
                if round_ < cfg.hps_rounds:
                    coords, labels = hard_prompt_clicks(rng, s_logits.detach(), s_iou.detach(), t_logits, t_iou,
                                                        self.teacher.img_size)
                    prompts = prompts.with_click(coords.to(self.device), labels.to(self.device))
        total = total / max(1, n_terms)
        return total, {"decoder": float(total.detach()), "agree_miou": float(np.mean(agree)) if agree else 0.0}

    def run(self, until: int | None = None) -> Path | None:
        """Train to `cfg.steps` (or stop early after step `until`, state saved, returning None)."""
        cfg = self.cfg
        state_path = self.out / "distill_state.pt"
        step = 0
        if state_path.is_file():
            step = load_state(state_path, model=self.student, optimizer=self.optimizer, scaler=self.scaler,
                              meta=cfg.resume_key())
            self.log(f"resumed from {state_path} at step {step}")
        if self.ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "distill_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        start = time.time()
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        bar = progress(cfg.steps, step, f"distill ({cfg.mode})", self.ctx.is_main)
        self.last_stats: dict[str, float] = {}
        while step < cfg.steps:
            set_lr(self.optimizer, cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup))
            loss, stats = self.step_loss(step)
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
            step += 1
            bar.update(1)
            stats["loss"] = float(loss.detach())
            self.last_stats = stats
            if self.ctx.is_main and (step % cfg.log_every == 0 or step == cfg.steps):
                msg = " ".join(f"{k}={v:.4f}" for k, v in stats.items())
                self.log(f"step {step}/{cfg.steps} {msg} ({time.time() - start:.0f}s)")
            stop = until is not None and step >= until
            if self.ctx.is_main and (step % cfg.checkpoint_every == 0 or step == cfg.steps or stop):
                save_state(state_path, model=self.student, optimizer=self.optimizer, scaler=self.scaler,
                           step=step, meta=cfg.resume_key())
            if stop and step < cfg.steps:
                bar.close()
                return None
        bar.close()
        final = self.out / "student.pth"
        if self.ctx.is_main:
            self.student.eval()
            save_checkpoint(unwrap(self.student), final)
            write_sidecar(final, self.student_config)
        return final


def distill(cfg: DistillConfig, log=print) -> Path:
    """Run a distillation (resuming from `out_dir` if it holds a matching state); returns the student's
    checkpoint path (official flat format + config sidecar)."""
    return Distiller(cfg, log=log).run()
