"""Small-scale reproduction of the distillation papers' claims on the synthetic world.

With a teacher trained on the synthetic world (default: the bundled `demo` model), a smaller student is
trained for the same budget (steps × images) four ways:

* none        — no training (random student: the floor)
* supervised  — no distillation: ground-truth masks and SAM's losses only
* decoupled   — MobileSAM: image-embedding MSE, teacher decoder copied and frozen
* full+hps    — TinySAM: full-stage distillation + online hard prompt sampling + hard-mask weighting

and judged on held-out images: student-vs-teacher mIoU for one centre click and for the object's box
(the papers' measure of how well the student imitates the teacher), and student-vs-ground-truth mIoU.
The papers' direction is full+hps ≥ decoupled ≥ no distillation.

    python benchmarks/bench_distillation.py --steps 120 --images 200 --eval-images 12 --out /tmp/kd
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from tinysam_kit.data.synthetic import SyntheticWorld, WorldConfig
from tinysam_kit.evaluation.quality import _best, held_out_indices, interior_point, iou
from tinysam_kit.inference.predictor import TinySamPredictor
from tinysam_kit.models.checkpoint import save_checkpoint
from tinysam_kit.models.config import ModelConfig, TinyViTConfig
from tinysam_kit.models.registry import load_model_with_info
from tinysam_kit.models.sam import build_model
from tinysam_kit.runtime import TorchEngine
from tinysam_kit.training.distill import DistillConfig, distill
from tinysam_kit.training.supervised import SupervisedConfig, train_supervised, write_sidecar


def student_config(teacher: ModelConfig) -> ModelConfig:
    """A TinyViT roughly 3× cheaper than the teacher's encoder; same decoder (decoupled KD reuses it)."""
    enc = TinyViTConfig(img_size=teacher.img_size, embed_dims=(8, 24, 48, 64), depths=(1, 1, 1, 1),
                        num_heads=(1, 1, 2, 2), window_sizes=(7, 8, 8, 8), mbconv_expand_ratio=2.0, num_classes=0)
    return ModelConfig(encoder=enc, decoder=teacher.decoder)


def predictor_for(path: Path) -> TinySamPredictor:
    model, name, sha = load_model_with_info(str(path), device="cpu")
    return TinySamPredictor(TorchEngine(model, device="cpu", model_name=name, model_sha256=sha))


def compare(student: TinySamPredictor, teacher: TinySamPredictor, world: SyntheticWorld, indices) -> dict:
    """mIoU of the student's masks against the teacher's and against ground truth, per prompt kind."""
    out = {"point_vs_teacher": [], "box_vs_teacher": [], "point_vs_gt": [], "box_vs_gt": []}
    for index in indices:
        sample = world[index]
        if not len(sample.masks):
            continue
        s_state, t_state = student.embed(sample.image), teacher.embed(sample.image)
        points = np.array([[interior_point(m)] for m in sample.masks], np.float32)
        labels = np.ones((len(points), 1), np.float32)
        for kind, kwargs in (("point", {"point_coords": points, "point_labels": labels}),
                             ("box", {"boxes": sample.boxes})):
            sm, ss, _ = student.predict_batch(image_embedding=s_state, **kwargs)
            tm, ts, _ = teacher.predict_batch(image_embedding=t_state, **kwargs)
            s_best, t_best = _best(sm, ss), _best(tm, ts)
            out[f"{kind}_vs_teacher"].extend(iou(a, b) for a, b in zip(s_best, t_best))
            out[f"{kind}_vs_gt"].extend(iou(a, g) for a, g in zip(s_best, sample.masks))
    return {k: round(float(np.mean(v)), 4) for k, v in out.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="demo", help="teacher model (name or path); default: the demo model")
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--batch", type=int, default=4, help="images per step")
    ap.add_argument("--images", type=int, default=200, help="training images (synthetic world)")
    ap.add_argument("--eval-images", type=int, default=12)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--methods", default="none,supervised,decoupled,full+hps")
    ap.add_argument("--out", default="bench_distillation_out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    teacher_model, _, _ = load_model_with_info(args.teacher, device="cpu")
    tcfg = teacher_model.config
    scfg = student_config(tcfg)
    world_cfg = WorldConfig(size=tcfg.img_size)
    world = SyntheticWorld(args.seed, world_cfg)
    teacher = predictor_for(Path(args.teacher)) if Path(args.teacher).is_file() else \
        TinySamPredictor.from_pretrained(args.teacher, device="cpu")
    eval_idx = held_out_indices(args.eval_images, start=5000)
    common = dict(steps=args.steps, batch_images=args.batch, seed=args.seed, device="cpu", threads=args.threads,
                  log_every=max(1, args.steps // 6), checkpoint_every=args.steps)
    n_params = sum(p.numel() for p in build_model(scfg).image_encoder.parameters())
    t_params = sum(p.numel() for p in teacher_model.image_encoder.parameters())
    results = {"teacher_encoder_params": t_params, "student_encoder_params": n_params, "steps": args.steps,
               "batch_images": args.batch, "train_images": args.images, "methods": {}}
    for method in args.methods.split(","):
        start = time.time()
        run = out / method.replace("+", "_")
        if method == "none":
            torch.manual_seed(args.seed)
            path = save_checkpoint(build_model(scfg), run / "student.pth")
            write_sidecar(path, scfg)
        elif method == "supervised":
            # same number of image visits, but fresh labelled scenes each step (favours this baseline)
            cfg = SupervisedConfig(model=scfg.to_dict(), out_dir=str(run), world=world_cfg.to_dict(),
                                   world_seed=args.seed, lr=1e-3, warmup=10, **common)
            path = train_supervised(cfg, log=print)
        else:
            mode = "decoupled" if method == "decoupled" else "full"
            cfg = DistillConfig(teacher=args.teacher, student=json.loads(json.dumps(scfg.to_dict())),
                                out_dir=str(run), mode=mode, synthetic_images=args.images, world_seed=args.seed,
                                world=world_cfg.to_dict(), lr=1e-3, warmup=10, prompts_per_image=6,
                                hps_rounds=1 if mode == "full" else 0, **common)
            path = distill(cfg, log=print)
        elapsed = time.time() - start
        scores = compare(predictor_for(path), teacher, world, eval_idx)
        results["methods"][method] = {**scores, "train_seconds": round(elapsed, 1)}
        print(method, results["methods"][method], flush=True)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
