"""int8 on the PyTorch engine: availability rules, and the compiled int8 encoder's fidelity on the demo model."""

from __future__ import annotations

import sys

import pytest
import torch

from tinysam_kit.evaluation.quantization import COSINE_BOUND, IOU_BOUND, fidelity
from tinysam_kit.inference.predictor import TinySamPredictor
from tinysam_kit.models.registry import sha256_file
from tinysam_kit.runtime import EngineUnavailableError, create_engine
from tinysam_kit.runtime.quantize import synthetic_images
from tinysam_kit.runtime.torch_engine import check_precision
from tinysam_kit.runtime.torch_int8 import (
    FLOAT_MODULES,
    check_int8,
    compiled_dir,
    cpu_has_int8_matmul,
    pt2e_quantize_encoder,
    verified_package,
)

CPU = torch.device("cpu")
VNNI = frozenset({"avx512f", "avx512_vnni"})


def test_int8_needs_an_x86_cpu_with_int8_instructions():
    assert cpu_has_int8_matmul(frozenset({"amx_int8"})) and cpu_has_int8_matmul(frozenset({"avx_vnni"}))
    assert not cpu_has_int8_matmul(frozenset({"avx2", "avx512f"}))
    for device, flags, machine, expected in [
        (torch.device("cuda"), VNNI, "x86_64", "runs on x86 CPUs"),
        (CPU, frozenset({"avx2", "avx512f"}), "x86_64", "VNNI or AMX"),
        (CPU, VNNI, "aarch64", "VNNI or AMX"),
    ]:
        with pytest.raises(EngineUnavailableError, match=expected) as info:
            check_int8(device, flags, machine)
        assert "\n" not in str(info.value) and "engine='onnx'" in str(info.value)
    with pytest.raises(EngineUnavailableError, match="VNNI or AMX"):
        check_precision("int8", CPU, flags=frozenset({"avx2"}))


def test_missing_torchao_or_compiler_is_a_one_line_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchao", None)  # makes `import torchao...` raise ImportError
    with pytest.raises(EngineUnavailableError, match=r"needs torchao \(pip install") as info:
        check_int8(CPU, VNNI, "x86_64")
    assert "\n" not in str(info.value)
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(EngineUnavailableError, match="needs a C\\+\\+ compiler"):
        check_int8(CPU, VNNI, "x86_64")


def test_exact_path_is_fp32_only():
    with pytest.raises(EngineUnavailableError, match="exact=True is the fp32 reference path"):
        create_engine("demo", engine="torch", precision="int8", device="cpu", exact=True)


def _int8_available() -> str | None:
    try:
        check_int8(CPU)
    except EngineUnavailableError as exc:
        return str(exc)
    return None


@pytest.mark.slow
def test_quantization_keeps_the_sensitive_modules_in_float():
    """The eager reference form needs only torchao (installed by setup), not the int8 kernels."""
    fp32 = create_engine("demo", engine="torch", precision="fp32", device="cpu", channels_last=False)
    images = [torch.randn(1, 3, 256, 256) for _ in range(2)]
    quantized = pt2e_quantize_encoder(fp32.encoder, images)
    int8_input = {}  # module name → whether its product reads a dequantized (int8) input
    for node in quantized.graph.nodes:
        if str(node.target) in ("aten.linear.default", "aten.conv2d.default"):
            module = list(node.meta["nn_module_stack"].values())[-1][0]
            int8_input[module] = "dequantize" in str(getattr(node.args[0], "target", ""))
    in_float = [m for m in int8_input if any(part in m for part in FLOAT_MODULES)]
    assert in_float and not any(int8_input[m] for m in in_float)
    quantized_modules = [m for m, q in int8_input.items() if q]
    for part in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "neck.0"):
        assert any(m.endswith(part) for m in quantized_modules), part


@pytest.fixture(scope="module")
def int8_demo(tmp_path_factory):
    """The demo model's int8 engine, compiled into a fresh cache (TINYSAM_HOME) for this module. Skipped, with
    the engine's own reason, only where the int8 kernels cannot run (no VNNI/AMX, torchao or C++ compiler)."""
    reason = _int8_available()
    if reason is not None:
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYSAM_HOME", str(tmp_path_factory.mktemp("tinysam_home")))
        engine = create_engine("demo", engine="torch", precision="int8", device="cpu")
        yield engine


