"""`tinysam train-demo`, `tinysam train-teacher` and `tinysam distill` (heavy imports stay inside the callables)."""

from __future__ import annotations


def _train_demo(args) -> int:
    from tinysam_kit.training.demo import train_demo

    overrides = {}
    if args.steps is not None:
        overrides["steps"] = args.steps
    if args.threads is not None:
        overrides["threads"] = args.threads
    overrides["device"] = args.device
    path = train_demo(args.out, install=args.install, stages=args.stages, **overrides)
    print(path)
    return 0


def _distill(args) -> int:
    from dataclasses import replace

    from tinysam_kit.training.distill import DistillConfig, Distiller, load_student_config

    student = load_student_config(args.student)
    cfg = DistillConfig(teacher=args.teacher, student=student.to_dict(), out_dir=args.out, mode=args.mode,
                        images=args.images, synthetic_images=args.synthetic or 0)
    overrides = {k: v for k, v in (
        ("steps", args.steps), ("batch_images", args.batch_size), ("prompts_per_image", args.prompts),
        ("hps_rounds", args.hps_rounds), ("lr", args.lr), ("seed", args.seed), ("threads", args.threads),
        ("embedding_cache", args.embedding_cache), ("student_init", args.student_init),
        ("checkpoint_every", args.checkpoint_every)) if v is not None}
    cfg = replace(cfg, device=args.device, amp=args.amp,
                  hard_mask_weighting=not args.no_hard_mask_weighting, **overrides)
    distiller = Distiller(cfg)
    if args.precompute:
        distiller.precompute()
    print(distiller.run())
    return 0


def _train_teacher(args) -> int:
    import json
    from dataclasses import replace

    from tinysam_kit.data.synthetic import WorldConfig
    from tinysam_kit.training.distill import load_student_config
    from tinysam_kit.training.supervised import SupervisedConfig, train_supervised

    config = load_student_config(args.config)
    cfg = SupervisedConfig(model=json.loads(json.dumps(config.to_dict())), out_dir=args.out,
                           world=WorldConfig(size=config.img_size).to_dict())
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_images", args.batch_size), ("lr", args.lr),
                                   ("seed", args.seed), ("world_seed", args.world_seed),
                                   ("threads", args.threads)) if v is not None}
    print(train_supervised(replace(cfg, device=args.device, amp=args.amp, **overrides)))
    return 0


def _evaluate(args) -> int:
    import json

    from tinysam_kit.data.synthetic import SyntheticWorld, WorldConfig
    from tinysam_kit.evaluation.quality import evaluate_everything, evaluate_prompts, held_out_indices
    from tinysam_kit.inference.predictor import TinySamPredictor

    predictor = TinySamPredictor.from_pretrained(args.model, device=args.device)
    world = SyntheticWorld(args.world_seed, WorldConfig(size=predictor.img_size))
    quality = evaluate_prompts(predictor, world, held_out_indices(args.images))
    result: dict = quality.summary()
    if args.breakdown:
        result |= quality.breakdown()
    if args.everything:
        result["everything"] = evaluate_everything(predictor, world, held_out_indices(args.everything, start=100))
    print(json.dumps(result, indent=2))
    return 0


def register(subparsers) -> None:
    e = subparsers.add_parser("evaluate-synthetic", help="mask quality of a model on held-out synthetic images",
                              description="One centre click, one random click and the box of every object on "
                                          "held-out synthetic-world images; optionally everything-mode recall.")
    e.add_argument("--model", default="demo", help="registered name or checkpoint path")
    e.add_argument("--images", type=int, default=16)
    e.add_argument("--everything", type=int, default=0, help="also run everything mode on this many images")
    e.add_argument("--world-seed", type=int, default=0)
    e.add_argument("--breakdown", action="store_true", help="also report mean IoUs per object shape and size")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=_evaluate)

    d = subparsers.add_parser(
        "distill", help="distil a SAM-family teacher into a smaller student (decoupled or full-stage)",
        description="Knowledge distillation of a teacher (SAM ViT-B/L/H, TinySAM, or any checkpoint the "
                    "predictor loads) into a student. Resumes from OUT when interrupted; launch with torchrun "
                    "for several GPUs.")
    d.add_argument("--teacher", required=True, help="registered model name or checkpoint path")
    src = d.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", help="folder of training images (searched recursively)")
    src.add_argument("--synthetic", type=int, help="use this many synthetic-world images instead")
    d.add_argument("--student", default="vit_t", help="vit_t (TinySAM, default), demo, or a JSON model config")
    d.add_argument("--mode", choices=("full", "decoupled"), default="full",
                   help="full: TinySAM full-stage KD + hard prompt sampling; decoupled: MobileSAM embedding KD")
    d.add_argument("--out", required=True, help="run directory (state, config, final student.pth)")
    d.add_argument("--steps", type=int)
    d.add_argument("--batch-size", type=int, help="images per step (per process)")
    d.add_argument("--prompts", type=int, help="prompts per image (full mode)")
    d.add_argument("--hps-rounds", type=int, help="online hard prompt sampling rounds (full mode)")
    d.add_argument("--no-hard-mask-weighting", action="store_true")
    d.add_argument("--lr", type=float)
    d.add_argument("--seed", type=int)
    d.add_argument("--student-init", help="start the student from this checkpoint")
    d.add_argument("--embedding-cache", help="directory of precomputed teacher embeddings")
    d.add_argument("--precompute", action="store_true", help="fill --embedding-cache for all images first")
    d.add_argument("--checkpoint-every", type=int)
    d.add_argument("--device", default="auto")
    d.add_argument("--amp", default="auto", choices=("auto", "off", "fp16", "bf16"))
    d.add_argument("--threads", type=int)
    d.set_defaults(func=_distill)

    t = subparsers.add_parser("train-teacher", help="train a SAM-style model from scratch on the synthetic world")
    t.add_argument("--config", default="demo", help="vit_t, demo or a JSON model config")
    t.add_argument("--out", required=True)
    t.add_argument("--steps", type=int)
    t.add_argument("--batch-size", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--seed", type=int)
    t.add_argument("--world-seed", type=int)
    t.add_argument("--device", default="auto")
    t.add_argument("--amp", default="auto", choices=("auto", "off", "fp16", "bf16"))
    t.add_argument("--threads", type=int)
    t.set_defaults(func=_train_teacher)

    p = subparsers.add_parser("train-demo", help="train the bundled demo model on the synthetic world (seeded)",
                              description="Train the small `demo` model from scratch on the synthetic world. "
                                          "Resumes from OUT/train_state.pt when interrupted.")
    p.add_argument("--out", required=True, help="run directory (checkpoints, config, final model.pth)")
    p.add_argument("--steps", type=int, default=None, help="override the recipe's number of steps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (recipe: 1, deterministic)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--stages", type=int, choices=(1, 2), default=2,
                   help="1: the from-scratch curriculum only; 2 (recipe): plus training at 256 px with "
                        "re-estimated, frozen BatchNorm statistics")
    p.add_argument("--install", action="store_true",
                   help="copy the result into the package as tinysam_kit/models/weights/demo.pth")
    p.set_defaults(func=_train_demo)
