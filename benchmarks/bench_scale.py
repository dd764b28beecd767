"""Scale-out throughput: the single-process `tinysam everything`, the same command with one worker process per
core (`--workers N`), and the Ray pipeline on one and two worker nodes, with per-stage times of the
single-process pipeline, all measured in one run on this machine.

    python benchmarks/bench_scale.py                        # 16 images 480×640, demo model, 16 points/side
    python benchmarks/bench_scale.py --images 32 --points-per-side 16 --json out.json
    python benchmarks/bench_scale.py --no-ray               # one machine only (Ray needs root for its netns)
    python benchmarks/bench_scale.py --ray-only --ray-worker-niceness 0   # Ray's actors at the driver's priority

Every model runs with one thread on one pinned core (`taskset`): the single process on core 0, Ray worker
node 1 on core 0 and node 2 on core 1 (each a `--num-cpus=1` node; the head holds no CPUs, so all actors run
on the workers). Ray runs on a loopback-only network namespace cluster (tests/ray_helpers.py; needs root).

The multi-worker command is not pinned: N = the usable cores, one worker process with one thread on each.

Printed, as ratios measured in this run:
  * stage times per image (read, decode, encode, prompt decode, post-process, write; measured before and after
    the command runs, the faster of the two kept: the host's speed drifts) and the single-process
    pipeline's throughput against its slowest stage (target ≥ 0.9×) and against the serial sum of stages;
  * images/s of the command with one worker (pinned to one core; and unpinned with N threads) and with N
    workers, end to end and steady (first to last per-image file written); N workers against the slowest
    stage (target ≥ 0.9×), against one worker, and the bound N cores / (CPU seconds per image) that N
    processes cannot beat;
  * images/s of the single-process command, Ray with one worker node and with two (target: two ≥ 1.7× one),
    end to end (process start to last file) and steady (first to last finished image, start-up excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

TINYSAM = str(Path(sys.executable).parent / "tinysam")


def make_photos(directory: Path, n: int, height: int, width: int) -> list[Path]:
    """JPEGs with overlapping shapes and texture (decoding and segmenting cost like real photos)."""
    import numpy as np
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        base = rng.integers(0, 40, (height, width, 3), dtype=np.uint8)
        img = Image.fromarray(base)
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            x1, y1 = x0 + int(rng.integers(30, width // 3)), y0 + int(rng.integers(30, height // 3))
            color = tuple(int(c) for c in rng.integers(60, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
        paths.append(directory / f"photo_{i:03d}.jpg")
        img.save(paths[-1], quality=90)
    return paths


def model_args(args) -> list[str]:
    return ["--model", args.model, "--points-per-side", str(args.points_per_side), "--threads", "1", "--workers", "1"]


# ------------------------------------------------------------------------------ single process (one core)
def measure_single(args) -> dict:
    """In this process (pinned by the caller): per-stage times, then the real pipeline on fresh output."""
    import torch

    from tinysam_kit.cli.common import list_images
    from tinysam_kit.data.images import load_image
    from tinysam_kit.inference.batch import CocoFolderSink, PrelabelResult, coco_key, run_everything
    from tinysam_kit.inference.everything import EverythingGenerator
    from tinysam_kit.inference.policy import everything_params
    from tinysam_kit.inference.predictor import TinySamPredictor

    torch.set_num_threads(1)
    src = Path(args.src)
    images = list_images(src)
    predictor = TinySamPredictor.from_pretrained(args.model, device="cpu", threads=1)
    params = everything_params(predictor.model_name, {"points_per_side": args.points_per_side}, prelabel=True)
    engine = predictor.engine
    decode_seconds = [0.0]
    plain_decode = engine.decode

    def timed_decode(*a, **k):
        t = time.perf_counter()
        try:
            return plain_decode(*a, **k)
        finally:
            decode_seconds[0] += time.perf_counter() - t

    generator = EverythingGenerator(predictor, "hierarchical", output_mode="coco_rle", **params)

    def stage_pass() -> dict:
        stages = dict.fromkeys(("read", "decode", "encode", "prompt_decode", "post_process", "write"), 0.0)
        with tempfile.TemporaryDirectory() as tmp:
            sink = CocoFolderSink(tmp, src, info={"mode": "hierarchical", "params": params})
            engine.decode = timed_decode
            for path in images:
                t0 = time.perf_counter()
                data = path.read_bytes()
                t1 = time.perf_counter()
                image = load_image(data)
                t2 = time.perf_counter()
                state = predictor.embed(image, cache=False)
                t3 = time.perf_counter()
                decode_seconds[0] = 0.0
                records = generator.generate(image_embedding=state)
                t4 = time.perf_counter()
                sink.write(coco_key(path, src), PrelabelResult(path, records, None, *image.shape[:2],
                                                               dict(generator.stats), predictor.model_version))
                t5 = time.perf_counter()
                stages["read"] += t1 - t0
                stages["decode"] += t2 - t1
                stages["encode"] += t3 - t2
                stages["prompt_decode"] += decode_seconds[0]
                stages["post_process"] += (t4 - t3) - decode_seconds[0]
                stages["write"] += t5 - t4
            engine.decode = plain_decode
        return stages

    def pipeline_pass() -> float:
        """The command's own loop: prefetched decoding, inference, writes (model already loaded)."""
        with tempfile.TemporaryDirectory() as tmp:
            sink = CocoFolderSink(tmp, src, info={"mode": "hierarchical", "params": params})
            t0 = time.perf_counter()
            for res in run_everything(predictor, images, output_mode="coco_rle", **params):
                sink.write(coco_key(res.item, src), res)
            return time.perf_counter() - t0

    # Interleaved and best of two, so a burst of load from elsewhere hits neither side alone.
    first_stages, first_pipeline = stage_pass(), pipeline_pass()
    second_stages, second_pipeline = stage_pass(), pipeline_pass()
    stages = {k: min(first_stages[k], second_stages[k]) for k in first_stages}
    pipeline = min(first_pipeline, second_pipeline)
    n = len(images)
    return {"images": n, "stage_seconds_per_image": {k: v / n for k, v in stages.items()},
            "pipeline_images_per_s": n / pipeline}


