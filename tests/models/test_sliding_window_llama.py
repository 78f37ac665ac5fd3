"""Mistral-style `sliding_window` in a Llama-family checkpoint is honoured (never silently ignored):
a tiny random MistralForCausalLM with a window of 8, loaded from its Hugging Face folder, against
transformers on sequences that run well past the window."""

from __future__ import annotations

import pytest
import torch

from kiln.loader.model_loader import load_model
from kiln.worker.forward import allocate_model_kv_caches, forward_batch

from loader.tiny_model import VOCAB_SIZE, one_torch_thread, write_hf_tokenizer

transformers = pytest.importorskip("transformers", reason="the reference is transformers' Mistral")
TOKENS = [(i * 29 + 7) % 250 + 3 for i in range(36)]


@pytest.fixture(scope="module")
def mistral(tmp_path_factory: pytest.TempPathFactory):
    cfg = transformers.MistralConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                     max_position_embeddings=256, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("tiny-mistral")
    model.save_pretrained(folder)
    write_hf_tokenizer(folder)
    return model, folder


@pytest.mark.parametrize("chunks", [[36], [5, 4]])
def test_mistral_window_matches_transformers(mistral, chunks: list[int]) -> None:
    hf_model, folder = mistral
    with one_torch_thread():
        loaded = load_model(folder, dtype="float32", quantized_weights="dequantize")
        assert loaded.config.layer_windows == (8, 8)
        bs, model = 4, loaded.model
        caches = allocate_model_kv_caches(model, 9, bs, "float32")
        out, start = [], 0
        with torch.inference_mode():
            for size in chunks + [1] * (len(TOKENS) - sum(chunks)):
                out.append(model.compute_logits(forward_batch(model, caches, [TOKENS[start:start + size]], [start],
                                                              [list(range(9))], bs)))
                start += size
            ref = hf_model(torch.tensor([TOKENS])).logits[0]
        assert (torch.cat(out) - ref).abs().max().item() < 1e-4
        model.decode_plan()
        assert "sliding-window" in model.decode_plan_status