@pytest.mark.slow
def test_int8_engine_fidelity_on_the_demo_model(int8_demo):
    """The compiled int8 encoder (oneDNN int8 kernels) against the fp32 engine: the issue's fidelity bounds."""
    int8 = TinySamPredictor(int8_demo)
    fp32 = TinySamPredictor(create_engine("demo", engine="torch", precision="fp32", device="cpu"))
    assert int8.engine.info.precision == "int8" and int8.model_version != fp32.model_version
    report = fidelity(fp32, int8, synthetic_images(4, fp32.img_size, seed=1), prompts_per_image=32)
    assert report["embedding_cosine_min"] >= COSINE_BOUND
    assert report["mask_iou_mean"] >= IOU_BOUND
    assert report["best_mask_iou_mean"] >= 0.98


@pytest.mark.slow
def test_compiled_encoder_is_cached_per_model(int8_demo):
    built = int8_demo.encoder
    assert not built.from_cache and built.package.is_file() and verified_package(built.package)
    assert built.package.parent == compiled_dir()
    again = create_engine("demo", engine="torch", precision="int8", device="cpu")
    assert again.encoder.from_cache and again.encoder.package == built.package
    images = torch.randn(2, 3, 256, 256)  # a batch is encoded image by image by the batch-1 program
    assert torch.equal(again.encode(images), int8_demo.encode(images))
    # the predictor's inputs come channels-last from the HWC image: same embedding as in standard layout
    assert torch.equal(int8_demo.encode(images.to(memory_format=torch.channels_last)), int8_demo.encode(images))


def test_only_intact_packages_are_loaded(tmp_path):
    package = tmp_path / "encoder.int8.pt2"
    assert not verified_package(package)
    package.write_bytes(b"compiled program")
    assert not verified_package(package)  # no sidecar: never written completely by this code
    (tmp_path / "encoder.int8.pt2.sha256").write_text(sha256_file(package) + "\n")
    assert verified_package(package)
    package.write_bytes(b"compiled program, altered")
    assert not verified_package(package)


@pytest.mark.slow
def test_cli_reports_int8_fidelity_next_to_the_compiled_package(int8_demo, tmp_path, capsys):
    """`tinysam quantize --engine torch`: the cached package is measured against fp32 on held-out images and
    the report lands beside it."""
    import json

    import cv2

    from tinysam_kit.cli import main

    held = tmp_path / "held"
    held.mkdir()
    for i, image in enumerate(synthetic_images(2, 256, seed=3)):
        cv2.imwrite(str(held / f"scene{i}.png"), image[:, :, ::-1])
    assert main(["quantize", "--engine", "torch", "--model", "demo", "--holdout", str(held),
                 "--prompts-per-image", "8"]) == 0
    captured = capsys.readouterr()
    report_file = int8_demo.encoder.package.with_name(int8_demo.encoder.package.name + ".fidelity.json")
    report = json.loads(report_file.read_text())
    assert report["from_cache"] and report["package"] == str(int8_demo.encoder.package)
    assert report["held_out"] == {"source": str(held), "images": 2, "prompts_per_image": 8}
    fid = report["fidelity"]
    assert fid["prompts"] == 16 and fid["embedding_cosine_min"] >= COSINE_BOUND  # bounds: see the fidelity test
    assert report["meets_bounds"] == (fid["embedding_cosine_min"] >= COSINE_BOUND and fid["mask_iou_mean"] >= IOU_BOUND)
    verdict = "ok" if report["meets_bounds"] else "below bounds"
    assert f"cosine min {fid['embedding_cosine_min']:.4f}" in captured.out and verdict in captured.out
    assert str(report_file) in captured.out and ("warning" in captured.err) != report["meets_bounds"]
    assert 0 < report["encoder_seconds"]["int8"] and report["encoder_seconds"]["int8_vs_fp32"] > 0
    # the calibration images of the torch engine are built in: asking for others is an error, not ignored
    assert main(["quantize", "--engine", "torch", "--model", "demo", "--calibration", str(held)]) == 2
    assert "built-in synthetic scenes" in capsys.readouterr().err


def test_onnx_quantization_still_needs_calibration_images(capsys):
    from tinysam_kit.cli import main

    assert main(["quantize", "--model", "demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --calibration DIR is required") and "\n" not in err