def run_command(cmd: list[str], prefix: list[str] | None = None, env=None) -> float:
    t0 = time.perf_counter()
    result = subprocess.run((prefix or []) + cmd, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - t0


def measure_command(cmd: list[str], out: Path, images: int, prefix: list[str] | None = None, workers: int = 1) -> dict:
    """A `tinysam everything` run into a fresh `out`: end-to-end images/s (process start to exit) and steady
    images/s (first to last per-image JSON written, start-up excluded), with the machine's load average.

    Steady counts the images finished after the first one minus the other workers' first images (begun before
    that moment): with W workers busy from the same start, (n - W) / (t_last - t_first) is their rate."""
    seconds = run_command(cmd + ["--out", str(out)], prefix=prefix)
    written = sorted(p.stat().st_mtime_ns for p in out.glob("*.json") if p.name != "annotations.json")
    steady = (len(written) - workers) / ((written[-1] - written[0]) / 1e9) if len(written) > workers else 0.0
    return {"end_to_end_images_per_s": images / seconds, "steady_images_per_s": steady, "seconds": seconds,
            "load_average": os.getloadavg()}


def usable_cores() -> int:
    from tinysam_kit.inference.batch import usable_cores as cores

    return cores()


# ------------------------------------------------------------------------------------------------ Ray
def ray_driver(args) -> dict:
    """Inside the cluster's namespace: the Ray pipeline into a COCO folder, with each image's finish time."""
    from tinysam_kit.cli.common import list_images
    from tinysam_kit.inference.batch import CocoFolderSink, coco_key
    from tinysam_kit.inference.policy import EngineOptions, everything_params
    from tinysam_kit.integrations.ray import run_everything_on_ray

    t_start = time.perf_counter()
    src = Path(args.src).resolve()
    images = list_images(src)
    keys = [coco_key(p, src) for p in images]
    params = everything_params(args.model, {"points_per_side": args.points_per_side}, prelabel=True)
    finished = []

    class TimedSink(CocoFolderSink):
        def write(self, key, result):
            super().write(key, result)
            finished.append(time.perf_counter())

    sink = TimedSink(args.out, src, info={"mode": "hierarchical", "params": params}, order=keys)
    summary = run_everything_on_ray(dict(zip(keys, map(str, images))), sink, address=args.ray_driver,
                                    options=EngineOptions(args.model, threads=1), params=params, progress=False)
    sink.close()
    end = time.perf_counter()
    steady = (len(finished) - 1) / (finished[-1] - finished[0]) if len(finished) > 1 else 0.0
    return {"images": summary.written, "failed": len(summary.failures), "duplicates": summary.duplicates,
            "end_to_end_images_per_s": summary.written / (end - t_start), "steady_images_per_s": steady,
            "first_image_after_s": finished[0] - t_start if finished else None}


def measure_ray(args, workers: int) -> dict:
    from ray_helpers import LoopbackCluster

    # Ray starts its worker processes at nice 15 (RAY_worker_niceness), below the driver and Ray's own daemons
    # that share these cores; --ray-worker-niceness sets it for the measurement
    env = {} if args.ray_worker_niceness is None else {"RAY_worker_niceness": str(args.ray_worker_niceness)}
    with LoopbackCluster(workers=[1] * workers, head_cpus=0, env=env,
                         cpu_sets=[str(i % os.cpu_count()) for i in range(workers)]) as cluster:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, __file__, "--ray-driver", cluster.address, "--src", args.src, "--out", out,
                   "--model", args.model, "--points-per-side", str(args.points_per_side)]
            result = cluster.run(cmd, timeout=900)
            if result.returncode != 0:
                raise SystemExit(f"Ray driver failed:\n{result.stderr[-3000:]}")
            return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--points-per-side", type=int, default=16)
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray part (it needs root for its netns)")
    ap.add_argument("--ray-only", action="store_true", help="only the Ray part (one node, then two)")
    ap.add_argument("--ray-worker-niceness", type=int, default=None,
                    help="nice value of Ray's worker processes (default: Ray's own, 15)")
    ap.add_argument("--src", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--single-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--ray-driver", metavar="ADDRESS", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.single_worker:
        print(json.dumps(measure_single(args)))
        return 0
    if args.ray_driver:
        print(json.dumps(ray_driver(args)))
        return 0

    from ray_helpers import ray_missing_reason

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        make_photos(src, args.images, args.height, args.width)
        args.src = str(src)
        pin0 = ["taskset", "-c", "0"]
        print(f"{args.images} images {args.width}×{args.height}, model {args.model}, {args.points_per_side} "
              f"points/side, hierarchical; CPU: {cpu_name()} ({os.cpu_count()} cores)", flush=True)
        if args.ray_only:
            reason = ray_missing_reason()
            if reason:
                raise SystemExit(f"--ray-only: {reason}")
            results = {"cpu": cpu_name(), "images": args.images, "ray_worker_niceness": args.ray_worker_niceness,
                       "ray_1_node": measure_ray(args, 1), "ray_2_nodes": measure_ray(args, 2)}
            report_ray(results)
            if args.json:
                Path(args.json).write_text(json.dumps(results, indent=2))
            return 0

        def single_process() -> dict:
            out = subprocess.run(pin0 + [sys.executable, __file__, "--single-worker", "--src", str(src), "--model",
                                         args.model, "--points-per-side", str(args.points_per_side)],
                                 capture_output=True, text=True, check=True).stdout
            return json.loads(out.strip().splitlines()[-1])

        single = single_process()
        command_s = run_command([TINYSAM, "everything", str(src), "--out", str(Path(tmp) / "cli"), "--no-preview",
                                 *model_args(args)], prefix=pin0)
        cores = usable_cores()
        command = [TINYSAM, "everything", str(src), "--model", args.model, "--points-per-side",
                   str(args.points_per_side)]
        # One worker with the default threads (all cores), then one worker per core with one thread each;
        # interleaved and best of two (by end-to-end time), so a burst of load from elsewhere hits neither alone.
        runs = {"one_worker_all_threads": [], "workers": []}
        for rep in range(2):
            runs["one_worker_all_threads"].append(measure_command(
                command + ["--workers", "1"], Path(tmp) / f"cli_default{rep}", args.images))
            runs["workers"].append(measure_command(
                command + ["--workers", str(cores), "--threads", "1"], Path(tmp) / f"cli_workers{rep}", args.images,
                workers=cores))
        best = {k: max(v, key=lambda x: x["end_to_end_images_per_s"]) for k, v in runs.items()}
        one_pinned = measure_command(command + ["--workers", "1", "--threads", "1"], Path(tmp) / "cli_pinned",
                                     args.images, prefix=pin0)
        same = all((Path(tmp) / f"cli_workers{rep}" / "annotations.json").read_bytes() ==
                   (Path(tmp) / "cli_pinned" / "annotations.json").read_bytes() for rep in range(2))
        results = {"cpu": cpu_name(), "cores": cores, "workers_annotations_identical": same,
                   "images": args.images, "single": single,
                   "command_images_per_s": args.images / command_s,
                   "command_with_previews_images_per_s": one_pinned["end_to_end_images_per_s"],
                   "command_default_threads_images_per_s": best["one_worker_all_threads"]["end_to_end_images_per_s"],
                   "one_worker_pinned": one_pinned, "one_worker_all_threads": best["one_worker_all_threads"],
                   "workers": best["workers"], "workers_runs": runs,
                   "workers_no_preview": measure_command(command + ["--workers", str(cores), "--threads", "1",
                                                                    "--no-preview"], Path(tmp) / "cli_workers_np",
                                                         args.images, workers=cores)}
        # The stage table again after the command runs: this host's speed drifts over minutes, and the fastest
        # stage times measured (the highest bar for the ratios) are what the runs are compared against.
        after = single_process()
        results["single_before"], results["single_after"] = single, after
        results["single"] = {
            "images": single["images"],
            "stage_seconds_per_image": {k: min(v, after["stage_seconds_per_image"][k])
                                        for k, v in single["stage_seconds_per_image"].items()},
            "pipeline_images_per_s": max(single["pipeline_images_per_s"], after["pipeline_images_per_s"])}
        reason = "--no-ray" if args.no_ray else ray_missing_reason()
        if reason:
            print(f"Ray part skipped: {reason}")
        else:
            results["ray_1_node"] = measure_ray(args, 1)
            results["ray_2_nodes"] = measure_ray(args, 2)
    report(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def report(r: dict) -> None:
    stages = r["single"]["stage_seconds_per_image"]
    slowest = max(stages, key=stages.get)
    if "single_after" in r:
        before, after = (r[k]["stage_seconds_per_image"][slowest] for k in ("single_before", "single_after"))
        print(f"\nslowest stage measured before the runs {before:.3f} s/image, after them {after:.3f} s/image; "
              "the table keeps the faster time of each stage")
    print("\nstage (single process, 1 thread)   s/image   images/s")
    for name, sec in stages.items():
        print(f"  {name:<32} {sec:8.3f} {1 / sec if sec else float('inf'):10.2f}")
    pipe = r["single"]["pipeline_images_per_s"]
    serial = 1 / sum(stages.values())
    print(f"  pipeline (run_everything + sink)          {pipe:10.2f}")
    print(f"pipeline / slowest stage ({slowest}): {pipe * stages[slowest]:.2f}× (target ≥ 0.9×); "
          f"pipeline / serial sum of stages: {pipe / serial:.2f}×")
    print("\nrun                                end-to-end img/s   steady img/s")
    print(f"  single-process command (no previews) {r['command_images_per_s']:10.3f}")
    print(f"  single-process command (previews)    {r['command_with_previews_images_per_s']:10.3f}")
    print(f"  single-process command (previews, default threads, both cores) "
          f"{r['command_default_threads_images_per_s']:10.3f}")
    if "workers" in r:
        n = r["cores"]
        rows = (("1 worker × 1 thread, pinned (previews)", r["one_worker_pinned"]),
                (f"1 worker × {n} threads, unpinned (previews)", r["one_worker_all_threads"]),
                (f"{n} workers × 1 thread, unpinned (previews)", r["workers"]),
                (f"{n} workers × 1 thread, unpinned, no previews", r["workers_no_preview"]))
        for name, x in rows:
            print(f"  {name:<44} {x['end_to_end_images_per_s']:10.3f} {x['steady_images_per_s']:14.3f}"
                  f"   (load {x['load_average'][0]:.1f})")
    report_ray(r)
    if "ray_2_nodes" in r:
        print(f"Ray one node / single-process command (previews), end to end: "
              f"{r['ray_1_node']['end_to_end_images_per_s'] / r['command_with_previews_images_per_s']:.2f}×")
    if "workers" in r:
        report_workers(r, stages, slowest)
    seconds_per_1000 = 1000 / r["command_images_per_s"]
    print(f"\ncost: {seconds_per_1000 / 3600:.2f} core-hours per 1000 images (single-process command, one core)")


def report_ray(r: dict) -> None:
    for name in ("ray_1_node", "ray_2_nodes"):
        if name in r:
            x = r[name]
            print(f"  Ray, {name[4]} worker node(s) (previews)  {x['end_to_end_images_per_s']:10.3f} "
                  f"{x['steady_images_per_s']:14.3f}   (first image after {x['first_image_after_s']:.1f} s; "
                  f"{x['failed']} failed, {x['duplicates']} duplicates)")
    if "ray_2_nodes" in r:
        one, two = r["ray_1_node"], r["ray_2_nodes"]
        print(f"Ray two nodes / one node: steady {two['steady_images_per_s'] / one['steady_images_per_s']:.2f}×, "
              f"end to end {two['end_to_end_images_per_s'] / one['end_to_end_images_per_s']:.2f}× (target ≥ 1.7×)")


def report_workers(r: dict, stages: dict, slowest: str) -> None:
    """The multi-worker command against the slowest stage (target ≥ 0.9×), one worker, and what N cores allow."""
    n = r["cores"]
    print()
    for label in ("steady", "end_to_end"):
        rate = r["workers"][f"{label}_images_per_s"]
        print(f"{n} workers, {label.replace('_', ' ')}: {rate * stages[slowest]:.3f}× the slowest stage "
              f"({slowest}; target ≥ 0.9×: {'met' if rate * stages[slowest] >= 0.9 else 'missed'}), "
              f"{rate / r['one_worker_pinned'][f'{label}_images_per_s']:.2f}× 1 worker pinned, "
              f"{rate / r['one_worker_all_threads'][f'{label}_images_per_s']:.2f}× 1 worker × {n} threads")
    rate = r["workers_no_preview"]["steady_images_per_s"]
    print(f"{n} workers without previews, steady: {rate * stages[slowest]:.3f}× the slowest stage (its stage table "
          f"counts the preview in write)")
    print(f"annotations.json of {n} workers byte-identical to 1 worker's: {r['workers_annotations_identical']}")
    total = sum(stages.values())
    bound = n / total
    print(f"bound for {n} cores: {n} / (CPU seconds per image, the sum of stages {total:.3f} s) = {bound:.2f} "
          f"images/s = {bound * stages[slowest]:.2f}× the slowest stage; 0.9× needs ≥ "
          f"{0.9 * total / stages[slowest]:.1f} cores")


if __name__ == "__main__":
    sys.exit(main())
