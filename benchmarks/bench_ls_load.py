"""Load test of the Label Studio ML backend: N simulated annotators clicking for a fixed time.

Starts (unless --url is given) a local image server standing in for Label Studio's /data/upload and the
backend itself (`uvicorn --factory tinysam_kit.integrations.labelstudio.app:create_app`, a separate process so the load
generator does not share its GIL), both on 127.0.0.1. Each annotator has its own task image: one warm-up
click encodes it, then it sends smart-tool clicks (positive keypoint, ± keypoints, rectangles) back to
back for --duration seconds. Prints click latency p50/p95/p99 as the client sees it, the server's own time
(Server-Timing header), throughput and errors, for each annotator count.

The "first click" table compares, in server time, the first click on a task whose embedding was pre-computed
(a TASKS_CREATED webhook to one backend process, then the click to a fresh process with an empty memory
cache, so the embedding comes from the shared store), a later click on the same task, and a first click on a
task nothing pre-computed. Target: pre-computed first click <= 1.5x a later click.

    python benchmarks/bench_ls_load.py --annotators 1,8 --duration 15 --engine onnx --precision int8
    python benchmarks/bench_ls_load.py --model demo --first-click-only
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import numpy as np

CONFIG = ('<View><Image name="image" value="$image"/><BrushLabels name="brush" toName="image">'
          '<Label value="Object"/></BrushLabels><KeyPointLabels name="kp" toName="image" smart="true">'
          '<Label value="Object"/></KeyPointLabels><RectangleLabels name="rect" toName="image" smart="true">'
          '<Label value="Object"/></RectangleLabels></View>')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_image(width: int, height: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (height, width, 3), dtype=np.uint8)
    for _ in range(6):
        x0, y0 = rng.integers(0, width * 3 // 4), rng.integers(0, height * 3 // 4)
        img[y0:y0 + height // 5, x0:x0 + width // 5] = rng.integers(80, 255, 3)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


class ImageServer:
    def __init__(self, images: dict[str, bytes]):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):  # noqa: N802
                body = images.get(self.path)
                self.send_response(200 if body else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def random_architecture_checkpoint() -> str:
    """Full-size TinySAM architecture with random weights: the same speed as the trained model.

    Kept in the weights cache so the ONNX export / int8 quantization of it is reused by later runs.
    """
    import torch

    from tinysam_kit.models.checkpoint import save_checkpoint
    from tinysam_kit.models.config import TINYSAM_VIT_T
    from tinysam_kit.models.registry import cache_dir
    from tinysam_kit.models.sam import build_model

    path = cache_dir() / "bench" / "tinysam_random.pth"
    if path.is_file():
        return str(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    save_checkpoint(build_model(TINYSAM_VIT_T), path)
    path.with_name(path.name + ".json").write_text(json.dumps({"config": TINYSAM_VIT_T.to_dict()}))
    return str(path)


def start_backend(args, label_studio_url: str, model: str, **extra_env: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "LABEL_STUDIO_URL": label_studio_url, "TINYSAM_MODEL": model,
           "TINYSAM_ENGINE": args.engine, "TINYSAM_PRECISION": args.precision, "TINYSAM_DEVICE": args.device,
           **extra_env}
    if args.threads:
        env["TINYSAM_THREADS"] = str(args.threads)
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory",
                             "tinysam_kit.integrations.labelstudio.app:create_app",
                             "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                            env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + args.startup_timeout  # the first int8 run exports and quantizes the model
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"backend exited with code {proc.returncode}")
        try:
            health = httpx.get(url + "/health", timeout=2)
            if health.status_code == 200:
                if health.json().get("model_note"):  # `auto` fell back to another model: not what was asked
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait()
                    raise SystemExit(f"backend is not serving {model}: {health.json()['model_note']}")
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    raise SystemExit(f"backend did not start within {args.startup_timeout:g} s")


def click_body(task_id: int, image: str, width: int, height: int, rng: random.Random) -> dict:
    def kp(positive):
        return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": positive,
                "original_width": width, "original_height": height,
                "value": {"x": rng.uniform(5, 95), "y": rng.uniform(5, 95), "width": 0.5, "keypointlabels": ["Object"]}}

    roll = rng.random()
    if roll < 0.2:
        x, y = rng.uniform(0, 60), rng.uniform(0, 60)
        result = [{"type": "rectanglelabels", "from_name": "rect", "to_name": "image", "original_width": width,
                   "original_height": height, "value": {"x": x, "y": y, "width": rng.uniform(5, 39),
                                                        "height": rng.uniform(5, 39), "rotation": 0,
                                                        "rectanglelabels": ["Object"]}}]
    elif roll < 0.5:
        result = [kp(True), kp(False)]
    else:
        result = [kp(True)]
    return {"tasks": [{"id": task_id, "data": {"image": image}}], "label_config": CONFIG, "project": "1.1",
            "params": {"context": {"result": result}}}


def run_load(url: str, annotators: int, duration: float, width: int, height: int, auth) -> dict:
    latencies: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    # one click per task first, so every image is encoded and cached before the timed part
    with httpx.Client(base_url=url, timeout=300, auth=auth) as client:
        for n in range(annotators):
            warm = client.post("/predict", json=click_body(n, f"/data/upload/bench/{n}.png", width, height,
                                                           random.Random(-n)))
            if warm.status_code != 200:
                raise SystemExit(f"warm-up click failed: {warm.status_code}: {warm.text[:300]}")

    def annotator(n: int):
        rng = random.Random(n)
        image = f"/data/upload/bench/{n}.png"
        with httpx.Client(base_url=url, timeout=120, auth=auth) as client:
            end = time.monotonic() + duration
            while time.monotonic() < end:
                body = click_body(n, image, width, height, rng)
                start = time.perf_counter()
                try:
                    resp = client.post("/predict", json=body)
                    ok = resp.status_code == 200 and resp.json()["results"][0]["result"]
                except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
                    ok, resp = False, exc
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    if ok:
                        latencies.append(elapsed)
                        timing = resp.headers.get("server-timing", "")
                        if "dur=" in timing:
                            server_ms.append(float(timing.split("dur=")[1].split(",")[0]))
                    else:
                        errors.append(str(getattr(resp, "status_code", resp))[:200])

    threads = [threading.Thread(target=annotator, args=(n,)) for n in range(annotators)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0

    def pct(values, q):
        return float(np.percentile(values, q)) if values else float("nan")

    return {"annotators": annotators, "clicks": len(latencies), "errors": len(errors),
            "clicks_per_s": len(latencies) / max(wall, 1e-9),
            "p50_ms": pct(latencies, 50), "p95_ms": pct(latencies, 95), "p99_ms": pct(latencies, 99),
            "server_p50_ms": pct(server_ms, 50), "server_p95_ms": pct(server_ms, 95),
            "first_errors": errors[:3]}


def stop_backend(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def first_click_images(n: int) -> list[str]:
    """Task images of the first-click table: n pre-computed, n not, one for warming the process up."""
    return ([f"/data/upload/first/pre{i}.png" for i in range(n)] + [f"/data/upload/first/none{i}.png" for i in range(n)]
            + ["/data/upload/first/warmup.png"])


def fixed_click(task_id: int, image: str, width: int, height: int) -> dict:
    """The same single positive keypoint for every timed click, so only the embedding's origin differs."""
    region = {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "is_positive": True,
              "original_width": width, "original_height": height,
              "value": {"x": 37.0, "y": 41.0, "width": 0.5, "keypointlabels": ["Object"]}}
    return {"tasks": [{"id": task_id, "data": {"image": image}}], "label_config": CONFIG, "project": "1.1",
            "params": {"context": {"result": [region]}}}


