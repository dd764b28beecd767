"""ONNX export (metadata, parity check, refusal, caching), the ONNX Runtime engine, int8 quantization, CLI."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

from tinysam_kit.inference.predictor import TinySamPredictor  # noqa: E402
from tinysam_kit.models.registry import load_model_with_info, sha256_file  # noqa: E402
from tinysam_kit.runtime import EngineUnavailableError, TorchEngine, create_engine  # noqa: E402
from tinysam_kit.runtime import export as export_mod  # noqa: E402
from tinysam_kit.runtime.export import ExportParityError, ensure_export, export_onnx, part_name  # noqa: E402
from tinysam_kit.runtime.onnx_engine import OnnxEngine  # noqa: E402


@pytest.fixture(scope="module")
def tiny_export(tiny_random_checkpoint):
    """One export per test session (cached next to the session's tiny checkpoint)."""
    return ensure_export(tiny_random_checkpoint)


def test_export_files_metadata_and_parity(tiny_export, tiny_random_checkpoint):
    import onnx

    directory, stem, manifest = tiny_export
    assert directory == tiny_random_checkpoint.parent
    sha = sha256_file(tiny_random_checkpoint)
    assert manifest["source_sha256"] == sha and manifest["source_model"] == "tiny_random"
    assert manifest["precision"] == "fp32" and manifest["opset"] == export_mod.OPSET
    diffs = manifest["parity_vs_torch"]["max_abs_diff"]
    assert diffs["embedding"] < 1e-3 and diffs["logits_nomask"] < 1e-3 and diffs["logits_mask"] < 1e-3
    for part in export_mod.PARTS:
        proto = onnx.load(str(directory / part_name(stem, "fp32", part)), load_external_data=False)
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["source_sha256"] == sha and meta["precision"] == "fp32" and meta["part"] == part
        assert meta["opset"] == str(export_mod.OPSET)
        assert "embedding" in json.loads(meta["max_abs_diff_vs_torch"])


def test_export_is_reused(tiny_export, tiny_random_checkpoint, monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("exported again although an up-to-date export exists")

    monkeypatch.setattr(export_mod, "export_onnx", boom)
    directory, stem, manifest = ensure_export(tiny_random_checkpoint)
    assert manifest == tiny_export[2]


def test_export_refuses_on_mismatch(tiny_random_checkpoint, tmp_path):
    """An export that does not reproduce PyTorch is refused and leaves nothing behind."""
    model = load_model_with_info(tiny_random_checkpoint, device="cpu")[0]
    altered = load_model_with_info(tiny_random_checkpoint, device="cpu")[0]
    with torch.no_grad():
        altered.mask_decoder.iou_prediction_head.layers[-1].bias.add_(0.05)
        altered.image_encoder.neck[-1].bias.add_(0.01)  # shifts every embedding value
    with pytest.raises(ExportParityError, match="does not match PyTorch") as info:
        export_onnx(model, tmp_path, model_name="tiny", model_sha256=None, reference=altered)
    assert "embedding" in str(info.value) and "iou" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_export_goes_to_cache_when_weights_dir_is_read_only(tiny_random_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("TINYSAM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(export_mod, "_writable", lambda _d: False)
    sha = sha256_file(tiny_random_checkpoint)
    out = export_mod.export_dir_for(tiny_random_checkpoint, sha, "tiny_random")
    assert out == tmp_path / "home" / "onnx" / f"tiny_random-{sha[:12]}"


def test_onnx_engine_matches_torch_predictor(tiny_export, tiny_random_checkpoint):
    torch_p = TinySamPredictor(create_engine(str(tiny_random_checkpoint), device="cpu", exact=True))
    onnx_p = TinySamPredictor(create_engine(str(tiny_random_checkpoint), engine="onnx", device="cpu"))
    assert onnx_p.engine.info.engine == "onnx" and "onnx-fp32" in onnx_p.model_version
    image = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    s_t, s_o = torch_p.embed(image), onnx_p.embed(image)
    assert isinstance(s_o.embedding, np.ndarray)
    assert np.abs(s_o.embedding - s_t.embedding.numpy()).max() <= 1e-3
    cases = [dict(point_coords=[[50, 60], [120, 80]], point_labels=[1, 0]),
             dict(box=[10, 20, 200, 180]),
             dict(point_coords=[[70, 90]], point_labels=[1], box=[30, 30, 250, 190])]
    for case in cases:
        m_t, q_t, l_t = torch_p.predict(**case, image_embedding=s_t)
        m_o, q_o, l_o = onnx_p.predict(**case, image_embedding=s_o)
        assert np.abs(l_t - l_o).max() <= 1e-3 and np.abs(q_t - q_o).max() <= 1e-4
        assert (m_t != m_o).sum() <= 5
    # refinement with a mask input, and a batch with several points per prompt
    _, _, low = torch_p.predict(**cases[0], image_embedding=s_t)
    m_t, _, l_t = torch_p.predict(**cases[0], mask_input=low[:1], image_embedding=s_t)
    m_o, _, l_o = onnx_p.predict(**cases[0], mask_input=low[:1], image_embedding=s_o)
    assert np.abs(l_t - l_o).max() <= 1e-3
    coords = np.random.default_rng(1).uniform(0, 199, (5, 4, 2))
    labels = np.random.default_rng(2).integers(0, 2, (5, 4))
    _, q_t, l_t = torch_p.predict_batch(coords, labels, image_embedding=s_t)
    _, q_o, l_o = onnx_p.predict_batch(coords, labels, image_embedding=s_o)
    assert l_o.shape == (5, 3, 64, 64) and np.abs(l_t - l_o).max() <= 1e-3


def test_onnx_engine_decodes_only_the_chosen_mask_tokens(tiny_export, tiny_random_checkpoint):
    from runtime_helpers import assert_token_choices_match_full_decode, prompt_sets

    engine = create_engine(str(tiny_random_checkpoint), engine="onnx", device="cpu")
    emb = engine.encode(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)))
    for case in ("points", "points_box", "mask_only"):
        assert_token_choices_match_full_decode(engine, emb, prompt_sets(256, batch=6)[case])


def test_mask_only_prompt(tiny_export):
    directory, stem, _ = tiny_export
    engine = OnnxEngine(directory, stem, device="cpu")
    model = load_model_with_info(directory / f"{stem}.pth", device="cpu")[0]
    emb = engine.encode(torch.zeros(1, 3, 256, 256))
    mask = torch.randn(1, 1, 64, 64) * 5
    logits, iou = engine.decode(emb, None, None, None, mask)
    with torch.inference_mode():
        ref_logits, ref_iou = model.decode(torch.from_numpy(emb), None, None, None, mask)
    assert (logits - ref_logits).abs().max().item() <= 1e-3


def test_sessions_are_cached_and_threads_set(tiny_export):
    directory, stem, _ = tiny_export
    a = OnnxEngine(directory, stem, device="cpu", threads=1)
    b = OnnxEngine(directory, stem, device="cpu", threads=1)
    assert a.encoder is b.encoder and a.decoder_prompt is b.decoder_prompt
    c = OnnxEngine(directory, stem, device="cpu", threads=2)
    assert c.encoder is not a.encoder
    assert a.encoder.get_session_options().intra_op_num_threads == 1
    with pytest.raises(EngineUnavailableError, match="no complete fp32 ONNX export of 'missing'"):
        OnnxEngine(directory, "missing", precision="fp32", device="cpu")
    with pytest.raises(EngineUnavailableError, match="precision"):
        OnnxEngine(directory, stem, precision="fp16", device="cpu")


@pytest.fixture(scope="module")
def quantized(tiny_export, tmp_path_factory):
    """Quantize a copy of the tiny export with two recipes, calibrating on saved synthetic scenes."""
    from PIL import Image

    from tinysam_kit.evaluation.quantization import quantize_model
    from tinysam_kit.runtime.quantize import synthetic_images

    directory, stem, _ = tiny_export
    work = tmp_path_factory.mktemp("quant")
    for f in directory.glob(f"{stem}.fp32.*"):
        shutil.copy2(f, work / f.name)
    calib = tmp_path_factory.mktemp("calib")
    for i, img in enumerate(synthetic_images(6, 256, seed=3)):
        Image.fromarray(img).save(calib / f"scene_{i}.png")
    report = quantize_model(work, stem, calibration=calib, recipes=["dynamic", "static_qdq_guarded"],
                            threads=1, prompts_per_image=8, log=lambda _m: None)
    return work, stem, report


def test_quantization_report(quantized):
    work, stem, report = quantized
    assert set(report["candidates"]) == {"dynamic", "static_qdq_guarded"}
    assert report["calibration"]["images"] == 4 and report["calibration"]["held_out_images"] == 2
    for entry in report["candidates"].values():
        fid = entry["fidelity"]
        assert fid["images"] == 2 and fid["prompts"] == 16
        for key in ("embedding_cosine_mean", "embedding_cosine_min", "mask_iou_mean", "mask_iou_p05"):
            assert 0.0 <= fid[key] <= 1.0 + 1e-9
        assert entry["encoder_seconds"] > 0 and entry["meets_bounds"] in (True, False)
    assert report["candidates"]["static_qdq_guarded"]["excluded_nodes"] > 0
    assert report["chosen"] in report["candidates"]
    on_disk = json.loads((work / f"{stem}.int8.quantization.json").read_text())
    assert on_disk["chosen"] == report["chosen"]
    manifest = json.loads((work / f"{stem}.int8.onnx.json").read_text())
    assert manifest["precision"] == "int8" and manifest["recipe"] == report["chosen"]
    # by default only the first upscaling product of the per-prompt decoder is int8; the image side stays fp32
    import onnx

    assert report["decoder_prompt"] == "upscale"
    prompt_graph = onnx.load(str(work / f"{stem}.int8.decoder_prompt.onnx"))
    meta = {m.key: m.value for m in prompt_graph.metadata_props}
    assert meta["recipe"] == "dynamic upscale" and meta["precision"] == "int8"
    assert [n.name for n in prompt_graph.graph.node if n.op_type == "MatMulInteger"] == \
        ["/side/upscale1/MatMul_quant"]
    image_graph = onnx.load(str(work / f"{stem}.int8.decoder_image.onnx"))
    assert {m.key: m.value for m in image_graph.metadata_props}["recipe"] == "fp32"
    assert not {n.op_type for n in image_graph.graph.node} & {"DynamicQuantizeLinear", "MatMulInteger"}


def _quantized_matmuls(path) -> int:
    import onnx

    return sum(n.op_type == "MatMulInteger" for n in onnx.load(str(path)).graph.node)


def test_decoder_quantization_scopes(tiny_export, tmp_path):
    from tinysam_kit.runtime.quantize import QuantizationError, quantize_decoder_prompt

    directory, stem, _ = tiny_export
    src = directory / f"{stem}.fp32.decoder_prompt.onnx"
    assert quantize_decoder_prompt(src, tmp_path / "upscale.onnx", "upscale") == 1
    assert _quantized_matmuls(tmp_path / "upscale.onnx") == 1
    assert quantize_decoder_prompt(src, tmp_path / "all.onnx", "all") > 10
    assert _quantized_matmuls(tmp_path / "all.onnx") > 10  # (weight Gemms of one token row stay float)
    with pytest.raises(QuantizationError, match="unknown decoder quantization scope"):
        quantize_decoder_prompt(src, tmp_path / "x.onnx", "attention")


def test_int8_engine_fidelity(quantized):
    work, stem, report = quantized
    fp32 = TinySamPredictor(OnnxEngine(work, stem, precision="fp32", device="cpu"))
    int8 = TinySamPredictor(OnnxEngine(work, stem, precision="int8", device="cpu"))
    assert int8.engine.info.precision == "int8" and int8.model_version != fp32.model_version
    import onnx

    proto = onnx.load(str(work / part_name(stem, "int8", "encoder")), load_external_data=False)
    ops = {n.op_type for n in proto.graph.node}
    assert ops & {"QuantizeLinear", "DynamicQuantizeLinear", "MatMulInteger"}
    # Judged with the chosen recipe on held-out scenes (random tiny weights: a pessimistic case).
    fid = report["candidates"][report["chosen"]]["fidelity"]
    assert fid["embedding_cosine_min"] >= 0.995
    assert fid["mask_iou_mean"] >= 0.95


def test_cli_export_and_quantize_errors(tiny_random_checkpoint, tmp_path, capsys):
    from tinysam_kit.cli import main

    assert main(["export", "--model", str(tiny_random_checkpoint)]) == 0
    assert "max |Δ| vs torch" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["quantize", "--model", str(tiny_random_checkpoint), "--calibration", str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no images") and "\n" not in err
    assert main(["quantize", "--model", str(tiny_random_checkpoint), "--calibration", str(empty),
                 "--recipes", "magic"]) == 2
    assert "unknown recipe" in capsys.readouterr().err


@pytest.mark.slow
def test_reference_vectors_on_onnx_fp32(reference_dir, reference_image, tmp_path_factory):
    """The exact ONNX fp32 path reproduces ../shared/reference like the PyTorch one."""
    arrays = np.load(reference_dir / "predictor_A.npz")
    meta = json.loads((reference_dir / "predictor_A.json").read_text())
    out = tmp_path_factory.mktemp("ref_onnx")
    directory, stem, _ = ensure_export(reference_dir / "tinysam_random_A.pth", directory=out)
    predictor = TinySamPredictor(OnnxEngine(directory, stem, device="cpu"))
    state = predictor.set_image(reference_image)
    assert np.abs(state.embedding - arrays["image_embedding"]).max() <= 1e-3
    for name in ["point1", "points2", "box", "box_point"]:
        case = meta["prompts"]["cases"][name]
        masks, ious, logits = predictor.predict(case["point_coords"], case["point_labels"], case["box"],
                                                image_embedding=state)
        ref_logits = arrays[f"{name}__low_res_logits"] if name != "point1" else \
            arrays["point1__all4_low_res_logits"][1:]
        assert np.all(np.abs(logits - ref_logits) <= 1e-3 + 1e-5 * np.abs(ref_logits))
        assert np.abs(ious - arrays[f"{name}__iou_predictions"]).max() <= 1e-4
        shape = meta["meta"]["cases"][name]["masks_shape"]
        ref_masks = np.unpackbits(arrays[f"{name}__masks_packed"], count=int(np.prod(shape))).reshape(shape)
        assert max(int((m != r.astype(bool)).sum()) for m, r in zip(masks, ref_masks)) <= 5


def test_torch_engine_default_is_the_optimised_path(tiny_random_checkpoint):
    engine = create_engine(str(tiny_random_checkpoint), device="cpu")
    assert isinstance(engine, TorchEngine) and engine.decoder_mode == "split"
