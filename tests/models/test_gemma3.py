"""Gemma 3 on a tiny random model against transformers' Gemma3ForCausalLM with the same weights.

Window 8 over sequences of up to 40 tokens: the local layers' window hides most of the context, so a
kiln path that ignored the window (or its RoPE base, QK-norm, norm offset or embedding scale) would
differ from transformers by far more than the tolerances here. Both loaders (HF folder, GGUF) and
every attention route (one-shot prefill, chunked prefill, decode, the engine's continuous batching)
are checked.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.kernels.attention_reference import paged_attention_reference
from kiln.kernels.kv_quant import allocate_kv_caches
from kiln.kernels.paged_attention import paged_attention, write_kv
from kiln.loader.model_loader import load_model
from kiln.worker.forward import allocate_model_kv_caches, forward_batch

from loader.tiny_model import one_torch_thread

from .tiny_gemma3 import WINDOW, TinyGemma, build

pytest.importorskip("transformers", reason="the Gemma 3 reference is transformers' model")
TOKENS = [(i * 37 + 11) % 250 + 3 for i in range(40)]
BS = 4


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[int, TinyGemma]:
    root = tmp_path_factory.mktemp("tiny-gemma3")
    return {16: build(root, 16), 24: build(root, 24)}


def hf_logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float()


def kiln_chunked_logits(model, ids: list[int], chunks: list[int], kv_cache_dtype: str = "float32") -> torch.Tensor:
    """Logits of every position, fed in chunks of the given sizes (then one token per step)."""
    n_blocks = (len(ids) + BS - 1) // BS
    caches = allocate_model_kv_caches(model, n_blocks, BS, kv_cache_dtype)
    table = list(range(n_blocks))
    out, start = [], 0
    sizes = chunks + [1] * (len(ids) - sum(chunks))
    with torch.inference_mode():
        for size in sizes:
            hidden = forward_batch(model, caches, [ids[start:start + size]], [start], [table], BS)
            out.append(model.compute_logits(hidden))
            start += size
    return torch.cat(out)


@pytest.mark.parametrize("fmt,scalar", [("hf", 16), ("hf", 24), ("gguf", 16)])
def test_prefill_logits_match_transformers(tiny, fmt: str, scalar: int) -> None:
    t = tiny[scalar]
    loaded = load_model(t.folder if fmt == "hf" else t.gguf, dtype="float32", quantized_weights="dequantize")
    assert loaded.config.layer_windows == (WINDOW,) * 5 + (None,)
    ref = hf_logits(t.hf_model, TOKENS)
    ours = kiln_chunked_logits(loaded.model, TOKENS, [len(TOKENS)])
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("chunks", [[5, 7], [3], [20, 9]])
def test_chunked_prefill_and_decode_match_transformers(tiny, chunks: list[int]) -> None:
    """Chunks that straddle the window, then decode steps far past it."""
    t = tiny[16]
    loaded = load_model(t.gguf, dtype="float32", quantized_weights="dequantize")
    ref = hf_logits(t.hf_model, TOKENS)
    ours = kiln_chunked_logits(loaded.model, TOKENS, chunks)
    assert (ours - ref).abs().max().item() < 1e-4


def test_a_window_that_is_ignored_is_caught(tiny) -> None:
    """The test above can fail: the same model with its windows removed differs from transformers."""
    import dataclasses

    t = tiny[16]
    loaded = load_model(t.gguf, dtype="float32", quantized_weights="dequantize")
    for layer in loaded.model.layers:
        layer.self_attn.window = None
    loaded.model.config = dataclasses.replace(loaded.config, layer_windows=(None,) * 6)
    ours = kiln_chunked_logits(loaded.model, TOKENS, [len(TOKENS)])
    assert (ours - hf_logits(t.hf_model, TOKENS)).abs().max().item() > 1e-2


@pytest.mark.parametrize("kv,d", [("float32", 256), ("float16", 256), ("int8", 256), ("float32", 64),
                                  ("float16", 128)])
def test_windowed_paged_attention_matches_reference(kv: str, d: int) -> None:
    """paged_attention(window=W) against its plain-torch twin, decode rows and prefill chunks mixed: the
    native decode kernel's windowed variant (float caches; head_dim 64/128 take its register path, 256 the
    generic loop), row by row for a short run after a prefix, SDPA over the window for the long chunk."""
    torch.manual_seed(0)
    hq, hkv, w = 4, 2, 11
    query_lens, seq_lens = [1, 1, 6, 30], [9, 40, 23, 30]
    blocks = [list(range(i * 12, i * 12 + (s + BS - 1) // BS)) for i, s in enumerate(seq_lens)]
    k_cache, v_cache = allocate_kv_caches(1, (48, BS, hkv, d), kv, torch.float32, "cpu")[0]
    meta = build_attention_metadata(query_lens, seq_lens, blocks, BS)
    # Fill every context slot (earlier tokens and this step's) through the real writer.
    all_slots = torch.tensor([b[p // BS] * BS + p % BS for b, s in zip(blocks, seq_lens) for p in range(s)])
    write_kv(torch.randn(len(all_slots), hkv, d), torch.randn(len(all_slots), hkv, d), k_cache, v_cache, all_slots)
    q = torch.randn(sum(query_lens), hq, d)
    ours = paged_attention(q, k_cache, v_cache, meta, 0.1, window=w)
    ref = paged_attention_reference(q, k_cache, v_cache, meta, 0.1, window=w)
    assert (ours - ref).abs().max().item() < 1e-5
    full = paged_attention_reference(q, k_cache, v_cache, meta, 0.1)
    assert (full - ref).abs().max().item() > 1e-2  # the window hides something here


def test_engine_greedy_matches_transformers_generate(tiny) -> None:
    """Continuous batching (two prompts, chunked prefill, decode far past the window) vs HF generate."""
    from kiln import LLM, SamplingParams

    t = tiny[16]
    llm = LLM(str(t.gguf), dtype="float32", kv_cache_memory="4MiB", quantized_weights="dequantize",
              max_num_batched_tokens=16)
    prompts = [TOKENS[:13], TOKENS[5:30]]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=24))
    for p, out in zip(prompts, outs):
        with torch.inference_mode():
            ref = t.hf_model.generate(torch.tensor([p]), max_new_tokens=24, do_sample=False,
                                      pad_token_id=0)[0, len(p):].tolist()
        cut = next((i + 1 for i, tok in enumerate(ref) if tok == t.hf_model.config.eos_token_id), len(ref))
        assert out.outputs[0].token_ids == ref[:cut]


def test_gemma_chat_template_when_the_file_has_none(tiny) -> None:
    """The expected text is Gemma's published turn format (system prompt folded into the first user turn)."""
    loaded = load_model(tiny[16].gguf, dtype="float32", quantized_weights="dequantize")
    text = loaded.tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                                 {"role": "user", "content": "Hi"},
                                                 {"role": "assistant", "content": "Hello."},
                                                 {"role": "user", "content": "Bye"}])
    bos = loaded.tokenizer.bos_token
    assert text == (f"{bos}<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
