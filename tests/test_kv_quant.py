"""Quantized KV cache (int8 / fp8_e4m3 with a scale per token and head): round-trip error bounds,
the native write and decode kernels against their plain-torch twins, the engine on a tiny model,
the block budget, bad values, and (real model) next-token KL against a full-precision cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.config import CacheConfig, ModelConfig
from kiln.data import WIKITEXT2_TEST, data_path
from kiln.engine.kv_budget import plan_kv_cache
from kiln.kernels import paged_attention as pa
from kiln.kernels import kv_quant
from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.kernels.attention_reference import paged_attention_reference
from kiln.kernels.kv_quant import (
    QuantizedKV,
    allocate_kv_caches,
    dequantize_reference,
    quantize_reference,
    write_kv_quantized_reference,
)
from kiln.kernels.native import load_native

STORAGE = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn}
needs_native = pytest.mark.skipif(not load_native(), reason="needs the native kernel library (a C++ compiler)")


def _varied(t: int = 64, h: int = 3, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Rows spanning 6 orders of magnitude (tiny heads, attention-sink-sized outliers), a zero row."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, d, generator=g) * torch.logspace(-4, 2, t).view(t, 1, 1)
    x[5] = 0.0
    return x


# ----------------------------------------------------------------------------- round trip

def test_int8_round_trip_within_half_a_step() -> None:
    x = _varied()
    data, scale = quantize_reference(x, torch.int8)
    assert data.dtype == torch.int8 and scale.shape == x.shape[:2]
    torch.testing.assert_close(scale, x.abs().amax(-1) / 127)  # absmax maps to +-127 exactly
    err = (dequantize_reference(data, scale) - x).abs()
    assert (err <= scale.unsqueeze(-1) * (0.5 + 1e-4)).all()  # round to nearest: at most half a step
    assert data.abs().amax(-1)[scale > 0].eq(127).all()
    assert (dequantize_reference(data, scale)[5] == 0).all() and (scale[5] == 0).all()


def test_fp8_round_trip_within_half_an_ulp() -> None:
    x = _varied()
    data, scale = quantize_reference(x, torch.float8_e4m3fn)
    assert data.dtype == torch.float8_e4m3fn
    y = dequantize_reference(data, scale)
    assert torch.isfinite(y).all()
    # 3 mantissa bits: relative error <= 2^-4 for normals; subnormals (|x/scale| < 2^-6) step 2^-9.
    bound = torch.maximum(x.abs() * 2.0 ** -4, scale.unsqueeze(-1) * 2.0 ** -10) * (1 + 1e-4)
    assert ((y - x).abs() <= bound).all()
    big = torch.full((1, 1, 16), 1e6)  # far beyond E4M3's 448: the scale absorbs it, no NaN
    assert torch.isfinite(dequantize_reference(*quantize_reference(big, torch.float8_e4m3fn))).all()


def test_fp8_scale_keeps_small_heads_accurate() -> None:
    """Why fp8 carries a scale too: a head of magnitude ~1e-3 sits in E4M3's subnormal range when
    cast directly and keeps a bit or two; scaled, it keeps E4M3's full 3 mantissa bits."""
    x = torch.randn(256, 1, 64, generator=torch.Generator().manual_seed(1)) * 1e-3

    def rel(y: torch.Tensor) -> float:
        return float((y - x).norm() / x.norm())

    scaled = rel(dequantize_reference(*quantize_reference(x, torch.float8_e4m3fn)))
    unscaled = rel(x.to(torch.float8_e4m3fn).float())
    assert scaled < 0.03 and unscaled > 10 * scaled, (scaled, unscaled)


# ----------------------------------------------------------------------------- native vs twin

