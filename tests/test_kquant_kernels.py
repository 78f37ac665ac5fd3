"""GGUF K-quant super-blocks (Q4_K, Q5_K, Q6_K) run as stored: the plain-torch twin's dequantization
equals the `gguf` library's bit for bit, the native block / panel / dequantize kernels equal their twin,
and a Linear holding K-quant blocks (every kernel path, and the fused decode step's plan) computes
what a dense layer on the library's dequantized weights computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize as gguf_dequantize

from kiln.kernels.kquant_matmul import (
    KQUANT_BYTES,
    KQUANT_CODES,
    kquant_dequantize_reference,
    kquant_matmul_panels_reference,
    kquant_matmul_reference,
)
from kiln.kernels.native import load_native
from kiln.layers.gguf_quant import GGUFQuantizedTensor, block_method, family_of
from kiln.layers.kquant_linear import KQuantLinearMethod
from kiln.layers.linear import Linear

KTYPES = ["Q4_K", "Q5_K", "Q6_K"]
needs_native = pytest.mark.skipif(not load_native(), reason="native kernels unavailable (no compiler)")


def kblocks(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    """Random but valid super-blocks (gguf-py cannot quantize to K-quants): random bytes for the
    quants and 6-/8-bit scales, small positive fp16 super-block scales (d, and dmin for Q4_K/Q5_K)."""
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, size=(n, k // 256, KQUANT_BYTES[qtype]), dtype=np.uint8)

    def fp16() -> np.ndarray:
        return rng.uniform(1e-4, 3e-3, (n, k // 256, 1)).astype(np.float16).view(np.uint8)

    if qtype == "Q6_K":
        b[..., 208:210] = fp16()
    else:
        b[..., 0:2], b[..., 2:4] = fp16(), fp16()
    return b.reshape(n, -1)


def library_weights(raw: np.ndarray, qtype: str) -> torch.Tensor:
    return torch.from_numpy(gguf_dequantize(raw, T[qtype]).astype(np.float32))


@pytest.mark.parametrize("qtype", KTYPES)
def test_twin_dequantizes_to_the_gguf_values(qtype: str) -> None:
    raw = kblocks(qtype, 7, 768, seed=1)
    got = kquant_dequantize_reference(torch.from_numpy(raw), qtype, 768)
    assert torch.equal(got, library_weights(raw, qtype))


@pytest.mark.parametrize("qtype", KTYPES)
def test_twin_matmul_is_close_to_dense(qtype: str) -> None:
    """The twin's int16 activation rounding costs well under 1e-3 of the output scale."""
    raw = kblocks(qtype, 64, 512, seed=2)
    x = torch.randn(3, 512)
    dense = x @ library_weights(raw, qtype).t()
    err = (kquant_matmul_reference(x, torch.from_numpy(raw), qtype) - dense).abs().max() / dense.abs().max()
    assert err < 1e-3


