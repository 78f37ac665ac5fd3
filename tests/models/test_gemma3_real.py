"""kiln on the real Gemma 3 270M GGUF (Q4_K_M, dequantized to fp32) against transformers loading the same file.

One prompt is longer than the 512-token window, so the local layers' window hides part of its context.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kiln import SamplingParams

from .test_reference_match import model_prefill_logits

CHATS = [
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three fruits that are red.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from kiln.hub import pull

    return pull("gemma3-270m")


@pytest.fixture(scope="module")
def kiln_gemma(gemma_path: Path):
    from kiln import LLM

    return LLM(str(gemma_path), dtype="float32", kv_cache_memory="256MiB", quantized_weights="dequantize")


@pytest.fixture(scope="module")
def hf_gemma(gemma_path: Path):
    transformers = pytest.importorskip("transformers", reason="reference tests need the test extras")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                              dtype=torch.float32)
    return model.eval()


def _long_prompt_ids(llm) -> list[int]:
    from kiln.data import WIKITEXT2_TEST, data_path

    return llm.tokenizer.encode(data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")[:6000])[:700]


@pytest.mark.real_model
def test_logits_match_transformers(kiln_gemma, hf_gemma) -> None:
    tok = kiln_gemma.tokenizer
    for ids in (tok.encode("The capital of France is"), _long_prompt_ids(kiln_gemma)):
        with torch.inference_mode():
            ref = hf_gemma(torch.tensor([ids])).logits[0].float()
        ours = model_prefill_logits(kiln_gemma.engine.loaded.model, ids)
        assert (ours - ref).abs().max().item() < 1e-3, len(ids)


@pytest.mark.real_model
def test_greedy_chat_continuations_match_transformers(kiln_gemma, hf_gemma) -> None:
    """64 greedy tokens per chat prompt, identical to transformers' greedy choice at every step."""
    tok = kiln_gemma.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": c}]), add_special_tokens=False)
               for c in CHATS]
    assert all(p[0] == tok.bos_token_id and p.count(tok.bos_token_id) == 1 for p in prompts)
    outs = kiln_gemma.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0.0, max_tokens=64))
    eos_ids = set(kiln_gemma.tokenizer.eos_token_ids)
    for ids, out in zip(prompts, outs):
        got = out.outputs[0].token_ids
        # Greedy decoding is identical iff each of kiln's tokens is transformers' argmax given the tokens
        # before it and kiln stops only at an end token or at 64: one teacher-forced forward checks that.
        with torch.inference_mode():
            ref_next = hf_gemma(torch.tensor([ids + got])).logits[0, len(ids) - 1:].argmax(-1).tolist()
        assert got == ref_next[:len(got)]
        assert len(got) == 64 or got[-1] in eos_ids
