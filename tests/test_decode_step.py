"""The fused native decode step (kiln.kernels.decode_step) against the plain path it replaces.

The plan must compute exactly what the model's op-by-op forward computes, so the comparison is
bit for bit: tiny GGUF models with dense, Q4_0/Q4_1 and Q8_0 block layers, float32 and bfloat16,
full-precision and quantized KV caches, one to six sequences (the block kernel's row limit and the
dense fallback above it), then whole generations through the engine with the step on and off.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.kernels import decode_step
from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.kernels.kv_quant import allocate_kv_caches
from kiln.kernels.native import load_native
from kiln.models.decode_plan import build_decode_plan

pytestmark = pytest.mark.skipif(not load_native(), reason="the fused decode step is part of the native kernel library")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _load(path: Path, dtype: str, kv_cache_dtype: str = "auto"):
    from kiln import LLM

    return LLM(str(path), dtype=dtype, kv_cache_memory=1 << 20, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64)


def _decode_steps(model, fused: bool, kv_cache_dtype: str, prompt_lens: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill `prompt_lens` random prompts (plain path), then `steps` batched decode steps; hidden states per step."""
    cfg = model.config
    block_size = 4
    max_len = max(prompt_lens) + steps
    per_seq = (max_len + block_size - 1) // block_size
    caches = allocate_kv_caches(cfg.num_hidden_layers, (per_seq * len(prompt_lens), block_size,
                                                         cfg.num_key_value_heads, cfg.head_dim),
                                kv_cache_dtype, model.dtype, model.device)
    blocks = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompt_lens))]
    gen = torch.Generator().manual_seed(0)
    tokens = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=gen) for n in prompt_lens]
    model.fused_decode_step = fused
    out = []
    with torch.inference_mode():
        for i, n in enumerate(prompt_lens):
            meta = build_attention_metadata([n], [n], [blocks[i]], block_size)
            model(tokens[i][:n], torch.arange(n), meta, caches)
        for s in range(steps):
            lens = [n + s + 1 for n in prompt_lens]
            meta = build_attention_metadata([1] * len(lens), lens, blocks, block_size)
            ids = torch.stack([t[n + s] for t, n in zip(tokens, prompt_lens)])
            out.append(model(ids, torch.tensor([n + s for n in prompt_lens]), meta, caches).clone())
    model.fused_decode_step = True
    return out


@pytest.mark.parametrize("variant", ["tied", "untied"])
# auto under float32 is a float16 cache (widened in the kernel); float32 keeps the model dtype
@pytest.mark.parametrize("dtype, kv_cache_dtype", [("float32", "auto"), ("float32", "float32"), ("float32", "int8"),
                                                   ("bfloat16", "auto"), ("bfloat16", "int8")])
@pytest.mark.parametrize("prompt_lens", [[5], [3, 9, 6], [2, 7, 4, 11, 5, 8]])
def test_fused_step_is_bit_identical_to_plain_path(tiny, variant, dtype, kv_cache_dtype, prompt_lens,
                                                    monkeypatch) -> None:
    llm = _load(tiny.gguf[variant], dtype)
    model = llm.engine.loaded.model
    assert model.decode_plan() is not None, model.decode_plan_status
    calls = []
    real_run = decode_step.run_decode_plan
    monkeypatch.setattr(decode_step, "run_decode_plan", lambda *a: calls.append(1) or real_run(*a))
    fused = _decode_steps(model, True, kv_cache_dtype, prompt_lens, steps=3)
    assert len(calls) == 3
    plain = _decode_steps(model, False, kv_cache_dtype, prompt_lens, steps=3)
    assert len(calls) == 3  # the plain run never entered the plan
    for f, p in zip(fused, plain):
        assert f.dtype == p.dtype and torch.equal(f, p)


def test_plan_covers_block_and_dense_layers(tiny) -> None:
    """The untied tiny model mixes Q4_0/Q4_1 (block kernel), Q8_0 and dense (Q5_1 dequantized) layers."""
    model = _load(tiny.gguf["untied"], "float32").engine.loaded.model
    kinds = {type(layer.method).__name__ for layer in model.modules() if hasattr(layer, "method")}
    assert {"GGUFQuantLinearMethod", "DenseLinearMethod"} <= kinds
    assert model.decode_plan() is not None