@needs_native
@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("m_rows", [1, 2, 3, 5, 16, 33])
@pytest.mark.parametrize("n, k", [(1, 256), (37, 512), (130, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kquant_matmul_equals_reference(qtype: str, m_rows: int, n: int, k: int, dtype: torch.dtype) -> None:
    w = torch.from_numpy(kblocks(qtype, n, k, seed=n + k))
    x = (torch.randn(m_rows, k) * 3).to(dtype)
    got = torch.ops.kiln.kquant_matmul(x, w, KQUANT_CODES[qtype])
    want = kquant_matmul_reference(x.float(), w, qtype)
    assert got.dtype == dtype and got.shape == (m_rows, n)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want, rtol=tol, atol=tol * want.abs().max().item()), (got.float() - want).abs().max()


@needs_native
@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_kquant_dequantize_equals_reference(qtype: str, dtype: torch.dtype) -> None:
    w = torch.from_numpy(kblocks(qtype, 29, 768, seed=3))
    got = torch.ops.kiln.kquant_dequantize(w, 768, KQUANT_CODES[qtype], dtype)
    assert torch.equal(got, kquant_dequantize_reference(w, qtype, 768, dtype))


@needs_native
@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("m_rows", [1, 4, 17, 64])
def test_native_kquant_panels_equal_reference(qtype: str, m_rows: int) -> None:
    w = torch.from_numpy(kblocks(qtype, 45, 512, seed=4))
    x = torch.randn(m_rows, 512)
    got = torch.ops.kiln.kquant_matmul_panels(x, w, KQUANT_CODES[qtype])
    want = kquant_matmul_panels_reference(x, w, qtype)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@needs_native
def test_bad_input_gets_a_clear_error() -> None:
    w = torch.from_numpy(kblocks("Q6_K", 4, 512))
    with pytest.raises(RuntimeError, match="multiple of 256"):
        torch.ops.kiln.kquant_matmul(torch.randn(1, 500), w, KQUANT_CODES["Q6_K"])
    with pytest.raises(RuntimeError, match="uint8"):
        torch.ops.kiln.kquant_matmul(torch.randn(1, 256), w, KQUANT_CODES["Q6_K"])  # 512 columns' worth of bytes


def test_family_and_method_of_kquant_layers() -> None:
    assert family_of({"Q6_K"}) == "Q6_K" and family_of({"Q5_K"}) == "Q5_K"
    assert family_of({"Q6_K", "Q5_K"}) is None  # one layer, one layout: mixed shards stay dense
    assert isinstance(block_method("Q6_K", False), KQuantLinearMethod)
    with pytest.raises(ValueError, match="qtype"):
        KQuantLinearMethod("Q2_K")


def _kquant_linear(qtype: str, keep_dense: bool, shards: list[np.ndarray], k: int, dense_threshold: int = 8,
                   panel_rows: tuple[int, int] = (9, 40)) -> Linear:
    names = [None] if len(shards) == 1 else [f"s{i}" for i in range(len(shards))]
    layer = Linear(k, [s.shape[0] for s in shards], shard_names=names, bias=True, dtype=torch.float32)
    layer.set_method(KQuantLinearMethod(qtype, keep_dense=keep_dense, dense_threshold=dense_threshold,
                                        panel_rows=panel_rows))
    for name, raw in zip(names, shards):
        layer.weight_loader("weight", GGUFQuantizedTensor(qtype, torch.from_numpy(raw), k), name)
    layer.bias.data.copy_(torch.randn(layer.bias.shape))
    layer.method.process_weights_after_loading(layer)
    return layer


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("keep_dense", [False, True])
def test_linear_on_kquant_blocks_matches_the_library_weights(qtype: str, keep_dense: bool) -> None:
    """Block kernel (M<=8), panel kernel (M 9-40, fp32), dense GEMM above: all against x @ W^T + b with W
    the gguf library's dequantization, on a fused layer of two shards."""
    k = 512
    shards = [kblocks(qtype, 24, k, seed=5), kblocks(qtype, 40, k, seed=6)]
    layer = _kquant_linear(qtype, keep_dense, shards, k)
    w = torch.cat([library_weights(s, qtype) for s in shards])
    for m_rows in (1, 8, 20, 64):
        x = torch.randn(m_rows, k)
        want = x @ w.t() + layer.bias
        got = layer(x)
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max().item()), (m_rows, (got - want).abs().max())
    assert qtype in layer.method.name


@needs_native
@pytest.mark.parametrize("qtype", KTYPES)
def test_decode_plan_entry_carries_the_blocks_and_limits(qtype: str) -> None:
    """The fused step's entry holds the layer's own buffer (no copy) and the row limits `apply` uses."""
    from kiln.kernels.decode_step import KQUANT_KIND_BASE

    layer = _kquant_linear(qtype, False, [kblocks(qtype, 16, 256, seed=7)], 256)
    entry = layer.method.decode_plan_entry(layer, torch.float32)
    assert entry.kind == KQUANT_KIND_BASE + KQUANT_CODES[qtype]
    assert entry.tensors[0] is layer.kq and entry.max_rows == 8 and entry.panel_rows == 40


# ---- a tiny Llama whose linears are K-quants, through the GGUF loader and the fused decode step ----
K_LAYER_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q5_K",
                 "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"}


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory: pytest.TempPathFactory):
    """The tiny test Llama at hidden 256 (K-quant rows are whole 256-weight super-blocks), its linears
    replaced by random valid K-quant blocks (as each of K_LAYER_TYPES) and written as llama.cpp would."""
    from gguf import GGMLQuantizationType as Q
    from loader.tiny_model import TinySpec, make_checkpoint, write_gguf

    ckpt = make_checkpoint(TinySpec(hidden=256, ffn=512, heads=4, kv_heads=2, head_dim=64, layers=2))
    for i, (name, (raw, _)) in enumerate(sorted(ckpt.gguf_raw.items())):
        kind = name.rsplit(".", 1)[0].split(".")[-1]
        if kind in K_LAYER_TYPES:
            qtype = K_LAYER_TYPES[kind]
            rows = raw.shape[0]
            cols = 256 if kind != "ffn_down" else 512
            ckpt.gguf_raw[name] = (kblocks(qtype, rows, cols, seed=100 + i), Q[qtype])
    return write_gguf(ckpt, tmp_path_factory.mktemp("kquant") / "tiny-kquant.gguf")