@needs_native
@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_write_is_bit_identical_to_twin(name: str, dtype: torch.dtype) -> None:
    # K as the model produces it: a strided view into the fused qkv projection output
    qkv = _varied(t=40, h=5, d=32).reshape(40, -1).to(dtype)
    k = qkv[:, 32:96].view(40, 2, 32)
    slots = torch.randperm(12 * 4, generator=torch.Generator().manual_seed(0))[:40]
    (native, _), = allocate_kv_caches(1, (12, 4, 2, 32), name, dtype, "cpu")
    (twin, _), = allocate_kv_caches(1, (12, 4, 2, 32), name, dtype, "cpu")
    torch.ops.kiln.write_kv_quant(k, native.data, native.scale, slots)
    write_kv_quantized_reference(k, twin, slots)
    assert torch.equal(native.raw(), twin.raw()) and torch.equal(native.scale, twin.scale)


def _quantized_batch(name, dtype, query_lens, seq_lens, hq=6, hkv=2, d=32, block_size=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = sum((s + block_size - 1) // block_size for s in seq_lens) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()
    block_ids, used = [], 0
    for s in seq_lens:
        n = (s + block_size - 1) // block_size
        block_ids.append(perm[used:used + n])
        used += n
    meta = build_attention_metadata(query_lens, seq_lens, block_ids, block_size)
    (k_cache, v_cache), = allocate_kv_caches(1, (n_blocks, block_size, hkv, d), name, dtype, "cpu")
    everything = torch.arange(n_blocks * block_size)
    write_kv_quantized_reference(torch.randn(len(everything), hkv, d, generator=g).to(dtype), k_cache, everything)
    write_kv_quantized_reference(torch.randn(len(everything), hkv, d, generator=g).to(dtype), v_cache, everything)
    t = sum(query_lens)
    q = torch.randn(t, hq, d, generator=g).to(dtype)
    pa.write_kv(torch.randn(t, hkv, d, generator=g).to(dtype), torch.randn(t, hkv, d, generator=g).to(dtype),
                k_cache, v_cache, meta.slot_mapping)
    return q, k_cache, v_cache, meta


LAYOUTS = [
    ([1, 1, 1], [1, 9, 33]),  # decodes only: the native kernel
    ([1, 1, 5, 12], [4, 17, 5, 20]),  # decodes + a fresh prefill + a short chunk after a prefix (row-wise kernel)
    ([1, 24, 9], [30, 40, 9]),  # a long chunk after a prefix (dequantize + SDPA), a fresh prefill
]


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("query_lens, seq_lens", LAYOUTS)
@pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])
def test_quantized_attention_matches_reference(name, dtype, query_lens, seq_lens, native, monkeypatch) -> None:
    if native and not load_native():
        pytest.skip("native kernels unavailable (no compiler)")
    if not native:  # the plain-torch paths: twin writes, gather + dequantize + SDPA
        monkeypatch.setattr(pa, "load_native", lambda: False)
        monkeypatch.setattr(kv_quant, "load_native", lambda: False)
    q, k_cache, v_cache, meta = _quantized_batch(name, dtype, query_lens, seq_lens)
    ref = paged_attention_reference(q, k_cache, v_cache, meta)
    out = pa.paged_attention(q, k_cache, v_cache, meta)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out.float(), ref.float(), atol=tol * 5, rtol=tol)


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
def test_quantized_attention_stays_close_to_full_precision(name: str) -> None:
    """The same K/V through a quantized and an fp32 cache: attention outputs differ by the
    quantization error only (int8 ~0.5%, fp8 ~2% relative)."""
    g = torch.Generator().manual_seed(3)
    meta = build_attention_metadata([1, 1, 7], [20, 45, 7], [[0, 1], [2, 3, 4], [5]], 16)
    k, v = torch.randn(96, 2, 64, generator=g), torch.randn(96, 2, 64, generator=g)
    q = torch.randn(9, 6, 64, generator=g)
    (kq, vq), = allocate_kv_caches(1, (6, 16, 2, 64), name, torch.float32, "cpu")
    (kf, vf), = allocate_kv_caches(1, (6, 16, 2, 64), "auto", torch.float32, "cpu")
    pa.write_kv(k, v, kq, vq, torch.arange(96))
    pa.write_kv(k, v, kf, vf, torch.arange(96))
    full, quant = pa.paged_attention(q, kf, vf, meta), pa.paged_attention(q, kq, vq, meta)
    rel = float((quant - full).norm() / full.norm())
    assert rel < (0.01 if name == "int8" else 0.04), rel


