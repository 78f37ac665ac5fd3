"""Quality of a configuration against the unoptimized one: next-token KL and top-1 agreement on a fixed text.

Teacher-forced through the engine's own model and KV cache storage: the first `prefix` tokens are
prefilled into a paged cache of the configuration's KV dtype, then every later token is fed as a decode
step that reads all earlier K/V from that cache, so a quantized KV cache costs what it costs in serving.
Invariant: both configurations see exactly the same token ids at the same positions.
"""

from __future__ import annotations

from typing import Any

import torch

FIXED_TOKENS = 192
PREFIX = 128


def fixed_text_ids(tokenizer: Any) -> list[int]:
    """The first FIXED_TOKENS tokens of WikiText-2 test (shipped with kiln), after its header lines."""
    from kiln.data import WIKITEXT2_TEST, data_path

    text = data_path(WIKITEXT2_TEST).read_text(encoding="utf-8")[200:4000]
    return tokenizer.encode(text, add_special_tokens=True)[:FIXED_TOKENS]


@torch.inference_mode()
def teacher_forced_logprobs(model: Any, kv_cache_dtype: str, ids: list[int], prefix: int = PREFIX) -> torch.Tensor:
    """fp32 log-probabilities [len(ids) - prefix, vocab] of the tokens after `prefix`, each from a decode step."""
    from kiln.worker.forward import allocate_model_kv_caches, forward_batch

    block = 16
    blocks = list(range((len(ids) + block - 1) // block))
    caches = allocate_model_kv_caches(model, len(blocks), block, kv_cache_dtype)
    hidden = forward_batch(model, caches, [ids[:prefix]], [0], [blocks], block, last_only=True)
    rows = [model.compute_logits(hidden)]
    for pos in range(prefix, len(ids) - 1):
        hidden = forward_batch(model, caches, [[ids[pos]]], [pos], [blocks], block, last_only=True)
        rows.append(model.compute_logits(hidden))
    return torch.log_softmax(torch.cat(rows).float(), dim=-1)


def compare(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(mean KL(reference || other) in nats, top-1 agreement) over the same positions."""
    kl = (reference.exp() * (reference - other)).sum(-1)
    top1 = (reference.argmax(-1) == other.argmax(-1)).float().mean()
    return float(kl.mean().clamp_min(0.0)), float(top1)
