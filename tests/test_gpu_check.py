"""benchmarks/gpu_check.py's logic on CPU with a tiny model (the real run needs a CUDA device)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_quick_on_cpu(tiny_random_checkpoint, tmp_path, capsys):
    gpu_check = load_script()
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--model", str(tiny_random_checkpoint),
                           "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "CPU" and [r["variant"] for r in result["rows"]] == ["exact", "fp32"]
    exact, fp32 = result["rows"]
    # The exact path on CPU is the reference itself; the optimised fp32 path stays within float rounding.
    assert exact["parity_vs_cpu_exact"]["embedding_rel_max_abs_diff"] == 0.0
    assert exact["parity_vs_cpu_exact"]["mask_mean_iou"] == 1.0
    assert fp32["parity_vs_cpu_exact"]["embedding_rel_max_abs_diff"] < 1e-4
    assert fp32["parity_vs_cpu_exact"]["mask_mean_iou"] > 0.95
    assert exact["vs_exact"]["everything"] == 1.0 and exact["vs_exact"]["everything_mask_agreement"] == 1.0
    for row in result["rows"]:
        assert set(row["encoder_images_per_s"]) == {"1", "2"} and all(v > 0 for v in
                                                                       row["encoder_images_per_s"].values())
        assert row["click_latency_ms"] > 0 and row["everything_images_per_s"] > 0
        assert row["prompts_per_image"] > 0 and row["peak_gpu_memory_mib"] is None
        # (the masks of both post-processing paths are compared exactly in test_device_masks.py)
        assert row["everything_host_postprocess_images_per_s"] > 0
        assert 0.0 <= row["device_vs_host_postprocess_agreement"] <= 1.0
    assert "prompt_chunk" not in exact
    assert fp32["prompt_chunk"]["default"] == 4 and fp32["prompt_chunk"]["other"] == 64
    assert fp32["prompt_chunk"]["default_images_per_s"] > 0 and fp32["prompt_chunk"]["other_images_per_s"] > 0
    text = capsys.readouterr().out
    assert "everything img/s" in text and "host-post img/s" in text and "fp32" in text
