"""Core speed benchmark: encoder, click latency and everything mode, every engine side by side in one run.

    python benchmarks/bench_core.py [--threads 2] [--repeats 5] [--model PATH] [--image PATH]

Prints, for a 1024-pixel image and the thread count: encoder time per engine/precision; click latency
(decoder + post-processing of one point prompt on a cached embedding, through TinySamPredictor: `click` is
`predict_best`, the one mask a click is answered with; `3 masks` is `predict`, SAM's full answer);
everything-mode time, decoder prompts and peak RSS for dense vs hierarchical (each in a fresh process so
peak RSS is its own); and each figure's ratio to the exact PyTorch fp32 path. Medians after a warm-up.
Default model: the TinySAM-architecture random reference checkpoint (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REFERENCE = REPO.parent / "shared" / "reference" / "set_a" / "tinysam_random_A.pth"


def bench_image(path: str | None) -> np.ndarray:
    from tinysam_kit.data.images import load_image

    if path:
        return load_image(path)
    from tinysam_kit.data.synthetic import SyntheticWorld

    return SyntheticWorld(seed=7)[0].resized(1024).image  # 1024×1024 scene with several objects


def make_predictor(model: str, spec: dict, threads: int, export_dir: str):
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.runtime import create_engine

    options = dict(spec.get("options", {}))
    if spec["engine"] == "onnx":
        options["export_dir"] = export_dir
    engine = create_engine(model, engine=spec["engine"], precision=spec["precision"], device="cpu",
                           threads=threads, **options)
    return TinySamPredictor(engine)


ENGINES = {
    "torch fp32 exact (baseline)": {"engine": "torch", "precision": "fp32", "options": {"exact": True}},
    "torch fp32 optimised": {"engine": "torch", "precision": "fp32"},
    "torch bf16": {"engine": "torch", "precision": "bf16"},
    "onnx fp32": {"engine": "onnx", "precision": "fp32"},
    "onnx int8": {"engine": "onnx", "precision": "int8"},
    # x86 CPUs with VNNI/AMX: PT2E int8 encoder compiled by Inductor (runtime/torch_int8.py)
    "torch int8": {"engine": "torch", "precision": "int8"},
}


def _everything_worker(queue, model, spec, threads, export_dir, image, mode, params):
    import torch

    torch.set_num_threads(threads)
    from tinysam_kit.inference.everything import generate_everything

    predictor = make_predictor(model, spec, threads, export_dir)
    predictor.embed(image, key="bench")
    t0 = time.perf_counter()
    records, stats = generate_everything(predictor, image, mode=mode, key="bench", return_stats=True, **params)
    seconds = time.perf_counter() - t0
    masks = [r["segmentation"] for r in records]
    queue.put({"seconds": seconds, "prompts": stats.get("prompts_decoded"), "records": len(records),
               "peak_rss_mb": peak_rss_mb(),
               "masks": np.packbits(np.stack(masks), axis=-1) if masks else None,
               "shape": image.shape[:2]})


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the address space, which exec replaces; the
    rusage maximum survives exec, so a worker spawned by a parent holding models would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_everything(model, spec, threads, export_dir, image, mode, params) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_everything_worker,
                       args=(queue, model, spec, threads, export_dir, image, mode, params))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def unpack_masks(result) -> np.ndarray:
    if result["masks"] is None:
        return np.zeros((0, *result["shape"]), bool)
    h, w = result["shape"]
    return np.unpackbits(result["masks"], axis=-1, count=w).astype(bool).reshape(-1, h, w)


def agreement(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """For each exact-path mask, the best IoU among the candidate's masks."""
    if len(reference) == 0:
        return {"reference_masks": 0, "candidate_masks": len(candidate)}
    if len(candidate) == 0:
        return {"reference_masks": len(reference), "candidate_masks": 0, "mean_best_iou": 0.0,
                "matched_at_0.9": 0.0}
    r = reference.reshape(len(reference), -1).astype(np.float32)
    c = candidate.reshape(len(candidate), -1).astype(np.float32)
    inter = r @ c.T
    union = r.sum(1)[:, None] + c.sum(1)[None, :] - inter
    best = (inter / np.maximum(union, 1)).max(axis=1)
    return {"reference_masks": len(reference), "candidate_masks": len(candidate),
            "mean_best_iou": float(best.mean()), "matched_at_0.9": float((best >= 0.9).mean())}


