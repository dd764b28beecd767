"""GPU check: one command, under 8 minutes on one H100. Every number is measured in this run and given as a
ratio to the project's exact fp32 path on the same device (and parity against the CPU exact path).

    python benchmarks/gpu_check.py                      # CUDA; official TinySAM weights if present, else
                                                        # the official architecture with seeded random weights
    python benchmarks/gpu_check.py --model tinysam --json gpu.json
    python benchmarks/gpu_check.py --device cpu --quick --model PATH   # the same logic, tiny sizes (tests)

Variants: `exact` (fp32, the model's own forward code: the baseline), `fp32` (the default optimised path),
`fp16` (CUDA only). Reported per variant:
  * parity vs the CPU exact path: embedding max |Δ| (relative to its scale), low-res logit max |Δ|, and mask
    agreement (mean IoU of thresholded masks) over a fixed grid of single-point prompts;
  * encoder images/s at batch 1, 8, 32 (`encode_batch`);
  * click latency (one point on a cached embedding, median ms);
  * hierarchical everything images/s (1024-px inputs, batched encoding) and prompts decoded per image, with
    post-processing on the device (the default on CUDA) and, for comparison, on the host, and how well the
    two runs' masks agree, and (optimised variants) with the other device kind's prompts per decoder call
    (4 on CPU, 64 on CUDA) on the same images;
  * peak GPU memory of the variant's everything run.
Targets (issue 17): fp16 everything ≥ 50 images/s, encoder ≥ 500 images/s at batch 32, fp16 masks agree
with fp32 at mean IoU ≥ 0.98.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tinysam_kit.inference.batch import embed_many, run_everything  # noqa: E402
from tinysam_kit.inference.predictor import TinySamPredictor  # noqa: E402
from tinysam_kit.runtime import TorchEngine  # noqa: E402
from tinysam_kit.runtime.split_decoder import GPU_PROMPT_CHUNK, PROMPT_CHUNK  # noqa: E402


def load_network(name: str):
    """(model, description): registered weights or a checkpoint; `auto` falls back to the official
    architecture with seeded random weights (speed and parity do not depend on the weights)."""
    from tinysam_kit.models.registry import ModelNotAvailableError, load_model_with_info
    from tinysam_kit.models.sam import build_model

    if name == "random":
        torch.manual_seed(0)
        return build_model(), "official TinySAM architecture, seeded random weights"
    try:
        model, resolved, sha = load_model_with_info("tinysam" if name == "auto" else name, device="cpu",
                                                    download=False)
        return model, f"{resolved} weights (sha256 {sha[:12]})"
    except ModelNotAvailableError:
        if name != "auto":
            raise
        return load_network("random")


def make_images(n: int, size: int) -> list[np.ndarray]:
    """A fixed set of photo-like images: noise background and filled shapes."""
    import cv2

    rng = np.random.default_rng(0)
    images = []
    for _ in range(n):
        img = rng.integers(0, 50, (size, size, 3), dtype=np.uint8)
        for _ in range(10):
            c = (int(rng.integers(0, size)), int(rng.integers(0, size)))
            color = tuple(int(v) for v in rng.integers(60, 255, 3))
            r = int(rng.integers(size // 20, size // 5))
            if rng.random() < 0.5:
                cv2.circle(img, c, r, color, -1)
            else:
                cv2.rectangle(img, c, (min(size - 1, c[0] + r), min(size - 1, c[1] + r)), color, -1)
        images.append(img)
    return images


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def prompt_grid(size: int, n: int) -> np.ndarray:
    ticks = (np.arange(n) + 0.5) * size / n
    return np.stack(np.meshgrid(ticks, ticks), -1).reshape(-1, 2)


def parity(predictor: TinySamPredictor, reference: TinySamPredictor, images, points) -> dict:
    """Embedding and logit differences and mask IoU against the CPU exact path, over single-point prompts."""
    emb_diff, logit_diff, ious = 0.0, 0.0, []
    for image in images:
        s, r = predictor.embed(image, cache=False), reference.embed(image, cache=False)
        e, er = torch.as_tensor(s.embedding).float().cpu(), torch.as_tensor(r.embedding).float().cpu()
        emb_diff = max(emb_diff, float((e - er).abs().max() / er.abs().max().clamp_min(1e-12)))
        for point in points:
            m, _, lo = predictor.predict(point[None], np.array([1]), image_embedding=s)
            mr, _, lr = reference.predict(point[None], np.array([1]), image_embedding=r)
            logit_diff = max(logit_diff, float((torch.as_tensor(lo) - torch.as_tensor(lr)).abs().max()))
            for a, b in zip(np.asarray(m), np.asarray(mr)):
                union = np.logical_or(a, b).sum()
                ious.append(1.0 if union == 0 else np.logical_and(a, b).sum() / union)
    return {"embedding_rel_max_abs_diff": emb_diff, "logit_max_abs_diff": logit_diff,
            "mask_mean_iou": float(np.mean(ious)), "mask_min_iou": float(np.min(ious))}


def measure(name: str, engine: TorchEngine, reference: TinySamPredictor, images, args) -> dict:
    device = engine.device
    predictor = TinySamPredictor(engine)
    out = {"variant": name}
    points = prompt_grid(images[0].shape[0], args.parity_grid)
    out["parity_vs_cpu_exact"] = parity(predictor, reference, images[: args.parity_images], points)
    out["encoder_images_per_s"] = {}
    for batch in args.batches:
        stack = [images[i % len(images)] for i in range(batch)]
        seconds = timed(lambda stack=stack: embed_many(predictor, stack), device, args.repeat)
        out["encoder_images_per_s"][batch] = batch / seconds
    state = predictor.embed(images[0], cache=False)
    click = points[len(points) // 2][None]
    out["click_latency_ms"] = 1000 * timed(lambda: predictor.predict(click, np.array([1]), image_embedding=state),
                                           device, args.clicks)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds, results = everything_run(name, predictor, images, args, "device")
    out["everything_images_per_s"] = len(images) / seconds
    out["prompts_per_image"] = float(np.mean([r.stats["prompts_decoded"] for r in results]))
    out["masks_per_image"] = float(np.mean([len(r.records) for r in results]))
    out["peak_gpu_memory_mib"] = (torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None
    out["_records"] = [r.records for r in results]
    host_seconds, host_results = everything_run(name, predictor, images[: args.host_images], args, "host")
    out["everything_host_postprocess_images_per_s"] = len(host_results) / host_seconds
    out["device_vs_host_postprocess_agreement"] = everything_agreement(
        [r.records for r in results[: len(host_results)]], [r.records for r in host_results])
    if not engine.exact:
        out["prompt_chunk"] = prompt_chunk_comparison(name, predictor, images[: args.host_images], args)
    return out


def prompt_chunk_comparison(name: str, predictor: TinySamPredictor, images, args) -> dict:
    """Everything-mode images/s with the engine's prompts per decoder call and with the other device kind's
    (4 on CPU, 64 on CUDA), on the same images."""
    engine = predictor.engine
    default = engine.prompt_chunk
    other = PROMPT_CHUNK if default != PROMPT_CHUNK else GPU_PROMPT_CHUNK
    speeds = {}
    for chunk in (default, other):
        engine.prompt_chunk = chunk
        try:
            seconds, results = everything_run(name, predictor, images, args, "device")
        finally:
            engine.prompt_chunk = default
        speeds[chunk] = len(results) / seconds
    return {"default": default, "other": other, "default_images_per_s": speeds[default],
            "other_images_per_s": speeds[other]}


def everything_run(name: str, predictor: TinySamPredictor, images, args, postprocess: str):
    """(seconds, results) of hierarchical everything mode over `images`, after a one-image warm-up."""
    device = predictor.engine.device
    params = {"points_per_side": args.points_per_side, "output_mode": "coco_rle", "postprocess": postprocess}
    list(run_everything(predictor, images[:1], batch_size=1, **params))
    sync(device)
    t = time.perf_counter()
    results = list(run_everything(predictor, images, batch_size=args.everything_batch, **params))
    sync(device)
    seconds = time.perf_counter() - t
    failed = [r.error for r in results if r.error]
    if failed:
        raise RuntimeError(f"{name}: everything mode ({postprocess} post-processing) failed: {failed[0]}")
    return seconds, results


def everything_agreement(records_a, records_b) -> float:
    """Mean over images of the best-match IoU of each mask in `a` against the masks of `b` (COCO RLE)."""
    from tinysam_kit.inference.encodings.coco import coco_rle_to_mask

    scores = []
    for ra, rb in zip(records_a, records_b):
        mb = [coco_rle_to_mask(r["segmentation"]) for r in rb]
        for r in ra:
            a = coco_rle_to_mask(r["segmentation"])
            best = max((np.logical_and(a, b).sum() / max(1, np.logical_or(a, b).sum()) for b in mb), default=0.0)
            scores.append(best)
    return float(np.mean(scores)) if scores else 1.0


def run(args) -> dict:
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; run with --device cpu --quick to check the logic")
    model, weights = load_network(args.model)
    size = args.image_size or model.config.img_size
    images = make_images(args.images, size)
    reference = TinySamPredictor(TorchEngine(model, device="cpu", exact=True))
    variants = [("exact", {"exact": True}), ("fp32", {})]
    if device.type == "cuda":
        variants.append(("fp16", {"precision": "fp16"}))
    rows = [measure(name, TorchEngine(model, device=str(device), **opts), reference, images, args)
            for name, opts in variants]
    base = rows[0]
    for row in rows:
        row["vs_exact"] = {
            "encoder": {b: row["encoder_images_per_s"][b] / base["encoder_images_per_s"][b] for b in args.batches},
            "click_speedup": base["click_latency_ms"] / row["click_latency_ms"],
            "everything": row["everything_images_per_s"] / base["everything_images_per_s"],
            "peak_memory": (row["peak_gpu_memory_mib"] / base["peak_gpu_memory_mib"]
                            if base["peak_gpu_memory_mib"] else None),
            "everything_mask_agreement": everything_agreement(row["_records"], base["_records"]),
        }
    for row in rows:
        row.pop("_records")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    return {"device": name, "torch": torch.__version__, "weights": weights, "image_size": size,
            "images": len(images), "points_per_side": args.points_per_side, "rows": rows}


def report(result: dict) -> None:
    print(f"device {result['device']}, torch {result['torch']}, {result['weights']}; {result['images']} images "
          f"{result['image_size']} px, hierarchical everything at {result['points_per_side']} points/side")
    batches = list(result["rows"][0]["encoder_images_per_s"])
    print("variant  emb rel|Δ|  logit |Δ|  mask IoU  " + "  ".join(f"enc b{b} img/s (×)" for b in batches)
          + "  click ms (×)  everything img/s (×)  host-post img/s  dev~host  prompts/img  peak MiB (×)"
          + "  masks vs exact  img/s by prompts per call")
    for row in result["rows"]:
        p, v = row["parity_vs_cpu_exact"], row["vs_exact"]
        enc = "  ".join(f"{row['encoder_images_per_s'][b]:9.1f} ({v['encoder'][b]:.2f})" for b in batches)
        mem = (f"{row['peak_gpu_memory_mib']:8.0f} ({v['peak_memory']:.2f})" if row["peak_gpu_memory_mib"]
               else "       -")
        print(f"{row['variant']:<7} {p['embedding_rel_max_abs_diff']:10.2e} {p['logit_max_abs_diff']:10.2e} "
              f"{p['mask_mean_iou']:8.4f}  {enc}  {row['click_latency_ms']:7.2f} ({v['click_speedup']:.2f})  "
              f"{row['everything_images_per_s']:10.2f} ({v['everything']:.2f})  "
              f"{row['everything_host_postprocess_images_per_s']:15.2f}  "
              f"{row['device_vs_host_postprocess_agreement']:8.4f}"
              f"  {row['prompts_per_image']:10.1f}"
              f"  {mem}  {v['everything_mask_agreement']:.4f}  {chunk_speeds(row)}")


def chunk_speeds(row: dict) -> str:
    chunk = row.get("prompt_chunk")
    if not chunk:
        return "-"
    return (f"{chunk['default']}: {chunk['default_images_per_s']:.2f}, "
            f"{chunk['other']}: {chunk['other_images_per_s']:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (logic check)")
    ap.add_argument("--model", default="auto", help="auto, random, a registered name or a checkpoint path")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: checks the logic in seconds")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    if args.quick:
        args.images, args.image_size, args.batches, args.repeat, args.clicks = 2, None, [1, 2], 1, 3
        args.points_per_side, args.everything_batch, args.parity_images, args.parity_grid = 8, 2, 1, 2
        args.host_images = 2
    else:
        args.images, args.image_size, args.batches, args.repeat, args.clicks = 64, 1024, [1, 8, 32], 5, 50
        args.points_per_side, args.everything_batch, args.parity_images, args.parity_grid = 32, 8, 2, 4
        args.host_images = 16
    result = run(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
