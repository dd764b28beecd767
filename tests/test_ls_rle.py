"""Label Studio brush RLE: our encoder/decoder against label-studio-sdk and captured Label Studio traffic."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from labelstudio_helpers import LS_PAYLOADS, ls_python

from tinysam_kit.inference.encodings.labelstudio import (
    RLEError,
    _pack_codes,
    decode_rle,
    encode_rle,
    mask_to_rle,
    rle_to_mask,
)


def _masks():
    rng = np.random.default_rng(7)
    yield np.zeros((5, 7), bool)
    yield np.ones((3, 4), bool)
    yield np.ones((300, 400), bool)  # one run of 480 000 values: split into 65 536-value chunks
    yield rng.random((31, 17)) < 0.5  # many runs of 4 (one pixel)
    yy, xx = np.mgrid[:240, :320]
    yield (yy - 120) ** 2 + (xx - 160) ** 2 < 70**2
    m = np.zeros((64, 64), bool)
    m[10:12, 5:9] = m[30, :] = m[:, 40] = True
    yield m
    yield np.ones((1, 1), bool)


def _sdk_rles(masks: list[np.ndarray], flats: list[np.ndarray]) -> dict:
    """Encode with label-studio-sdk inside the Label Studio venv (the SDK is not a project dependency)."""
    python = ls_python()
    if python is None:
        try:
            import label_studio_sdk  # noqa: F401
        except ImportError:
            pytest.skip("label-studio-sdk is not installed here nor in the Label Studio venv "
                        "(run .ci/setup_labelstudio.sh)")
        python = sys.executable
    script = (
        "import json, sys, numpy as np\n"
        "from label_studio_sdk.converter.brush import mask2rle, encode_rle\n"
        "data = json.load(sys.stdin)\n"
        "out = {'masks': [mask2rle(np.array(m, dtype=np.uint8)) for m in data['masks']],\n"
        "       'flats': [encode_rle(np.array(f, dtype=np.uint8)) for f in data['flats']]}\n"
        "print(json.dumps(out))\n"
    )
    payload = json.dumps({"masks": [(m.astype(np.uint8) * 255).tolist() for m in masks],
                          "flats": [f.tolist() for f in flats]})
    done = subprocess.run([python, "-c", script], input=payload, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout)


def test_byte_for_byte_with_label_studio_sdk():
    masks = list(_masks())
    rng = np.random.default_rng(3)
    flats = [rng.integers(0, 3, 500).astype(np.uint8) * 100,  # arbitrary values, runs of 1..n
             np.repeat(rng.integers(0, 256, 40), rng.integers(1, 300, 40)).astype(np.uint8),
             np.full(70_000, 9, np.uint8)]
    sdk = _sdk_rles(masks, flats)
    for mask, expected in zip(masks, sdk["masks"]):
        assert mask_to_rle(mask) == expected, mask.shape
    for flat, expected in zip(flats, sdk["flats"]):
        assert encode_rle(flat) == expected


def test_bit_packer_equals_a_plain_bit_string():
    """Codes of every width 1..32 at every offset within the 32-bit words, against Python's integers."""
    rng = np.random.default_rng(11)
    for count in (0, 1, 2, 7, 33, 500):
        widths = rng.integers(1, 33, count)
        codes = rng.integers(0, 1 << 32, count, dtype=np.uint64) & ((np.uint64(1) << widths.astype(np.uint64))
                                                                     - np.uint64(1))
        bits = "".join(format(int(c), f"0{int(w)}b") for c, w in zip(codes, widths))
        bits += "0" * (8 - len(bits) % 8)  # the SDK's padding: 1–8 zero bits
        expected = int(bits, 2).to_bytes(len(bits) // 8, "big")
        assert _pack_codes(codes, widths) == expected, count
    with pytest.raises(ValueError, match="32 bits"):
        _pack_codes(np.array([1], np.uint64), np.array([33]))


@pytest.mark.parametrize("mask", list(_masks()), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}")
def test_round_trip(mask):
    rle = mask_to_rle(mask)
    assert np.array_equal(rle_to_mask(rle, *mask.shape), mask)
    flat = decode_rle(rle)
    assert np.array_equal(flat, np.repeat(mask.ravel().astype(np.uint8) * 255, 4))
    assert encode_rle(flat) == rle


def test_decodes_editor_literal_chunks():
    """The editor's encoder packs several different values into one literal chunk; we must read those."""
    # header: 8 values, 8-bit words, sizes 3,4,8,16; then literal chunk (0, idx 00, len-1 = 7) of 8 words
    bits = f"{8:032b}" + f"{7:05b}" + "".join(f"{s - 1:04b}" for s in (3, 4, 8, 16))
    values = [0, 255, 255, 0, 255, 0, 0, 255]
    bits += "0" + "00" + f"{7:03b}" + "".join(f"{v:08b}" for v in values)
    bits += "0" * (-len(bits) % 8)
    data = [int(bits[i:i + 8], 2) for i in range(0, len(bits), 8)]
    assert decode_rle(data).tolist() == values
    assert rle_to_mask(data, 1, 2).tolist() == [[False, True]]


def _payload_rles():
    if not LS_PAYLOADS.is_dir():
        return []
    found = []

    def walk(obj, where):
        if isinstance(obj, dict):
            if obj.get("format") == "rle" and isinstance(obj.get("rle"), list):
                found.append((where, obj["rle"]))
            for v in obj.values():
                walk(v, where)
        elif isinstance(obj, list):
            for v in obj:
                walk(v, where)

    for path in sorted(LS_PAYLOADS.rglob("*.json")):
        walk(json.loads(path.read_text()), path.name)
    return found


def test_captured_rle_bytes_round_trip_exactly():
    rles = _payload_rles()
    if not rles:
        pytest.skip(f"captured Label Studio payloads not present at {LS_PAYLOADS}")
    assert len(rles) >= 10
    exact = 0
    for where, rle in rles:
        flat = decode_rle(rle)
        assert flat.size % 4 == 0, where
        ours = encode_rle(flat)
        if ours == rle:
            exact += 1  # written by the SDK encoder (the stub backend): identical bytes
        else:
            # re-saved by the editor after the annotator accepted the suggestion: same chunks, but the
            # editor does not append the SDK's extra all-zero padding byte
            assert ours[:-1] == rle and ours[-1] == 0, where
    assert exact >= len(rles) - 2


def test_captured_mask_matches_reported_pixels():
    """The stub's interactive answer was an 80×80 square at (248, 200) in a 640×480 image."""
    path = LS_PAYLOADS / "checks" / "ls_response_interactive_keypoint_positive.json"
    if not path.is_file():
        pytest.skip(f"{path} not present")
    region = json.loads(path.read_text())["data"]["result"][0]
    mask = rle_to_mask(region["value"]["rle"], region["original_height"], region["original_width"])
    ys, xs = np.nonzero(mask)
    assert mask.sum() == 6400
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (248, 200, 327, 279)


def test_errors_are_precise():
    with pytest.raises(RLEError, match="2-D"):
        mask_to_rle(np.zeros((2, 2, 2)))
    with pytest.raises(RLEError, match="0..255"):
        encode_rle(np.array([300]))
    rle = mask_to_rle(np.ones((4, 4), bool))
    with pytest.raises(RLEError, match="needs"):
        rle_to_mask(rle, 4, 5)
    with pytest.raises(RLEError, match="ends early"):
        decode_rle(rle[:8])
    with pytest.raises(RLEError, match="integers"):
        decode_rle([1, "x"])


def test_twelve_megapixel_mask_is_fast_enough_to_not_time_out():
    """Not a speed target (see benchmarks/): a sanity bound that catches an accidental O(n) Python loop."""
    import time

    yy, xx = np.ogrid[:3000, :4000]
    mask = (yy - 1500) ** 2 + (xx - 2000) ** 2 < 1000**2
    start = time.perf_counter()
    rle = mask_to_rle(mask)
    back = rle_to_mask(rle, 3000, 4000)
    assert time.perf_counter() - start < 10.0
    assert np.array_equal(back, mask)