def server_ms(client: httpx.Client, body: dict) -> float:
    resp = client.post("/predict", json=body)
    if resp.status_code != 200 or not resp.json()["results"][0]["result"]:
        raise SystemExit(f"click failed: {resp.status_code}: {resp.text[:300]}")
    return float(resp.headers["server-timing"].split("dur=")[1].split(",")[0])


def encoder_runs(client: httpx.Client) -> int:
    return int(client.get("/health").json()["embeddings"]["encoder_runs"])


def run_first_click(args, label_studio_url: str, model: str, n: int, width: int, height: int) -> dict:
    """Server ms (medians over n tasks) of a pre-computed first click, a later click and a first click on a
    task nothing pre-computed, in a fresh backend process (empty memory cache) after two warm-up clicks."""
    images = first_click_images(n)
    pre, none, warmup = images[:n], images[n:2 * n], images[-1]
    with tempfile.TemporaryDirectory(prefix="tinysam-bench-store-") as store:
        env = {"TINYSAM_EMBEDDING_STORE": store}
        # 1. Label Studio announces the new tasks: this process encodes them in the background, into the store
        proc, url = start_backend(args, label_studio_url, model, **env)
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                tasks = [{"id": 1000 + i, "data": {"image": image}} for i, image in enumerate(pre)]
                client.post("/webhook", json={"action": "TASKS_CREATED", "tasks": tasks,
                                              "project": {"id": 1, "label_config": CONFIG}}).raise_for_status()
                deadline = time.time() + args.startup_timeout
                while True:
                    background = client.get("/health").json()["embeddings"]["background"]
                    if background["pending"] == 0:
                        break
                    if time.time() > deadline:
                        raise SystemExit(f"background encoding did not finish: {background}")
                    time.sleep(0.1)
                if background["encoded"] != n:
                    raise SystemExit(f"background encoding stored {background['encoded']} of {n} images: {background}")
        finally:
            stop_backend(proc)
        # 2. a fresh process: nothing in memory, the pre-computed embeddings in the store
        proc, url = start_backend(args, label_studio_url, model, **env)
        try:
            with httpx.Client(base_url=url, timeout=300) as client:
                for _ in range(2):  # one-time costs (first encoder and decoder calls) are not first-click costs
                    server_ms(client, fixed_click(1, warmup, width, height))
                runs = encoder_runs(client)
                first, later = [], []
                for i, image in enumerate(pre):
                    first.append(server_ms(client, fixed_click(1000 + i, image, width, height)))
                    later.append(float(np.median([server_ms(client, fixed_click(1000 + i, image, width, height))
                                                  for _ in range(3)])))
                if encoder_runs(client) != runs:
                    raise SystemExit("a pre-computed first click ran the encoder")
                cold = [server_ms(client, fixed_click(2000 + i, image, width, height)) for i, image in enumerate(none)]
        finally:
            stop_backend(proc)
    first_ms, later_ms, cold_ms = (float(np.median(v)) for v in (first, later, cold))
    return {"tasks": n, "first_precomputed_ms": first_ms, "later_ms": later_ms, "first_not_precomputed_ms": cold_ms,
            "precomputed_ratio": first_ms / later_ms, "not_precomputed_ratio": cold_ms / later_ms}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def rle_timing(repeats: int = 5) -> tuple[float, float]:
    """Median ms to encode / decode a 12-megapixel (4000×3000) mask in Label Studio's brush RLE."""
    from tinysam_kit.inference.encodings.labelstudio import mask_to_rle, rle_to_mask

    yy, xx = np.ogrid[:3000, :4000]
    mask = ((yy - 1500) ** 2 + (xx - 2000) ** 2 < 1000**2) | ((yy // 300 + xx // 400) % 2 == 0)
    enc, dec = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        rle = mask_to_rle(mask)
        enc.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        rle_to_mask(rle, 3000, 4000)
        dec.append((time.perf_counter() - t) * 1000)
    return float(np.median(enc)), float(np.median(dec))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running backend (its LABEL_STUDIO_URL must serve the images: "
                                      "only useful with --image-base)")
    parser.add_argument("--annotators", default="1,8", help="comma-separated annotator counts")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of clicking per annotator count")
    parser.add_argument("--image-size", default="1280x960", help="WIDTHxHEIGHT of the task images")
    parser.add_argument("--model", default="random", help="'random' (full TinySAM architecture, random weights: "
                                                         "ragged masks, a worst case), 'proxy' (TinySAM's decoder "
                                                         "with compact masks, see latency_proxy.py), a registered "
                                                         "name or a checkpoint path")
    parser.add_argument("--engine", default="torch")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--startup-timeout", type=float, default=1800.0, help="seconds to wait for the backend")
    parser.add_argument("--json", action="store_true", help="print one JSON line per run")
    parser.add_argument("--rle-only", action="store_true", help="only time the brush RLE on a 12-MP mask")
    parser.add_argument("--first-click-tasks", type=int, default=8,
                        help="tasks of the first-click table (0: skip it)")
    parser.add_argument("--first-click-only", action="store_true", help="only the first-click table")
    args = parser.parse_args(argv)
    enc_ms, dec_ms = rle_timing()
    print(f"brush RLE, 12-MP mask: encode {enc_ms:.1f} ms, decode {dec_ms:.1f} ms (median of 5)")
    if args.rle_only:
        return 0
    width, height = (int(v) for v in args.image_size.lower().split("x"))
    counts = [int(c) for c in args.annotators.split(",") if c.strip()]

    images = {f"/data/upload/bench/{n}.png": make_image(width, height, n) for n in range(max(counts))}
    images.update({path: make_image(width, height, 100 + n)
                   for n, path in enumerate(first_click_images(args.first_click_tasks))})
    image_server = ImageServer(images)
    proc = None
    try:
        url = model = None
        if args.url:
            url = args.url.rstrip("/")
        elif args.model == "random":
            model = random_architecture_checkpoint()
        elif args.model == "proxy":
            from latency_proxy import latency_proxy_checkpoint

            model = latency_proxy_checkpoint()
        else:
            model = args.model
        print(f"CPU {cpu_name()}")
        if args.first_click_tasks and not args.url:
            r = run_first_click(args, image_server.url, model, args.first_click_tasks, width, height)
            if args.json:
                print(json.dumps(r))
            print(f"first click, server ms (median of {r['tasks']} tasks; fresh process, warmed up, images "
                  f"{width}x{height}):")
            print(f"{'pre-computed first':>18} {'later':>8} {'not pre-computed first':>22} {'pre/later':>9} "
                  f"{'not/later':>9}")
            print(f"{r['first_precomputed_ms']:>18.1f} {r['later_ms']:>8.1f} {r['first_not_precomputed_ms']:>22.1f} "
                  f"{r['precomputed_ratio']:>9.2f} {r['not_precomputed_ratio']:>9.2f}   (target pre/later <= 1.5)")
        if args.first_click_only:
            return 0
        if not args.url:
            proc, url = start_backend(args, image_server.url, model)
        version = httpx.get(url + "/versions", timeout=10).json()["versions"][0]
        print(f"backend {url}  model_version {version}  images {width}x{height}  duration {args.duration:g}s")
        print(f"{'annotators':>10} {'clicks':>7} {'errors':>6} {'clicks/s':>8} {'p50 ms':>8} {'p95 ms':>8} "
              f"{'p99 ms':>8} {'server p50':>10} {'server p95':>10}")
        for n in counts:
            r = run_load(url, n, args.duration, width, height, None)
            if args.json:
                print(json.dumps(r))
            print(f"{r['annotators']:>10} {r['clicks']:>7} {r['errors']:>6} {r['clicks_per_s']:>8.1f} "
                  f"{r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['server_p50_ms']:>10.1f} "
                  f"{r['server_p95_ms']:>10.1f}")
            for e in r["first_errors"]:
                print(f"    error: {e}")
    finally:
        if proc is not None:
            stop_backend(proc)
        image_server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
