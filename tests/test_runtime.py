"""PyTorch engine: device/precision selection, threads, and the optimised paths' agreement with the model."""

from __future__ import annotations

import gc

import pytest
import torch
from runtime_helpers import assert_token_choices_match_full_decode, prompt_sets

from tinysam_kit.models.registry import load_model_with_info
from tinysam_kit.runtime import EngineUnavailableError, TorchEngine, create_engine
from tinysam_kit.runtime.cpu import cpu_has_native_bf16
from tinysam_kit.runtime.torch_engine import check_precision, fold_batchnorms


@pytest.fixture(scope="module")
def tiny_model(tiny_random_checkpoint):
    return load_model_with_info(tiny_random_checkpoint, device="cpu")[0]


@pytest.mark.parametrize("engine", ["torch", "onnx"])
def test_cuda_without_gpu_is_a_one_line_error(tiny_random_checkpoint, engine):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(EngineUnavailableError) as info:
        create_engine(str(tiny_random_checkpoint), engine=engine, device="cuda")
    message = str(info.value)
    assert "\n" not in message and "cuda" in message.lower()


def test_precision_rules():
    cpu = torch.device("cpu")
    assert check_precision("fp32", cpu) is torch.float32
    with pytest.raises(EngineUnavailableError, match="fp16 needs a CUDA device"):
        check_precision("fp16", cpu)
    with pytest.raises(EngineUnavailableError, match="use fp32, fp16, bf16 or int8"):
        check_precision("int4", cpu)
    with pytest.raises(EngineUnavailableError, match="lacks"):
        check_precision("bf16", cpu, flags=frozenset({"avx2", "avx512f"}))
    assert check_precision("bf16", cpu, flags=frozenset({"amx_bf16"})) is torch.bfloat16
    assert check_precision("bf16", cpu, flags=frozenset({"avx512_bf16"})) is torch.bfloat16
    # CUDA half precision is accepted by the rules (the device itself is checked by resolve_device).
    assert check_precision("fp16", torch.device("cuda")) is torch.float16
    assert not cpu_has_native_bf16(frozenset())


def test_unknown_engine_precision_device(tiny_random_checkpoint):
    with pytest.raises(EngineUnavailableError, match="unknown engine"):
        create_engine(str(tiny_random_checkpoint), engine="tensorrt")
    with pytest.raises(EngineUnavailableError, match="unknown precision"):
        create_engine(str(tiny_random_checkpoint), precision="int4")
    with pytest.raises(EngineUnavailableError, match="unsupported device"):
        create_engine(str(tiny_random_checkpoint), device="mps")
    with pytest.raises(EngineUnavailableError, match="onnx engine"):
        create_engine(str(tiny_random_checkpoint), engine="onnx", precision="fp16", device="cpu")


def test_threads_are_applied(tiny_model):
    before = torch.get_num_threads()
    try:
        engine = TorchEngine(tiny_model, device="cpu", threads=1)
        assert engine.threads == 1 and torch.get_num_threads() == 1
        with pytest.raises(EngineUnavailableError, match="threads"):
            TorchEngine(tiny_model, device="cpu", threads=-2)
    finally:
        torch.set_num_threads(before)


def test_optimised_encoder_matches_model(tiny_model):
    engine = TorchEngine(tiny_model, device="cpu")
    assert engine.channels_last and not engine.exact
    # Folding happens on a copy: the caller's model keeps its BatchNorms.
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in tiny_model.image_encoder.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in engine.encoder.modules())
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = tiny_model.encode(x)
    got = engine.encode(x)
    assert got.is_contiguous()
    assert (got - ref).abs().max().item() <= 1e-4