def _llm(path, dtype: str, quantized_weights: str = "auto"):
    from kiln import LLM

    return LLM(str(path), dtype=dtype, kv_cache_memory=1 << 20, max_num_batched_tokens=64,
               quantized_weights=quantized_weights)


@needs_native
def test_tiny_kquant_model_runs_natively_and_matches_dequantized(kquant_gguf) -> None:
    """Every linear holds its K-quant blocks (no dense copy of them is the forward's source at decode
    sizes), and logits equal the dequantize-at-load model's to the int16 activation rounding."""
    native = _llm(kquant_gguf, "float32").engine.loaded.model
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod
    from kiln.layers.gguf_repack import REPACKED

    linears = [m for m in native.layers.modules() if hasattr(m, "method")]
    kinds = {m.method.qtype for m in linears if isinstance(m.method, KQuantLinearMethod)}
    # the kinds not repacked into another block layout at load run as stored
    assert kinds == {t for t in K_LAYER_TYPES.values() if t not in REPACKED}
    assert all(isinstance(m.method, GGUFQuantLinearMethod) for m in linears)  # none dequantized at load
    reference = _llm(kquant_gguf, "float32", "dequantize").engine.loaded.model
    from kiln.kernels.attention_metadata import build_attention_metadata
    from kiln.kernels.kv_quant import allocate_kv_caches

    cfg = native.config
    ids = torch.randint(0, cfg.vocab_size, (7,), generator=torch.Generator().manual_seed(0))
    logits = []
    for model in (native, reference):
        caches = allocate_kv_caches(cfg.num_hidden_layers, (4, 4, cfg.num_key_value_heads, cfg.head_dim), "float32",
                                    model.dtype, model.device)
        with torch.inference_mode():
            hidden = model(ids, torch.arange(7), build_attention_metadata([7], [7], [[0, 1]], 4), caches)
            logits.append(model.compute_logits(hidden))
    assert torch.allclose(logits[0], logits[1], rtol=1e-3, atol=1e-3 * logits[1].abs().max().item()), \
        (logits[0] - logits[1]).abs().max()


@needs_native
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fused_step_runs_kquant_layers_bit_identically(kquant_gguf, dtype) -> None:
    from test_decode_step import _decode_steps

    model = _llm(kquant_gguf, dtype).engine.loaded.model
    assert model.decode_plan() is not None, model.decode_plan_status
    fused = _decode_steps(model, True, "auto", [3, 9, 6], steps=3)
    plain = _decode_steps(model, False, "auto", [3, 9, 6], steps=3)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)
