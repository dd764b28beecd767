"""Where a click's time goes: the ONNX click split into its parts, against the exact PyTorch click, in one run.

    python benchmarks/bench_click.py [--model proxy|PATH] [--precision int8] [--threads 2] [--clicks 60]

Times, round-robin on the same clicks (medians): the exact PyTorch fp32 click (`predict_best`, the
baseline of bench_core.py), the ONNX click through the predictor, the engine's decode alone, and one run
of the per-prompt decoder graph with fixed inputs. Then profiles that graph with ONNX Runtime's profiler
and prints its kernel time per kind of work (image-sized matrix products, normalisations, activations, ...)
and the slowest nodes, each as a share of the graph: what an optimisation of the click would have to
remove. Default model: the latency proxy (TinySAM's decoder with compact masks) when it has been built,
else the random TinySAM reference checkpoint.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from bench_core import ENGINES, REFERENCE, bench_image, make_predictor  # noqa: E402

# ONNX Runtime operator → kind of work (anything else counts as shape/small bookkeeping)
KINDS = {
    "matrix products": ("MatMul", "FusedMatMul", "Gemm", "FusedGemm", "MatMulInteger", "DynamicQuantizeMatMul",
                        "MatMulIntegerToFloat", "QGemm"),
    "normalisation": ("LayerNormalization", "SkipLayerNormalization", "SimplifiedLayerNormalization"),
    "activations": ("Gelu", "BiasGelu", "FastGelu", "Erf", "Relu", "Sigmoid", "Tanh"),
    "elementwise": ("Add", "Sub", "Mul", "Div", "Where", "Sqrt", "Pow"),
    "softmax": ("Softmax", "Exp", "ReduceMax", "ReduceSum"),
    "layout": ("Transpose",),
}


def kind_of(op: str) -> str:
    return next((kind for kind, ops in KINDS.items() if op in ops), "shape / small ops")


def default_model() -> str:
    from latency_proxy import proxy_path

    if proxy_path().is_file():
        return str(proxy_path())
    return str(REFERENCE) if REFERENCE.is_file() else "tinysam"


def profile_graph(session_path: Path, feeds: dict, threads: int, runs: int) -> list[tuple[float, str, str]]:
    """(median kernel ms, op, node) of every node of the graph over `runs` profiled runs."""
    import onnxruntime as ort

    from tinysam_kit.runtime.onnx_engine import session_options

    opts = session_options(threads)
    opts.enable_profiling = True
    opts.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "click")
    session = ort.InferenceSession(str(session_path), opts, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    per_node: dict[tuple[str, str], list[float]] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            key = (event["args"]["op_name"], event["name"][: -len("_kernel_time")])
            per_node.setdefault(key, []).append(event["dur"] / 1e3)
    trace.unlink()
    return sorted(((statistics.median(v), op, name) for (op, name), v in per_node.items()), reverse=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint, registered name or 'proxy' (default: see above)")
    parser.add_argument("--precision", default="int8", choices=("int8", "fp32"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clicks", type=int, default=60)
    parser.add_argument("--top", type=int, default=15, help="slowest nodes to list")
    parser.add_argument("--export-dir", default=str(Path(tempfile.gettempdir()) / "tinysam-bench-onnx"))
    args = parser.parse_args(argv)
    if args.model == "proxy":
        from latency_proxy import latency_proxy_checkpoint

        args.model = latency_proxy_checkpoint()
    model = args.model or default_model()

    import torch

    torch.set_num_threads(args.threads)
    from tinysam_kit.runtime.base import BEST_MULTIMASK
    from tinysam_kit.runtime.export import SIDE_NAMES
    from tinysam_kit.runtime.split_decoder import points_with_boxes

    image = bench_image(None)
    base = make_predictor(model, ENGINES["torch fp32 exact (baseline)"], args.threads, args.export_dir)
    onnx = make_predictor(model, ENGINES[f"onnx {args.precision}"], args.threads, args.export_dir)
    engine = onnx.engine
    states = {"base": base.embed(image), "onnx": onnx.embed(image)}
    rng = np.random.default_rng(0)
    clicks = rng.uniform((0, 0), (image.shape[1] - 1, image.shape[0] - 1), size=(args.clicks, 2))

    def prompt(xy):
        return torch.from_numpy(np.asarray(xy, np.float32)).reshape(1, 1, 2), torch.ones((1, 1))

    coords, labels = points_with_boxes(*prompt(clicks[0]), None)
    feeds = dict(zip(SIDE_NAMES, engine.image_side(states["onnx"].embedding)))
    feeds.update(point_coords=coords.numpy(), point_labels=labels.numpy(),
                 mask_tokens=np.array([BEST_MULTIMASK], np.int64))
    jobs = {
        "exact PyTorch fp32 click (baseline)": lambda xy: base.predict_best([xy], [1], image_embedding=states["base"]),
        f"ONNX {args.precision} click (predict_best)": lambda xy: onnx.predict_best([xy], [1],
                                                                                  image_embedding=states["onnx"]),
        "  engine.decode (graph + prompt handling)": lambda xy: engine.decode(states["onnx"].embedding, *prompt(xy),
                                                                              None, None, tokens=(BEST_MULTIMASK,)),
        "  per-prompt graph run alone": lambda _xy: engine.decoder_prompt.run(None, feeds),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(args.clicks + 1):
        for name, job in jobs.items():
            t0 = time.perf_counter()
            job(clicks[r % len(clicks)])
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - t0)
    ms = {name: statistics.median(v) * 1e3 for name, v in times.items()}
    names = list(jobs)
    print(f"model {model}\n1024×1024 image, {args.threads} threads, medians of {args.clicks} clicks, round-robin\n")
    for name in names:
        print(f"{name:46s} {ms[name]:7.2f} ms   {ms[names[0]] / ms[name]:5.2f}× the baseline's speed")
    click, graph = ms[names[1]], ms[names[3]]
    target = ms[names[0]] / 4
    print(f"\nclick outside the graph (prompt handling, upsampling, mask): {click - graph:.2f} ms"
          f"\na 4× click needs ≤ {target:.2f} ms: "
          + (f"{click - target:.2f} ms less than now" if click > target else "met"))

    nodes = profile_graph(engine.files["decoder_prompt"], feeds, args.threads, runs=max(20, args.clicks // 2))
    total = sum(n[0] for n in nodes)
    by_kind: dict[str, float] = {}
    for t, op, _ in nodes:
        by_kind[kind_of(op)] = by_kind.get(kind_of(op), 0.0) + t
    print(f"\nper-prompt graph, profiled kernel time by kind ({len(nodes)} nodes; shares of the graph, "
          f"scaled to its unprofiled {graph:.2f} ms):")
    for kind, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:24s} {100 * t / total:5.1f} %  {graph * t / total:6.2f} ms")
    print(f"\nslowest {args.top} nodes:")
    for t, op, name in nodes[: args.top]:
        print(f"  {graph * t / total:6.2f} ms  {op:22s} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
