"""K-quant quantizers (kiln/convert/kquant_quantize.py): the `gguf` library's dequantization of kiln's bytes
is the reference decoder; llama.cpp's own reference quantizer (ggml_quantize_chunk in the libggml-base
that llama-cpp-python ships) is the reference encoder where it is installed."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from kiln.convert.kquant_quantize import BLOCK_BYTES, quantize_kquant

TYPES = ["Q4_K", "Q5_K", "Q6_K"]
# Relative RMS error bound on Gaussian weights, ~5 % above what the quantizers measured on seeds 0, 3, 7
# (0.0712-0.0716, 0.0361-0.0363, 0.0176-0.0178 with the search; plain RTN of the same formats: 0.078,
# 0.038, 0.0188); the worst super-block measured 1.15-1.23x the mean.
RMS_BOUND = {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.0187}
# The search must beat plain round-to-nearest of the same format by at least this factor of RMS error
# (measured: 0.911-0.912, 0.946-0.950, 0.942-0.944).
SEARCH_GAIN = 0.97


def _weights(rows: int = 96, cols: int = 1024, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, cols)) * 0.05).astype(np.float32)


def _rel_rms(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - y) ** 2) / np.mean(x ** 2)))


def _round_trip(x: np.ndarray, qtype: str, search: bool = True) -> np.ndarray:
    return np.asarray(dequantize(quantize_kquant(x, qtype, search), Q[qtype]), dtype=np.float32)


@pytest.mark.parametrize("qtype", TYPES)
def test_layout_and_round_trip_error(qtype: str) -> None:
    x = _weights()
    raw = quantize_kquant(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (96, 1024 // 256 * BLOCK_BYTES[qtype])
    assert BLOCK_BYTES[qtype] == GGML_QUANT_SIZES[Q[qtype]][1]
    y = np.asarray(dequantize(raw, Q[qtype]), dtype=np.float32)
    assert y.shape == x.shape
    assert _rel_rms(x, y) < RMS_BOUND[qtype]
    # no super-block is much worse than the average: a mis-packed scale or level shows up here
    per_block = np.sqrt(((x - y) ** 2).reshape(-1, 256).mean(1) / (x ** 2).reshape(-1, 256).mean(1))
    assert per_block.max() < 1.3 * RMS_BOUND[qtype]


@pytest.mark.parametrize("qtype", TYPES)
def test_corrupted_scale_breaks_the_bound(qtype: str) -> None:
    """Negative control: the bound above notices one wrong sub-block scale."""
    x = _weights(rows=4)
    raw = quantize_kquant(x, qtype)
    # Q4_K/Q5_K: low bits of sub-block 1's 6-bit min; Q6_K: the sign bit of sub-block 3's int8 scale
    scale_byte, flip = {"Q4_K": (5, 0x0F), "Q5_K": (5, 0x0F), "Q6_K": (192 + 3, 0x80)}[qtype]
    raw[0, scale_byte] ^= flip
    y = np.asarray(dequantize(raw, Q[qtype]), dtype=np.float32)
    block = slice(0, 256)
    assert _rel_rms(x[0, block], y[0, block]) > 1.5 * RMS_BOUND[qtype]
    assert _rel_rms(x[1:], y[1:]) < RMS_BOUND[qtype]  # the other super-blocks are untouched


@pytest.mark.parametrize("qtype", TYPES)
def test_search_beats_round_to_nearest(qtype: str) -> None:
    x = _weights(seed=3)
    searched = _rel_rms(x, _round_trip(x, qtype, search=True))
    plain = _rel_rms(x, _round_trip(x, qtype, search=False))
    assert searched < SEARCH_GAIN * plain


@pytest.mark.parametrize("qtype", TYPES)
def test_special_blocks(qtype: str) -> None:
    """All-zero, constant, one-sign, outlier and large super-blocks decode sensibly (no NaN, zeros stay zero)."""
    x = np.zeros((5, 256), np.float32)
    x[1] = -0.25  # constant negative: carried by the min (Q4_K/Q5_K) or by one level (Q6_K)
    x[2] = np.abs(_weights(1, 256)[0])  # all positive: min pinned to 0
    x[3] = _weights(1, 256, seed=5)[0]
    x[3, 17] = 3.0  # one outlier
    x[4] = _weights(1, 256, seed=6)[0] * 40  # large values (|x| ~ 2): nothing overflows the fp16 scales
    y = _round_trip(x, qtype)
    assert np.isfinite(y).all()
    assert np.array_equal(y[0], np.zeros(256, np.float32))
    assert np.abs(y[1] + 0.25).max() < 2e-3
    assert _rel_rms(x[2], y[2]) < 2 * RMS_BOUND[qtype]
    assert abs(y[3, 17] - 3.0) < 0.05 * 3.0
    assert _rel_rms(x[4], y[4]) < 2 * RMS_BOUND[qtype]


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="whole number of 256"):
        quantize_kquant(np.zeros((2, 576), np.float32), "Q4_K")
    with pytest.raises(ValueError, match="no K-quant quantizer"):
        quantize_kquant(np.zeros((2, 256), np.float32), "Q3_K")


def _ggml_quantize_chunk():
    """llama.cpp's ggml_quantize_chunk from llama-cpp-python's libggml-base, or skip."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `peers` extra) is not installed")
    lib_path = Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"
    if not lib_path.is_file():
        pytest.skip(f"llama-cpp-python has no {lib_path.name} to compare with")
    fn = ctypes.CDLL(str(lib_path)).ggml_quantize_chunk
    fn.restype = ctypes.c_size_t
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p]
    return fn


@pytest.mark.parametrize("qtype", TYPES)
def test_bytes_match_llama_cpp_reference_quantizer(qtype: str) -> None:
    """Same algorithm as llama-quantize without an importance matrix: the same bytes in ≥ 99 % of the
    super-blocks (the rest are near-ties its compiled float arithmetic breaks the other way, measured
    0.1-0.2 % for Q4_K/Q5_K and none for Q6_K), and no worse error where they differ."""
    quantize_chunk = _ggml_quantize_chunk()
    x = _weights(rows=256, seed=1)
    x[5] = np.abs(x[5])
    x[6] = 0.0
    x[7, :300] = 0.01
    ours = quantize_kquant(x, qtype)
    theirs = np.zeros_like(ours)
    written = quantize_chunk(int(Q[qtype]), x.ctypes.data, theirs.ctypes.data, 0, x.shape[0], x.shape[1], None)
    assert written == theirs.size
    same = (ours.reshape(-1, BLOCK_BYTES[qtype]) == theirs.reshape(-1, BLOCK_BYTES[qtype])).all(1)
    assert same.mean() >= 0.99
    ours_err = _rel_rms(x, np.asarray(dequantize(ours, Q[qtype])))
    theirs_err = _rel_rms(x, np.asarray(dequantize(theirs, Q[qtype])))
    assert ours_err <= theirs_err * 1.001