def test_unsupported_layer_falls_back_with_a_reason(tiny) -> None:
    model = _load(tiny.gguf["tied"], "float32").engine.loaded.model

    class Opaque:
        name = "some other method"

        def apply(self, layer, x):
            return torch.nn.functional.linear(x, layer.weight)

    model.layers[1].mlp.down_proj.method = Opaque()
    plan, why = build_decode_plan(model)
    assert plan is None and "layer 1 down_proj" in why and "some other method" in why


def test_switch_turns_it_off(tiny, monkeypatch) -> None:
    monkeypatch.setenv("KILN_FUSED_STEP", "0")
    model = _load(tiny.gguf["tied"], "float32").engine.loaded.model
    assert model.decode_plan() is None and "KILN_FUSED_STEP=0" in model.decode_plan_status


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_engine_generations_identical_with_and_without(tiny, dtype, monkeypatch) -> None:
    from kiln import SamplingParams
    from loader.tiny_model import one_torch_thread

    prompts = ["the cat sat on the mat", "hello world " * 6, "he sat in the hat", "a b c d e f g"]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = {}
    with one_torch_thread():
        for setting in ("1", "0"):
            monkeypatch.setenv("KILN_FUSED_STEP", setting)
            llm = _load(tiny.gguf["untied"], dtype)
            outputs[setting] = [o.outputs[0].token_ids for o in llm.generate(prompts, greedy)]
            used = llm.engine.loaded.model.decode_plan_status
            assert used.startswith("fused") if setting == "1" else used.startswith("plain")
            assert llm.engine.kv_manager.get_num_free_blocks() == llm.engine.kv_budget.num_blocks
    assert outputs["1"] == outputs["0"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_verification_rows_equal_decode_steps_at_their_positions(tiny, dtype) -> None:
    """A speculative verification through the plan (each sequence's token + 3 drafts) gives each row the
    hidden state a decode step at that position gives, and the plain path's (prefill kernels) result."""
    llm = _load(tiny.gguf["untied"], dtype)
    model = llm.engine.loaded.model
    cfg = model.config
    block_size, prompt_lens, rows = 4, [6, 9], 2
    per_seq = 6
    gen = torch.Generator().manual_seed(3)
    tokens = [torch.randint(0, cfg.vocab_size, (n + rows,), generator=gen) for n in prompt_lens]
    blocks = [list(range(i * per_seq, (i + 1) * per_seq)) for i in range(len(prompt_lens))]

    def fresh_caches():
        caches = allocate_kv_caches(cfg.num_hidden_layers, (per_seq * 2, block_size, cfg.num_key_value_heads,
                                                            cfg.head_dim), "auto", model.dtype, model.device)
        for i, n in enumerate(prompt_lens):
            model.fused_decode_step = False
            model(tokens[i][:n], torch.arange(n), build_attention_metadata([n], [n], [blocks[i]], block_size), caches)
        return caches

    def verify(fused: bool) -> torch.Tensor:
        caches = fresh_caches()
        model.fused_decode_step = fused
        meta = build_attention_metadata([rows] * 2, [n + rows for n in prompt_lens], blocks, block_size)
        meta.verification = True
        ids = torch.cat([t[n:n + rows] for t, n in zip(tokens, prompt_lens)])
        pos = torch.cat([torch.arange(n, n + rows) for n in prompt_lens])
        return model(ids, pos, meta, caches).clone()

    with torch.inference_mode():
        fused, plain = verify(True), verify(False)
        caches = fresh_caches()
        model.fused_decode_step = True
        stepwise = []
        for j in range(rows):  # the same tokens as single decode steps, both sequences per step
            meta = build_attention_metadata([1, 1], [n + j + 1 for n in prompt_lens], blocks, block_size)
            out = model(torch.stack([t[n + j] for t, n in zip(tokens, prompt_lens)]),
                        torch.tensor([n + j for n in prompt_lens]), meta, caches)
            stepwise.append(out.clone())
    model.fused_decode_step = True
    expected = torch.cat([torch.stack([s[i] for s in stepwise]) for i in range(2)])
    # Not bit for bit: 8 rows take the panel kernel (fp32 activations) where 2 rows take the block kernel
    # (int16-quantized activations), as in the plain path; both stay within rounding of each other.
    tol = 2e-4 if dtype == "float32" else 3e-2
    assert torch.allclose(fused.float(), expected.float(), atol=tol, rtol=tol)
    assert torch.allclose(fused.float(), plain.float(), atol=tol, rtol=tol)