# ----------------------------------------------------------------------------- budget, config, CLI

def _smollm_like() -> ModelConfig:
    return ModelConfig("llama", 49152, 576, 1536, 30, 9, 3, 64)


def test_same_budget_holds_about_twice_the_blocks_of_bf16() -> None:
    cfg, budget = _smollm_like(), 256 << 20

    def blocks(kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
        cache = CacheConfig(kv_cache_memory=budget, kv_cache_dtype=kv_cache_dtype)
        return plan_kv_cache(cfg, cache, model_dtype, 8192).num_blocks

    bf16, fp32 = blocks("auto", torch.bfloat16), blocks("float32", torch.float32)
    # a float32 model on the CPU keeps a float16 cache by default: the blocks of a 16-bit cache
    assert blocks("auto", torch.float32) == blocks("float16", torch.float32) == bf16 and 2 * fp32 == bf16
    for name in ("int8", "fp8_e4m3"):
        quant = blocks(name, torch.bfloat16)
        assert quant == blocks(name, torch.float32)  # 1 byte per value whatever the model dtype
        # 64 one-byte values + a 4-byte scale per head vs 128 (bf16) / 256 (fp32) bytes
        assert 1.85 < quant / bf16 <= 2.0 and 3.7 < quant / fp32 <= 4.0, (quant, bf16, fp32)
    line = plan_kv_cache(cfg, CacheConfig(kv_cache_memory=budget, kv_cache_dtype="int8"), torch.bfloat16, 8192).describe()
    assert line.startswith("KV cache (int8, ") and " blocks = " in line
    assert plan_kv_cache(cfg, CacheConfig(kv_cache_memory=budget), torch.bfloat16, 8192).describe().startswith(
        "KV cache (auto = bfloat16): ")
    assert plan_kv_cache(cfg, CacheConfig(kv_cache_memory=budget), torch.float32, 8192).describe().startswith(
        "KV cache (auto = float16): ")
    assert plan_kv_cache(cfg, CacheConfig(kv_cache_memory=budget), torch.float32, 8192, "cuda").describe().startswith(
        "KV cache (auto = float32): ")


def test_a_float_cache_below_the_model_dtype_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype float16 with a bfloat16 model is not supported"):
        plan_kv_cache(_smollm_like(), CacheConfig(kv_cache_memory=256 << 20, kv_cache_dtype="float16"),
                      torch.bfloat16, 8192)


def test_bad_kv_cache_dtype_is_one_clear_error(capsys) -> None:
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, bfloat16, float16, int8, fp8_e4m3; got 'int4'"):
        CacheConfig(kv_cache_dtype="int4")
    from kiln.entrypoints.llm import LLM

    with pytest.raises(ValueError, match="got 'int4'"):  # refused before any model is loaded
        LLM("no-such-model", kv_cache_dtype="int4")
    from kiln.entrypoints.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["generate", "hi", "--kv-cache-dtype", "int4"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--kv-cache-dtype: invalid choice: 'int4'" in err[-1] and "fp8_e4m3" in err[-1]


# ----------------------------------------------------------------------------- engine, tiny model

@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models").gguf["tied"]


@pytest.mark.parametrize("name", ["int8", "fp8_e4m3"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_runs_with_quantized_kv(tiny_gguf: Path, name: str, dtype: str) -> None:
    from kiln import LLM, SamplingParams
    from loader.tiny_model import one_torch_thread

    with one_torch_thread():
        llm = LLM(str(tiny_gguf), dtype=dtype, kv_cache_memory=1 << 20, kv_cache_dtype=name, max_num_batched_tokens=64)
        engine = llm.engine
        assert isinstance(engine.runner.kv_caches[0][0], QuantizedKV)
        assert engine.runner.kv_caches[0][0].data.shape[0] == engine.kv_budget.num_blocks
        assert engine.kv_budget.describe().startswith(f"KV cache ({name}")
        greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
        prompts = ["the cat sat on the mat", "hello world " * 12, "he sat in the hat"]
        batched = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
        # one at a time (and the prompts again, now prefix-cache hits): every path reads the same
        # quantized cache, so in fp32 batching and caching change nothing. In bf16 they may: a chunk
        # of up to 16 rows runs the block kernel, a longer one the dense bf16 GEMM, and the two round
        # differently, so a prompt prefilled alone and the same prompt in a batch can part ways.
        single = [llm.generate(p, greedy)[0].outputs[0].token_ids for p in prompts]
        assert all(len(t) == 20 for t in batched + single)
        if dtype == "float32":
            assert batched == single
        assert engine.kv_manager.get_num_free_blocks() == engine.kv_budget.num_blocks


# ----------------------------------------------------------------------------- real model

def _teacher_forced_logprobs(model, ids: list[int], kv_cache_dtype: str, prefill: int) -> torch.Tensor:
    """Log-probs of ids[prefill:] given their prefixes, through the engine's paged path: the first
    `prefill` tokens in one prefill, then one decode step per token, each reading the cache the
    earlier steps wrote (in `kv_cache_dtype`), as the model runner does."""
    block_size = 16
    n_blocks = (len(ids) + block_size - 1) // block_size
    cfg = model.config
    caches = allocate_kv_caches(cfg.num_hidden_layers, (n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim),
                                kv_cache_dtype, model.dtype, model.device)
    blocks = list(range(n_blocks))
    rows = []
    with torch.inference_mode():
        meta = build_attention_metadata([prefill], [prefill], [blocks], block_size)
        hidden = model(torch.tensor(ids[:prefill]), torch.arange(prefill), meta, caches)
        rows.append(model.compute_logits(hidden[-1:]))
        for pos in range(prefill, len(ids) - 1):
            meta = build_attention_metadata([1], [pos + 1], [blocks], block_size)
            rows.append(model.compute_logits(model(torch.tensor([ids[pos]]), torch.tensor([pos]), meta, caches)))
    return torch.log_softmax(torch.cat(rows), dim=-1)


@pytest.mark.real_model
def test_quantized_kv_next_token_kl_on_default_model(llm_fp32) -> None:
    from loader.tiny_model import one_torch_thread

    model = llm_fp32.engine.loaded.model
    text = data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")[20000:26000]
    ids = llm_fp32.tokenizer.encode(text, add_special_tokens=False)[:256]
    with one_torch_thread():  # ~390 small forwards: one thread keeps them steady on a busy machine
        full = _teacher_forced_logprobs(model, ids, "float32", prefill=128)
        quants = {name: _teacher_forced_logprobs(model, ids, name, prefill=128)
                  for name in ("int8", "fp8_e4m3", "float16", "bfloat16")}
    for name, quant in quants.items():
        kl = (full.exp() * (full - quant)).sum(-1)  # KL(full || quantized) per decoded position
        print(f"{name}: mean KL {kl.mean():.7f}, max {kl.max():.7f} over {len(kl)} decode positions")
        # 16-bit caches round each value once (float16: 2^-11 relative, bfloat16: 2^-8)
        bound = {"float16": 1e-4, "bfloat16": 1e-3}.get(name, 0.01)
        assert kl.mean() < bound, (name, float(kl.mean()))
        assert (full.argmax(-1) == quant.argmax(-1)).float().mean() > (0.98 if name in ("float16", "bfloat16") else 0.9)
