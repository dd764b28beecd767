"""Throughput of dataset-wide everything mode in FiftyOne: images/minute over a 50-image dataset.

Three measurements in the same run, on the same images and model:
  core      load_image + generate_everything in a plain loop (no FiftyOne; the baseline)
  plugin    the plugin's run (bounded prefetch of decoding, batched DB writes, run record)
  serial    the plugin's run with prefetch disabled (1 image ahead, 1 decode thread)
The plugin's ratio to the core loop shows what FiftyOne costs on top of the model; plugin vs serial shows
what overlapping decoding with inference buys. The database is a private mongod in a temporary folder.

    python benchmarks/bench_fiftyone.py                       # 50 images 768×1024, model auto
    python benchmarks/bench_fiftyone.py --model demo --images 50 --points-per-side 32 --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def make_photos(directory: Path, n: int, height: int, width: int) -> list[Path]:
    """JPEGs with many shapes (decoding cost like real photos)."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        img = Image.fromarray(rng.normal(110, 25, (height, width, 3)).clip(0, 255).astype("uint8"))
        draw = ImageDraw.Draw(img)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width - 60)), int(rng.integers(0, height - 60))
            x1, y1 = x0 + int(rng.integers(30, width // 3)), y0 + int(rng.integers(30, height // 3))
            color = tuple(int(c) for c in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=color)
        path = directory / f"photo_{i:03d}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    return paths


def tiny_model(directory: Path) -> str:
    """The test suite's small random model, for when no trained weights are on this machine."""
    import torch
    from conftest import TINY_TEST_CONFIG

    from tinysam_kit.models.checkpoint import save_checkpoint
    from tinysam_kit.models.config import ModelConfig
    from tinysam_kit.models.sam import build_model

    torch.manual_seed(0)
    config = ModelConfig.from_dict(TINY_TEST_CONFIG)
    path = directory / "tiny_random.pth"
    save_checkpoint(build_model(config), path)
    path.with_name(path.name + ".json").write_text(json.dumps({"config": config.to_dict()}))
    return str(path)


from tinysam_kit.inference.policy import ENGINES, PRECISIONS, EngineOptions  # noqa: E402 - after sys.path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=50)
    ap.add_argument("--size", default="768x1024", help="HxW of the generated images")
    ap.add_argument("--model", default="auto", help="auto: official TinySAM, else demo, else a tiny random model")
    ap.add_argument("--engine", choices=ENGINES, default=EngineOptions.engine)
    ap.add_argument("--precision", choices=PRECISIONS, default=EngineOptions.precision)
    ap.add_argument("--points-per-side", type=int, default=32)
    ap.add_argument("--dense", action="store_true")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--chunk", type=int, default=10, help="images per interleaved measurement round")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    from fiftyone_helpers import fiftyone_env

    fiftyone_env()  # private mongod in a temp dir, stopped at exit
    import fiftyone as fo

    from tinysam_kit.data.images import load_image
    from tinysam_kit.inference.everything import EverythingGenerator
    from tinysam_kit.integrations.fiftyone.predictors import get_predictor
    from tinysam_kit.integrations.fiftyone.runner import RunSpec, run_segmentation

    work = Path(tempfile.mkdtemp(prefix="tinysam-bench-fo-"))
    model = args.model
    if model == "auto":
        from tinysam_kit.cli.common import CliError, resolve_model_choice

        try:
            model = resolve_model_choice("auto", log=lambda *a, **k: None)
        except CliError:
            model = tiny_model(work)
    h, w = (int(v) for v in args.size.lower().split("x"))
    paths = make_photos(work / "images", args.images, h, w)
    options = EngineOptions(model=model, engine=args.engine, precision=args.precision)
    predictor = get_predictor(options)
    mode = "dense" if args.dense else "hierarchical"
    params = {"points_per_side": args.points_per_side}
    # The core loop uses exactly the parameters the plugin's runs use (the model's own, pre-labelling rules).
    generator = EverythingGenerator(predictor, mode, **RunSpec("everything", "masks", everything=params)
                                    .everything_params(predictor.model_name))
    generator.generate(load_image(paths[0]))  # warm-up (allocations, lazy init)
    predictor.cache.clear()

    # The machine is shared: measure the three variants interleaved, chunk by chunk, so that load changes
    # during the run hit all of them alike.
    seconds = {"core": 0.0, "plugin": 0.0, "serial": 0.0}
    masks = {"plugin": 0, "serial": 0}
    chunk = max(1, args.chunk)
    for start in range(0, len(paths), chunk):
        part = paths[start : start + chunk]
        t0 = time.perf_counter()
        for p in part:
            generator.generate(load_image(p))
        seconds["core"] += time.perf_counter() - t0
        predictor.cache.clear()
        for name, prefetch, workers in (("plugin", 4, 2), ("serial", 1, 1)):
            ds = fo.Dataset()
            ds.add_samples([fo.Sample(filepath=str(p)) for p in part], progress=False)
            spec = RunSpec("everything", "masks", options=options, mode=mode, everything=params, prefetch=prefetch,
                           decode_workers=workers)
            t0 = time.perf_counter()
            summary = run_segmentation(ds, spec, predictor=predictor)
            seconds[name] += time.perf_counter() - t0
            assert summary.processed == len(part) and not summary.errors, summary.message()
            masks[name] += summary.masks
            predictor.cache.clear()
            ds.delete()

    results = {"images": len(paths), "size": args.size, "model": predictor.model_version, "mode": mode,
               "points_per_side": args.points_per_side, "threads": args.threads or "default"}
    for name, secs in seconds.items():
        results[f"{name}_images_per_minute"] = round(60 * len(paths) / secs, 2)
    results["masks_per_image"] = round(masks["plugin"] / len(paths), 2)
    results["plugin_vs_core"] = round(results["plugin_images_per_minute"] / results["core_images_per_minute"], 3)
    results["plugin_vs_serial"] = round(results["plugin_images_per_minute"] / results["serial_images_per_minute"],
                                        3)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("FIFTYONE_DO_NOT_TRACK", "true")
    sys.exit(main())