def test_fold_batchnorms_counts_pairs(tiny_model):
    import copy

    enc = copy.deepcopy(tiny_model.image_encoder)
    pairs = sum(1 for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert fold_batchnorms(enc) == pairs > 0


@pytest.fixture(scope="module")
def reference_model_and_embedding(reference_dir, reference_image):
    from tinysam_kit.inference.predictor import TinySamPredictor
    from tinysam_kit.models.checkpoint import load_checkpoint

    model = load_checkpoint(reference_dir / "tinysam_random_A.pth")
    predictor = TinySamPredictor(TorchEngine(model, device="cpu", exact=True))
    return model, predictor.embed(reference_image).embedding


@pytest.mark.parametrize("case", ["points", "points_box", "box", "points_mask", "mask_only"])
def test_split_decoder_matches_model_decode(reference_model_and_embedding, case):
    """The per-image/per-prompt split decoder gives the model's answers on the reference checkpoint."""
    from tinysam_kit.runtime.split_decoder import DecoderPromptSide

    model, emb = reference_model_and_embedding
    args = prompt_sets(1024)[case]
    with torch.inference_mode():
        ref_logits, ref_iou = model.decode(emb, *args)
    # The split decoder folds the attention projections into the prompt tokens and runs the upscaling as
    # matrix products (another summation order): float32 rounding of the logits, within 1e-4 plus 2e-6 of
    # their scale (the random reference weights give logits of several hundred).
    bound = 1e-4 + 2e-6 * ref_logits.abs().max().item()
    engine = TorchEngine(model, device="cpu")
    assert isinstance(engine._prompt_side, DecoderPromptSide)
    logits, iou = engine.decode(emb, *args)
    assert (logits - ref_logits).abs().max().item() <= bound
    assert (iou - ref_iou).abs().max().item() <= 1e-5
    # and the masks (the sign of the logits) are the model's
    flips = ((logits > 0) != (ref_logits > 0)) & (ref_logits.abs() > bound)
    assert not flips.any()


def test_image_side_cache_follows_embedding_lifetime(tiny_model):
    engine = TorchEngine(tiny_model, device="cpu")
    emb = engine.encode(torch.zeros(1, 3, 256, 256))
    coords, labels = torch.tensor([[[10.0, 20.0]]]), torch.ones(1, 1)
    engine.decode(emb, coords, labels, None, None)
    engine.decode(emb, coords, labels, None, None)
    assert engine.image_side_cache.misses == 1 and engine.image_side_cache.hits == 1
    assert len(engine.image_side_cache) == 1
    del emb
    gc.collect()
    assert len(engine.image_side_cache) == 0


def test_exact_engine_is_the_model_code(tiny_model):
    engine = TorchEngine(tiny_model, device="cpu", exact=True)
    assert engine.encoder is engine.model.image_encoder and engine.decoder_mode == "exact"
    emb = engine.encode(torch.zeros(1, 3, 256, 256))
    args = prompt_sets(256)["points_box"]
    with torch.inference_mode():
        ref = tiny_model.decode(emb, *args)
    got = engine.decode(emb, *args)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


@pytest.mark.parametrize("exact", [True, False])
def test_decoding_only_the_chosen_mask_tokens(tiny_model, exact):
    """A click's best mask (or SAM's single or multimask outputs) computed alone equals picking it from all
    four; the split decoder projects only the chosen tokens' masks."""
    engine = TorchEngine(tiny_model, device="cpu", exact=exact)
    emb = engine.encode(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)))
    for case in ("points", "points_box", "mask_only"):
        assert_token_choices_match_full_decode(engine, emb, prompt_sets(256, batch=6)[case])


@pytest.mark.skipif(not cpu_has_native_bf16(), reason="no native bf16 matrix units on this CPU")
def test_bf16_on_cpu_runs_close_to_fp32(tiny_random_checkpoint):
    fp32 = create_engine(str(tiny_random_checkpoint), device="cpu")
    bf16 = create_engine(str(tiny_random_checkpoint), device="cpu", precision="bf16")
    x = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(2))
    a, b = fp32.encode(x), bf16.encode(x)
    assert b.dtype == torch.bfloat16
    cos = torch.nn.functional.cosine_similarity(a.flatten(), b.float().flatten(), dim=0).item()
    assert cos > 0.99
    logits, iou = bf16.decode(b, torch.tensor([[[30.0, 40.0]]]), torch.ones(1, 1), None, None)
    assert logits.dtype == torch.float32 and logits.shape == (1, 4, 64, 64)


def test_an_engine_in_another_precision_leaves_the_callers_model_alone(tiny_model):
    """`Module.to` converts in place: an engine whose precision differs from the model's must work on a copy.
    (A float64 model under an fp32 engine exercises the same path as an fp32 model under bf16 or CUDA, on any
    CPU.)"""
    import copy

    callers = copy.deepcopy(tiny_model).double()
    before = {k: v.clone() for k, v in callers.state_dict().items()}
    engine = TorchEngine(callers, device="cpu", precision="fp32")
    assert engine.model is not callers and next(engine.model.parameters()).dtype == torch.float32
    after = callers.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())
    assert TorchEngine(tiny_model, device="cpu").model is tiny_model  # nothing to convert: no copy


def test_large_batches_are_decoded_in_chunks(tiny_model):
    from tinysam_kit.runtime.split_decoder import GPU_PROMPT_CHUNK, PROMPT_CHUNK

    engine = TorchEngine(tiny_model, device="cpu")
    emb = engine.encode(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(3)))
    batch = 2 * PROMPT_CHUNK + 3
    g = torch.Generator().manual_seed(4)
    coords, labels = torch.rand((batch, 2, 2), generator=g) * 256, torch.ones(batch, 2)
    mask = torch.randn((batch, 1, 64, 64), generator=g)
    for m in (None, mask):
        logits, iou = engine.decode(emb, coords, labels, None, m)
        with torch.inference_mode():
            ref_logits, ref_iou = tiny_model.decode(emb, coords, labels, None, m)
        assert logits.shape == (batch, 4, 64, 64) and iou.shape == (batch, 4)
        assert (logits - ref_logits).abs().max().item() <= 1e-4 + 2e-6 * ref_logits.abs().max().item()
        assert (iou - ref_iou).abs().max().item() <= 1e-5
    # a GPU engine's chunk (the whole batch in one call) gives the same answers
    assert engine.prompt_chunk == PROMPT_CHUNK
    engine.prompt_chunk = GPU_PROMPT_CHUNK
    whole_logits, whole_iou = engine.decode(emb, coords, labels, None, None)
    chunked_logits, chunked_iou = TorchEngine(tiny_model, device="cpu").decode(emb, coords, labels, None, None)
    assert torch.allclose(whole_logits, chunked_logits, atol=1e-5) and torch.allclose(whole_iou, chunked_iou, atol=1e-6)
