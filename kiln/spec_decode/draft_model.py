"""Draft-model proposer: a smaller or quantized model guesses the next k tokens greedily.

The draft keeps its own paged KV cache (same block size as the target, its own tensors, block ids
from its own BlockPool: the target's bookkeeping, without prefix caching) and, per request, the
token ids whose K/V it holds. Each step it compares those with the request's
current tokens, keeps the common prefix (after a rejection the tail it drafted is simply
overwritten), runs one forward over the tokens it has not seen — all speculating requests in one
flat batch — and then k-1 single-token decode forwards. Drafts are greedy, i.e. deterministic
given the context, so the verifier's acceptance rule (accept x with probability p(x)) keeps the
output distribution exactly the target's.

`self:int4` / `self:int8` build the draft as a round-to-nearest quantized copy of the target
(INT4 group 32 / INT8 per channel, run by the native block kernel) that shares the target's
embedding table and tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from kiln.core.block_pool import BlockPool, KVCacheBlock
from kiln.core.kv_cache_utils import cdiv
from kiln.spec_decode.proposer import ProposalRequests
from kiln.worker.forward import allocate_model_kv_caches, forward_batch, model_kv_dtype


@dataclass
class _DraftSeq:
    blocks: list[KVCacheBlock] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # token ids whose K/V sit in the blocks, in order

    @property
    def block_ids(self) -> list[int]:
        return [b.block_id for b in self.blocks]


class DraftModelProposer:
    """A `Proposer` (kiln.spec_decode.proposer) backed by a draft model.

    A request the draft has no free blocks for is left out of the answer (it does not speculate
    this step). Block ids come from `block_pool` with the target's invariants (kiln.core.block_pool):
    every block is free or held by exactly one sequence (ref_cnt 1, in its `blocks`), and a
    sequence's blocks go back tail-first when it is freed.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        # Its own cache, in exactly the draft's dtype (not the target's cache dtype).
        self.kv_caches = allocate_model_kv_caches(model, num_blocks, block_size, model_kv_dtype(model))
        self.block_pool = BlockPool(num_blocks, enable_caching=False)  # drafts are never shared
        self.seqs: dict[str, _DraftSeq] = {}

    # ---- memory -----------------------------------------------------------------------------
    def _reserve(self, seq: _DraftSeq, num_tokens: int) -> bool:
        """Blocks for `num_tokens` tokens of `seq`; False (taking none) when too few are free."""
        need = cdiv(num_tokens, self.block_size) - len(seq.blocks)
        if need > self.block_pool.get_num_free_blocks():
            return False
        if need > 0:
            seq.blocks.extend(self.block_pool.get_new_blocks(need))
        return True

    def free(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.block_pool.free_blocks(reversed(seq.blocks))

    # ---- proposing --------------------------------------------------------------------------
    def _greedy_next(self, new_tokens: list[list[int]], starts: list[int], blocks: list[list[int]]) -> list[int]:
        """Greedy next token after each sequence's last new token (decodes first)."""
        hidden = forward_batch(self.model, self.kv_caches, new_tokens, starts, blocks, self.block_size, last_only=True)
        return self.model.compute_logits(hidden).argmax(-1).tolist()

    @torch.inference_mode()
    def propose(self, requests: ProposalRequests) -> dict[str, list[int]]:
        active: list[tuple[str, _DraftSeq, list[int], int]] = []
        for rid, (tokens, k) in requests.items():
            if k <= 0 or not tokens:
                continue
            seq = self.seqs.setdefault(rid, _DraftSeq())
            keep = 0
            limit = min(len(seq.cached), len(tokens) - 1)  # the last token is always run: its logits give draft 1
            while keep < limit and seq.cached[keep] == tokens[keep]:
                keep += 1
            seq.cached = seq.cached[:keep]
            if not self._reserve(seq, len(tokens) + k - 1):
                continue  # no draft memory left: this request simply does not speculate this step
            active.append((rid, seq, tokens, k))
        drafts: dict[str, list[int]] = {rid: [] for rid, *_ in active}
        if not active:
            return drafts
        # Decodes (one new token) must come first in a flat batch.
        active.sort(key=lambda a: len(a[2]) - len(a[1].cached) != 1)
        new_tokens, starts, blocks = [], [], []
        for _, seq, tokens, _ in active:
            new_tokens.append(tokens[len(seq.cached):])
            starts.append(len(seq.cached))
            blocks.append(seq.block_ids)
            seq.cached = list(tokens)
        nxt = self._greedy_next(new_tokens, starts, blocks)
        for (rid, _, _, _), t in zip(active, nxt):
            drafts[rid].append(t)
        for step in range(1, max(a[3] for a in active)):
            running = [a for a in active if a[3] > step]
            nxt = self._greedy_next([[drafts[rid][-1]] for rid, *_ in running],
                                    [len(seq.cached) for _, seq, _, _ in running],
                                    [seq.block_ids for _, seq, _, _ in running])
            for (rid, seq, _, _), t in zip(running, nxt):
                seq.cached.append(drafts[rid][-1])
                drafts[rid].append(t)
        return drafts


def check_same_tokenizer(target: "object", draft: "object", draft_name: str) -> None:
    """ValueError unless both tokenizers map every token string to the same id."""
    if target.backend.get_vocab(with_added_tokens=True) != draft.backend.get_vocab(with_added_tokens=True):
        raise ValueError(f"draft model {draft_name!r} does not share the target's tokenizer (vocabularies differ); "
                         "pick a draft from the same model family, or use --speculative-model self:int4")


def build_draft_model(spec: str, target: "object") -> torch.nn.Module:
    """The draft for `spec` ('self:int4', 'self:int8', or a model name/path) for the LoadedModel `target`."""
    from kiln.hub import resolve_model
    from kiln.loader.model_loader import load_model

    if spec in ("self:int4", "self:int8"):
        from kiln.quantization.calibration import target_linears
        from kiln.quantization.quantize import QuantizeOptions, install, quantize_layer

        bits = 4 if spec == "self:int4" else 8
        copy = load_model(target.source, dtype=target.model.dtype, device=target.model.device, quantized_weights="dequantize")
        opts = QuantizeOptions(method="rtn", bits=bits, group_size=32)
        layers = {name: quantize_layer(m.weight.data.float(), None, opts, bits) for name, m in target_linears(copy.model).items()}
        install(copy.model, layers)
        copy.model.finalize_quantized_layers()
        if isinstance(target.model.embed_tokens, torch.nn.Embedding):
            copy.model.embed_tokens = target.model.embed_tokens  # shared: same table, no second copy
        # else the target serves lookups from its head's blocks (--max-weight-memory): the draft, whose tied
        # head reads its own dense table, keeps that table
        return copy.model
    if spec.startswith("self:"):
        raise ValueError(f"unknown self-draft {spec!r}; use self:int4 or self:int8")
    path = resolve_model(spec)
    draft = load_model(Path(path), dtype=target.model.dtype, device=target.model.device)
    check_same_tokenizer(target.tokenizer, draft.tokenizer, spec)
    return draft.model
