"""The real Gemma 3 270M Q4_K_M GGUF on kiln's native kernels (Q6_K ffn_down layers on the K-quant
super-block kernel, the rest on the block kernels) against the same file dequantized at load, and
against transformers loading the file: logits of a short and a 700-token prompt (past the 512-token window).

The native path rounds each linear's activations per 32 to int16 (kiln.kernels.quant_matmul) and the
Q4_K→Q4_1 repack rounds scales to fp16 (the resident dense copy that prefill runs is of those repacked
weights). Measured on this file (AMD EPYC, 2026-11-30): max |Δlogit| 0.033 on the short prompt (logits
up to 22) and 0.121 on the 700-token one (logits up to 45), top-1 equal at every position, against both
references (which agree with each other to 5e-4); the bound below leaves ~3x margin. The kernels' own
arithmetic is checked exactly against their twins in tests/test_kquant_kernels.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .test_reference_match import model_prefill_logits

MAX_ABS = 0.4  # on logits of magnitude up to ~45


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    from kiln.hub import pull

    return pull("gemma3-270m")


@pytest.fixture(scope="module")
def prompts(gemma_path: Path) -> list[list[int]]:
    from kiln.data import WIKITEXT2_TEST, data_path
    from kiln.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gemma_path)
    long = tok.encode(data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")[:6000])[:700]
    return [tok.encode("The capital of France is"), long]


def _logits(path: Path, ids_list: list[list[int]], quantized_weights: str) -> tuple[list[torch.Tensor], object]:
    from kiln import LLM

    llm = LLM(str(path), dtype="float32", kv_cache_memory="256MiB", quantized_weights=quantized_weights)
    with torch.inference_mode():
        return [model_prefill_logits(llm.engine.loaded.model, ids) for ids in ids_list], llm


@pytest.mark.real_model
def test_native_kquant_logits_match_dequantized_and_transformers(gemma_path: Path, prompts) -> None:
    from kiln.layers.kquant_linear import KQuantLinearMethod

    native, llm = _logits(gemma_path, prompts, "auto")
    kquant = [m for m in llm.engine.loaded.model.modules() if isinstance(getattr(m, "method", None), KQuantLinearMethod)]
    assert len(kquant) == 9 and {m.method.qtype for m in kquant} == {"Q6_K"}  # the file's nine Q6_K ffn_down
    dequantized, _ = _logits(gemma_path, prompts, "dequantize")
    transformers = pytest.importorskip("transformers", reason="reference tests need the test extras")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gemma_path.parent), gguf_file=gemma_path.name,
                                                           dtype=torch.float32).eval()
    for ids, ours, ref_kiln in zip(prompts, native, dequantized):
        with torch.inference_mode():
            ref_hf = hf(torch.tensor([ids])).logits[0].float()
        for ref in (ref_kiln, ref_hf):
            assert (ours - ref).abs().max().item() < MAX_ABS, len(ids)
            assert (ours.argmax(-1) == ref.argmax(-1)).float().mean().item() > 0.97, len(ids)
    # decode (one row per step: the Q6_K block kernel): 48 greedy tokens, each transformers' argmax
    # given the tokens before it, but for near-ties the int16 activation rounding may flip
    from kiln import SamplingParams

    ids = prompts[0]
    got = llm.generate([{"prompt_token_ids": ids}], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    got = got[0].outputs[0].token_ids
    with torch.inference_mode():
        ref_next = hf(torch.tensor([ids + got])).logits[0, len(ids) - 1:-1].argmax(-1).tolist()
    assert sum(a == b for a, b in zip(got, ref_next)) >= 0.9 * len(got)
