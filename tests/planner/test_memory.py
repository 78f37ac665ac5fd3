"""The memory arithmetic against figures computed by hand from published configurations.

Llama 2 7B: multi-head attention (32 KV heads = 32 query heads), untied embeddings.
Llama 3 70B: GQA (8 KV heads for 64 query heads), untied; the seed documents' 70B / 4K example.
Gemma 3 270M: GQA with one KV head of 256, tied embeddings, 15 of 18 layers sliding over 512 tokens.
Mistral 7B v0.1: every layer slides over 4,096 tokens.
"""

from __future__ import annotations

import pytest

from kiln.planner.arch import arch_from_hf_config
from kiln.planner.formats import matrix_bytes, weight_format
from kiln.planner.memory import (
    ModelSource,
    PlanRequest,
    kv_cache,
    plan_memory,
    weights_for_format,
)
from kiln.planner.presets import PRESETS

GPU_BF16 = dict(device="cuda", weights="bf16")  # bf16 activations and KV cache, no kiln CPU copies


def source(name: str) -> ModelSource:
    return ModelSource(arch_from_hf_config(PRESETS[name], name), "preset")


def test_llama2_7b_mha_untied_weights_and_kv() -> None:
    plan = plan_memory(source("llama-2-7b"), PlanRequest(context=4096, **GPU_BF16))
    w = plan.whole.weights
    assert w["embeddings"] == 32000 * 4096 * 2 == 262_144_000
    assert w["lm_head"] == 262_144_000  # untied: a second vocab x hidden matrix
    assert w["attention"] == 4 * 4096 * 4096 * 2 * 32 == 4_294_967_296
    assert w["mlp"] == 3 * 4096 * 11008 * 2 * 32 == 8_657_043_456
    assert w["norms"] == 4 * 4096 * 65
    norm_params = 4096 * 65  # 2 per layer + the final norm
    # 6,738,415,616 published parameters: matrices in bf16, norms kept fp32
    assert plan.whole.weights_bytes == 2 * (6_738_415_616 - norm_params) + 4 * norm_params
    # MHA: 2 (K, V) x 32 layers x 32 heads x 128 x 2 bytes = 512 KiB a token; 4096 tokens = 2 GiB
    assert plan.whole.kv_per_token_bytes == 524_288
    assert plan.whole.kv_cache_bytes == 2 * 1024 ** 3
    assert plan.seed_kv_bytes == plan.whole.kv_cache_bytes  # without GQA the seed formula is right


def test_llama3_70b_gqa_kv_is_8x_below_the_seed_formula() -> None:
    plan = plan_memory(source("llama-3-70b"), PlanRequest(context=4096, **GPU_BF16))
    assert plan.whole.kv_per_token_bytes == 2 * 80 * 8 * 128 * 2 == 327_680
    assert plan.whole.kv_cache_bytes == 1_342_177_280  # "about 1.3 GB"
    assert plan.seed_kv_bytes == 2 * 80 * 8192 * 4096 * 2 == 10_737_418_240
    w = plan.whole.weights
    assert w["embeddings"] == w["lm_head"] == 128256 * 8192 * 2
    assert w["attention"] == (2 * 8192 * 8192 + 2 * 1024 * 8192) * 2 * 80
    assert w["mlp"] == 3 * 8192 * 28672 * 2 * 80


def test_llama3_70b_per_rank_under_tensor_parallel() -> None:
    whole = plan_memory(source("llama-3-70b"), PlanRequest(context=4096, **GPU_BF16))
    tp2 = plan_memory(source("llama-3-70b"), PlanRequest(context=4096, tensor_parallel_size=2, **GPU_BF16))
    assert tp2.per_rank.kv_cache_bytes == whole.whole.kv_cache_bytes // 2
    assert tp2.per_rank.weights["mlp"] == whole.whole.weights["mlp"] // 2
    assert tp2.per_rank.weights["norms"] == whole.whole.weights["norms"]  # replicated
    # 16 ranks, 8 KV heads: each rank still holds a whole head (1/8 of the cache, not 1/16)
    tp16 = plan_memory(source("llama-3-70b"), PlanRequest(context=4096, tensor_parallel_size=16, **GPU_BF16))
    assert tp16.per_rank.kv_cache_bytes == whole.whole.kv_cache_bytes // 8
    assert any("replicates" in n for n in tp16.whole.notes)


