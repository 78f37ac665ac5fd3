"""kiln on the real default GGUF against transformers loading the same file (fp32)."""

from __future__ import annotations

import pytest
import torch

from kiln import SamplingParams
from kiln.kernels.attention_metadata import build_attention_metadata

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "In a distant galaxy, a small robot named",
    "Question: What is 12 times 7?\nAnswer:",
    "<|im_start|>user\nGive me three tips for staying healthy.<|im_end|>\n<|im_start|>assistant\n",
]


def kiln_prefill_logits(llm, token_ids: list[int]) -> torch.Tensor:
    """All-position logits from one prefill forward through kiln's paged attention."""
    return model_prefill_logits(llm.engine.loaded.model, token_ids)


def model_prefill_logits(model, token_ids: list[int]) -> torch.Tensor:
    cfg = model.config
    block_size = 16
    n_blocks = (len(token_ids) + block_size - 1) // block_size
    caches = [
        (torch.zeros(n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim),
         torch.zeros(n_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim))
        for _ in range(cfg.num_hidden_layers)
    ]
    meta = build_attention_metadata([len(token_ids)], [len(token_ids)], [list(range(n_blocks))], block_size)
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), meta, caches)
        return model.compute_logits(hidden)


@pytest.mark.real_model
@pytest.mark.parametrize("prompt", PROMPTS[:3])
def test_logits_match_transformers(llm_fp32, hf_reference, prompt: str) -> None:
    hf_model, hf_tok = hf_reference
    ids = hf_tok(prompt, add_special_tokens=False).input_ids
    with torch.inference_mode():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    ours = kiln_prefill_logits(llm_fp32, ids)
    assert (ours - ref).abs().max().item() < 1e-3


@pytest.mark.real_model
def test_greedy_continuations_match_transformers(llm_fp32, hf_reference) -> None:
    hf_model, hf_tok = hf_reference
    # Both stop at EOS (transformers' min_new_tokens would *suppress* EOS, kiln's ignore_eos only
    # keeps going after it, so forcing length would compare two different decoding rules).
    params = SamplingParams(temperature=0.0, max_tokens=64)
    prompt_ids = [hf_tok(p, add_special_tokens=False).input_ids for p in PROMPTS]
    outs = llm_fp32.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params)
    for ids, out in zip(prompt_ids, outs):
        with torch.inference_mode():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                                    pad_token_id=hf_tok.eos_token_id)[0, len(ids):].tolist()
        eos = hf_model.generation_config.eos_token_id
        eos_ids = set(eos) if isinstance(eos, list) else {eos}
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos_ids), len(ref))
        assert out.outputs[0].token_ids == ref[:cut]
