"""Label Studio's brush RLE ("format": "rle"), our own vectorised encoder and decoder.

The format (thi.ng rle-pack, as used by Label Studio's editor and SDK) is a big-endian bit stream:
32 bits value count, 5 bits (word size - 1), four 4-bit (run-size bit widths - 1), then chunks of
`flag(1) size-index(2) length-1(width bits)` followed by one word (flag 1: a run of that length) or
`length` words (flag 0: literal values). Brush masks are RGBA images flattened row-major, so every
pixel's value appears four times in a row.

`encode_rle` reproduces label-studio-sdk's encoder byte for byte (its choice of chunk widths, the split
of runs longer than 65536, and its padding, which always appends 1-8 zero bits), but computes the bit
stream with numpy instead of string concatenation, so a 12-megapixel mask takes milliseconds.
"""

from __future__ import annotations

import sys

import numpy as np

WORD_SIZE = 8
RLE_SIZES = (3, 4, 8, 16)
CHANNELS = 4
_MAX_RUN = 1 << 16
_SIZE_LIMITS = np.array([8, 16, 256])  # a run longer than limit i needs size index i + 1
_CHUNK_BITS = 3 + np.array(RLE_SIZES, dtype=np.int64) + WORD_SIZE
# flag(1) size-index(2) of every (flag, size index) pair, already shifted above the length and value fields
_CHUNK_HEADS = np.array([((flag << 2) | index) << (size + WORD_SIZE)
                         for flag in (0, 1) for index, size in enumerate(RLE_SIZES)], dtype=np.uint64)


class RLEError(ValueError):
    """An RLE payload is malformed or does not match the stated image size."""