def print_engine_table(results: dict, predictors: dict, base: str) -> None:
    print(f"{'engine':32s} {'encoder s':>10s} {'× base':>7s} {'click ms':>9s} {'speed-up':>8s} "
          f"{'3 masks ms':>10s} {'speed-up':>8s}")
    for name in predictors:
        enc, clk, three = (results[k][name] for k in ("encoder", "click", "click_3_masks"))
        base_clk, base_three = results["click"][base], results["click_3_masks"][base]
        print(f"{name:32s} {enc:10.3f} {enc / results['encoder'][base]:7.2f} {clk * 1e3:9.1f} "
              f"{base_clk / clk:7.1f}× {three * 1e3:10.1f} {base_three / three:7.1f}×")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--model", default=str(REFERENCE) if REFERENCE.is_file() else "tinysam",
                        help="checkpoint or registered name (default: the random reference weights); 'proxy': "
                             "TinySAM's decoder with compact masks (latency_proxy.py)")
    parser.add_argument("--image", help="image to use (default: a synthetic 1024×1024 scene)")
    parser.add_argument("--export-dir", default=os.path.join(tempfile.gettempdir(), "tinysam-bench-onnx"))
    parser.add_argument("--points-per-side", type=int, default=32)
    parser.add_argument("--skip-everything", action="store_true")
    parser.add_argument("--skip-encoder-click", action="store_true", help="only the everything-mode table")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.model == "proxy":
        from latency_proxy import latency_proxy_checkpoint

        args.model = latency_proxy_checkpoint()

    import torch

    torch.set_num_threads(args.threads)
    from tinysam_kit.runtime import EngineUnavailableError

    image = bench_image(args.image)
    print(f"model {args.model}\nimage {image.shape[1]}×{image.shape[0]}, threads {args.threads}, "
          f"torch {torch.__version__}, medians of {args.repeats} after warm-up\n")
    results: dict = {"threads": args.threads, "image": list(image.shape[:2]), "encoder": {}, "click": {}}
    predictors = {}
    for name, spec in ({} if args.skip_encoder_click else ENGINES).items():
        try:
            predictors[name] = make_predictor(args.model, spec, args.threads, args.export_dir)
        except EngineUnavailableError as exc:
            print(f"{name}: unavailable ({exc})")
    base = "torch fp32 exact (baseline)"
    rng = np.random.default_rng(0)
    h, w = image.shape[:2]
    clicks = rng.uniform((0, 0), (w - 1, h - 1), size=(args.clicks, 2))
    # Round-robin over the engines (one timing of each per round) so that drift of a noisy machine hits
    # every engine alike; medians per engine after a warm-up round.
    tensors = {name: p.preprocess(image)[0] for name, p in predictors.items()}
    states = {name: p.embed(image) for name, p in predictors.items()}
    jobs = {
        "encoder": lambda p, name, _xy: p.engine.encode(tensors[name]),
        # what a click answers with: the best of the three masks, at the image's resolution
        "click": lambda p, name, xy: p.predict_best([xy], [1], image_embedding=states[name]),
        # SAM's full answer: all three masks and their scores
        "click_3_masks": lambda p, name, xy: p.predict([xy], [1], image_embedding=states[name]),
    }
    for kind, job in jobs.items():
        rounds = args.repeats if kind == "encoder" else args.clicks
        times: dict[str, list[float]] = {name: [] for name in predictors}
        for r in range(rounds + 1):
            for name, p in predictors.items():
                t0 = time.perf_counter()
                job(p, name, clicks[r % len(clicks)])
                if r:  # round 0 warms up
                    times[name].append(time.perf_counter() - t0)
        results.setdefault(kind, {}).update({name: statistics.median(v) for name, v in times.items()})
    if predictors:
        print_engine_table(results, predictors, base)
        print()
    from tinysam_kit.evaluation.quantization import fidelity

    for int8, fp32 in (("onnx int8", "onnx fp32"), ("torch int8", "torch fp32 optimised")):
        if int8 in predictors and fp32 in predictors:
            fid = fidelity(predictors[fp32], predictors[int8], [image], prompts_per_image=32)
            results.setdefault("int8_fidelity_on_bench_model", {})[int8] = fid
            print(f"{int8} vs {fp32} on this model and image: embedding cosine {fid['embedding_cosine_min']:.4f}, "
                  f"mask IoU mean {fid['mask_iou_mean']:.4f} (p05 {fid['mask_iou_p05']:.3f})")
    del predictors

    if not args.skip_everything:
        params = {"points_per_side": args.points_per_side}
        runs = [("dense", base), ("hierarchical", base), ("hierarchical", "torch fp32 optimised"),
                ("hierarchical", "onnx int8")]
        out = {}
        print(f"\neverything mode ({args.points_per_side}² grid), each run in a fresh process:")
        print(f"{'mode / engine':48s} {'seconds':>8s} {'× base':>7s} {'prompts':>8s} {'masks':>6s} {'peak RSS MB':>11s}"
              f" {'agreement (mean best IoU / ≥0.9)':>34s}")
        for mode, name in runs:
            r = run_everything(args.model, ENGINES[name], args.threads, args.export_dir, image, mode, params)
            out[f"{mode} / {name}"] = r
            b = out[f"dense / {base}"]
            agree = agreement(unpack_masks(b), unpack_masks(r))
            r["agreement_with_exact_dense"] = agree
            text = f"{agree.get('mean_best_iou', float('nan')):.3f} / {agree.get('matched_at_0.9', float('nan')):.2f}"
            print(f"{mode + ' / ' + name:48s} {r['seconds']:8.2f} {r['seconds'] / b['seconds']:7.3f} "
                  f"{r['prompts']!s:>8s} {r['records']:6d} {r['peak_rss_mb']:11.0f} {text:>34s}")
        results["everything"] = {k: {kk: vv for kk, vv in v.items() if kk != "masks"} for k, v in out.items()}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