def test_gemma3_sliding_layers_capped_and_tied_embedding() -> None:
    a = source("gemma-3-270m").arch
    assert a.layer_windows.count(None) == 3 and a.layer_windows[5] is None and a.layer_windows[0] == 512
    plan = plan_memory(source("gemma-3-270m"), PlanRequest(context=4096, **GPU_BF16))
    per_layer_token = 2 * 1 * 256 * 2  # one KV head of 256, bf16
    assert plan.whole.kv_cache_bytes == per_layer_token * (15 * 512 + 3 * 4096) == 20_447_232
    w = plan.whole.weights
    assert w["lm_head"] == 0 and w["embeddings"] == 262144 * 640 * 2
    attn_layer = (1024 * 640 + 2 * 256 * 640 + 640 * 1024) * 2 + 4 * 2 * 256  # + q/k norms (fp32)
    assert w["attention"] == attn_layer * 18
    assert w["norms"] == 4 * 640 * (4 * 18 + 1)


def test_mistral_window_caps_every_layer() -> None:
    at_8k = plan_memory(source("mistral-7b"), PlanRequest(context=8192, **GPU_BF16))
    at_4k = plan_memory(source("mistral-7b"), PlanRequest(context=4096, **GPU_BF16))
    assert at_8k.whole.kv_cache_bytes == at_4k.whole.kv_cache_bytes == 2 * 8 * 128 * 2 * 32 * 4096


def test_quantized_kv_counts_its_scales() -> None:
    plan = plan_memory(source("llama-3-8b"), PlanRequest(context=1024, kv_cache_dtype="int8", **GPU_BF16))
    assert plan.whole.kv_per_token_bytes == 32 * 2 * 8 * (128 * 1 + 4)


def test_concurrency_and_block_rounding() -> None:
    a = source("llama-3-8b").arch
    req = PlanRequest(context=100, concurrency=3, block_size=16, **GPU_BF16)
    total, per_token = kv_cache(a, req, 100)
    assert total == 3 * per_token * 112  # 100 tokens occupy 7 blocks of 16


def test_gguf_block_sizes_and_q4_k_m_mix() -> None:
    assert matrix_bytes("q4_1", 576, 1536) == 576 * 48 * 20
    assert matrix_bytes("q8_0", 49152, 576) == 30_081_024  # the default GGUF's token_embd, byte for byte
    a = source("llama-3-8b").arch
    w = weights_for_format(a, weight_format("q4_k_m"))
    down = matrix_bytes("q4_k", 4096, 14336) * 0.5 + matrix_bytes("q6_k", 4096, 14336) * 0.5
    assert w["mlp"] == int((2 * matrix_bytes("q4_k", 14336, 4096) + down) * 32)
    assert w["lm_head"] == matrix_bytes("q6_k", 128256, 4096)


def test_cpu_plan_counts_kiln_runtime_copies_and_fp16_kv() -> None:
    plan = plan_memory(source("smollm2-135m"), PlanRequest(weights="q4_1", context=1024))
    assert "kiln runtime copies" in plan.whole.weights  # dense embedding + dense copies under auto
    assert plan.whole.kv_per_token_bytes == 2 * 30 * 3 * 64 * 2  # fp16 under fp32 activations
    lean = plan_memory(source("smollm2-135m"), PlanRequest(weights="q4_1", context=1024, quantized_weights="native"))
    assert lean.whole.weights["kiln runtime copies"] == 49152 * 576 * 4  # only the dense embedding table


def test_draft_self_int4_adds_a_copy_and_its_cache() -> None:
    base = plan_memory(source("llama-3-8b"), PlanRequest(context=2048, **GPU_BF16))
    spec = plan_memory(source("llama-3-8b"), PlanRequest(context=2048, draft="self:int4", **GPU_BF16))
    assert spec.whole.draft_bytes > base.whole.kv_cache_bytes
    assert spec.whole.total_bytes == base.whole.total_bytes + spec.whole.draft_bytes
    with pytest.raises(ValueError, match="--draft"):
        plan_memory(source("llama-3-8b"), PlanRequest(draft="bogus"))