# ------------------------------------------------------------------ encoding
def runs_of(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(run lengths, run values) of a 1-D array."""
    flat = np.asarray(values).ravel()
    if flat.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, flat.dtype)
    ends = np.flatnonzero(flat[1:] != flat[:-1])
    ends = np.append(ends, flat.size - 1)
    lengths = np.diff(ends, prepend=-1)
    return lengths.astype(np.int64), flat[ends]


def _pack_codes(codes: np.ndarray, widths: np.ndarray) -> bytes:
    """Concatenate `codes` (each `widths` bits wide, at most 32) MSB-first; pad as the SDK does.

    Written into 32-bit words: a code starting at bit offset o < 32 of its word ends within that word or
    the next, so shifted into a 64-bit window it contributes one high and one low half-word. Bits never
    overlap, so the halves landing in the same word are summed (bincount, exact: float64 holds 32 bits).
    """
    widths = np.asarray(widths, dtype=np.int64)
    if widths.size and int(widths.max()) > 32:
        raise ValueError("codes wider than 32 bits are not supported")
    ends = np.cumsum(widths)
    total_bits = int(ends[-1]) if ends.size else 0
    n_bytes = (total_bits + (8 - total_bits % 8)) // 8  # the SDK pads 8 zero bits when already aligned
    n_words = n_bytes // 4 + 2
    starts = ends - widths
    word = starts >> 5
    window = np.asarray(codes, dtype=np.uint64) << (64 - (starts & 31) - widths).astype(np.uint64)
    halves = window.view(np.uint32).reshape(-1, 2)
    high, low = (halves[:, 1], halves[:, 0]) if sys.byteorder == "little" else (halves[:, 0], halves[:, 1])
    words = np.bincount(word, weights=high, minlength=n_words)
    words[1:] += np.bincount(word, weights=low, minlength=n_words)[:-1]
    return words.astype(">u4").tobytes()[:n_bytes]


def encode_runs(lengths: np.ndarray, values: np.ndarray, total: int) -> bytes:
    """Chunks for runs exactly as label-studio-sdk's `encode_rle` writes them (word size 8)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    values = np.asarray(values).astype(np.uint64)
    if values.size and int(values.max()) > 255:
        raise RLEError("brush RLE values are 8-bit: got a value above 255")
    if lengths.size and int(lengths.max()) > _MAX_RUN:
        # A run longer than 65536 becomes several full 65536-value chunks plus the remainder, all 16-bit.
        pieces = np.where(lengths > _MAX_RUN, (lengths - 1) // _MAX_RUN + 1, 1)
        run_of_piece = np.repeat(np.arange(lengths.size), pieces)
        piece_no = np.arange(run_of_piece.size) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        is_last = piece_no == pieces[run_of_piece] - 1
        run_len = lengths[run_of_piece]
        piece_len = np.where(is_last, run_len - (pieces[run_of_piece] - 1) * _MAX_RUN, _MAX_RUN)
        val = values[run_of_piece]
    else:  # ragged masks: many short runs, none split
        run_len = piece_len = lengths
        val = values

    # widths 3/4/8/16 bits for runs up to 8/16/256/more (chosen by the whole run's length, as the SDK does);
    # single values are written as one-value literals (flag 0)
    size_index = np.searchsorted(_SIZE_LIMITS, run_len)
    chunk = (_CHUNK_HEADS[size_index + 4 * (run_len > 1)]
             | ((piece_len - 1).astype(np.uint64) << np.uint64(WORD_SIZE)) | val)
    chunk_bits = _CHUNK_BITS[size_index]

    header = np.array([total, WORD_SIZE - 1, *[s - 1 for s in RLE_SIZES]], dtype=np.uint64)
    header_bits = np.array([32, 5, 4, 4, 4, 4], dtype=np.int64)
    return _pack_codes(np.concatenate([header, chunk]), np.concatenate([header_bits, chunk_bits]))


def encode_rle(values) -> list[int]:
    """Label Studio RLE of a flat uint8 array (what the SDK's `encode_rle(arr)` returns)."""
    arr = np.asarray(values).ravel()
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise RLEError("brush RLE values must be in 0..255")
    lengths, vals = runs_of(arr)
    return list(encode_runs(lengths, vals, arr.size))


def mask_to_rle(mask: np.ndarray, value: int = 255) -> list[int]:
    """Brush RLE of a 2-D mask (nonzero = painted), as the SDK's `mask2rle(mask * value)` encodes it.

    Runs are found on the H×W mask and scaled by 4 instead of materialising the RGBA array.
    """
    arr = np.asarray(mask)
    if arr.ndim != 2:
        raise RLEError(f"mask must be 2-D (H, W), got shape {arr.shape}")
    if not 0 <= int(value) <= 255:
        raise RLEError(f"value must be in 0..255, got {value}")
    lengths, vals = runs_of(arr if arr.dtype == bool else arr != 0)
    vals = np.where(vals, np.uint8(value), np.uint8(0))
    return list(encode_runs(lengths * CHANNELS, vals, arr.size * CHANNELS))


# ------------------------------------------------------------------ decoding
_VECTOR_BITS_LIMIT = 32 * 1024 * 1024  # above this the per-bit-position tables would take too much memory


def _parse_header(rle, max_values: int | None):
    try:
        data = bytes(rle)
    except (TypeError, ValueError) as exc:
        raise RLEError("RLE must be a list of integers in 0..255") from exc
    if len(data) * 8 < 53:
        raise RLEError(f"RLE data ends early: {len(data)} bytes cannot hold the 53-bit header")
    header = int.from_bytes(data[:8].ljust(8, b"\0"), "big")
    num = header >> 32
    word = ((header >> 27) & 31) + 1
    sizes = [((header >> shift) & 15) + 1 for shift in (23, 19, 15, 11)]
    if word > 8:
        raise RLEError(f"only 8-bit brush RLE is supported, this one has {word}-bit words")
    if max_values is not None and num > max_values:
        raise RLEError(f"RLE declares {num} values, more than the expected {max_values}")
    return data, num, word, sizes


def _decode_runs(rle, max_values: int | None):
    """(declared value count, run lengths, run values) of Label Studio RLE bytes.

    Chunks are variable-length, so finding where each starts is sequential. Instead of parsing bit by bit,
    the fields a chunk would have at *every* bit position are computed with numpy first; walking the chain
    of chunk starts is then one list lookup per chunk, and all values are gathered vectorised.
    """
    data, num, word, sizes = _parse_header(rle, max_values)
    n_bits = len(data) * 8
    if n_bits > _VECTOR_BITS_LIMIT:
        return _decode_runs_scalar(data, num, word, sizes)
    padded = data + b"\0" * 16
    # words[k] = the 8 bytes starting at byte k, big-endian (an overlapping, unaligned strided view)
    words = np.ndarray(shape=(len(data) + 8,), dtype=">u8", buffer=padded, strides=(1,))

    def windows(bit_positions: np.ndarray) -> np.ndarray:
        """64-bit windows whose most significant bit is the bit at each position."""
        return words[bit_positions >> 3].astype(np.uint64) << (bit_positions & 7).astype(np.uint64)

    pos = np.arange(n_bits, dtype=np.int64)
    win = windows(pos)
    head = (win >> np.uint64(61)).astype(np.int64)
    size = np.asarray(sizes, dtype=np.int64)[head & 3]
    count = ((win << np.uint64(3)) >> (64 - size).astype(np.uint64)).astype(np.int64) + 1
    repeat = head >> 2
    # memoryviews: indexing one gives a Python int without converting the whole table to a list
    nxt = memoryview(np.ascontiguousarray(pos + 3 + size + np.where(repeat == 1, word, word * count)))
    counts = memoryview(np.ascontiguousarray(count))
    del win, head, pos

    starts = []
    p, i = 53, 0
    while i < num:
        if p >= n_bits:
            raise RLEError(f"RLE data ends early (a chunk starts at bit {p} of {n_bits})")
        starts.append(p)
        i += counts[p]
        p = nxt[p]
    if i > num:
        raise RLEError(f"RLE run ends at value {i}, past the declared {num}")
    if p > n_bits:
        raise RLEError(f"RLE data ends early (needed bit {p} of {n_bits})")

    s = np.asarray(starts, dtype=np.int64)
    w0 = windows(s)
    is_run = (w0 >> np.uint64(63)).astype(bool)
    chunk_size = np.asarray(sizes, dtype=np.int64)[((w0 >> np.uint64(61)) & np.uint64(3)).astype(np.int64)]
    chunk_count = count[s]
    # one entry per run chunk, `count` entries (each a single value) per literal chunk
    entries = np.where(is_run, 1, chunk_count)
    owner = np.repeat(np.arange(s.size), entries)
    k = np.arange(owner.size) - np.repeat(np.cumsum(entries) - entries, entries)
    value_bit = s[owner] + 3 + chunk_size[owner] + np.where(is_run[owner], 0, word * k)
    values = (windows(value_bit) >> np.uint64(64 - word)).astype(np.uint8)
    lengths = np.where(is_run[owner], chunk_count[owner], 1)
    return num, lengths, values


def _decode_runs_scalar(data: bytes, num: int, word: int, sizes: list[int]):
    """The same walk one chunk at a time, for streams too long for the vectorised tables."""
    n_bits = len(data) * 8
    padded = data + b"\0" * 16
    frombytes = int.from_bytes
    word_mask = (1 << word) - 1
    lengths, values = [], []
    pos, i = 53, 0
    while i < num:
        byte, off = pos >> 3, pos & 7
        window = frombytes(padded[byte:byte + 8], "big")
        head = (window >> (61 - off)) & 7
        size = sizes[head & 3]
        count = ((window >> (61 - off - size)) & ((1 << size) - 1)) + 1
        if i + count > num:
            raise RLEError(f"RLE run ends at value {i + count}, past the declared {num}")
        if head >> 2:
            lengths.append(count)
            values.append((window >> (61 - off - size - word)) & word_mask)
            pos += 3 + size + word
        else:
            pos += 3 + size
            for _ in range(count):
                byte, off = pos >> 3, pos & 7
                lengths.append(1)
                values.append((frombytes(padded[byte:byte + 2], "big") >> (16 - off - word)) & word_mask)
                pos += word
        if pos > n_bits:
            raise RLEError(f"RLE data ends early (needed bit {pos} of {n_bits})")
        i += count
    return num, np.asarray(lengths, dtype=np.int64), np.asarray(values, dtype=np.uint8)


def decode_rle(rle, max_values: int | None = None) -> np.ndarray:
    """Flat uint8 values of Label Studio RLE bytes (any chunking the editor or SDK produce)."""
    _, lengths, values = _decode_runs(rle, max_values)
    return np.repeat(values, lengths)


def rle_to_mask(rle, height: int, width: int) -> np.ndarray:
    """Boolean H×W mask of a brush region (its alpha channel, as Label Studio's exporters read it).

    Only the alpha values are looked at and the RGBA array is never materialised: each painted run toggles
    the mask on at its first pixel and off after its last, and a running parity fills in between.
    """
    pixels = int(height) * int(width)
    expected = pixels * CHANNELS
    num, lengths, values = _decode_runs(rle, expected)
    if num != expected:
        raise RLEError(f"RLE holds {num} values, but {width}×{height} RGBA needs {expected}")
    ends = np.cumsum(lengths)
    starts = ends - lengths
    painted = values != 0
    first = starts[painted] // CHANNELS  # first pixel whose alpha value (index 4p+3) lies in the run
    stop = (ends[painted] - CHANNELS) // CHANNELS + 1  # one past the last such pixel
    keep = stop > first
    # runs are ordered and disjoint, so [0, f0, s0, f1, s1, ..., pixels] cuts the image into alternating
    # unpainted/painted segments (some empty): one np.repeat paints them all
    cuts = np.empty(2 * int(keep.sum()) + 2, dtype=np.int64)
    cuts[0], cuts[-1] = 0, pixels
    cuts[1:-1:2], cuts[2:-1:2] = first[keep], stop[keep]
    on = np.zeros(cuts.size - 1, dtype=bool)
    on[1::2] = True
    return np.repeat(on, np.diff(cuts)).reshape(int(height), int(width))
