"""Draft-model proposer: a smaller or quantized model guesses the next k tokens greedily.

The draft keeps its own paged KV cache (same block size as the target, its own blocks) and, per
request, the token ids whose K/V it holds. Each step it compares those with the request's
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

from kiln.kernels.attention_metadata import build_attention_metadata
from kiln.spec_decode.proposer import ProposalRequests


@dataclass
class _DraftSeq:
    block_ids: list[int] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)  # token ids whose K/V sit in the blocks, in order


class DraftModelProposer:
    """A `Proposer` (kiln.spec_decode.proposer) backed by a draft model.

    A request the draft has no free blocks for is left out of the answer (it does not speculate
    this step). Invariant: every block id is either in `free_blocks` or in exactly one sequence's `block_ids`.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int, block_size: int) -> None:
        self.model = model
        self.block_size = block_size
        cfg = model.config
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=model.dtype, device=model.device),
                           torch.zeros(shape, dtype=model.dtype, device=model.device))
                          for _ in range(cfg.num_hidden_layers)]
        self.num_blocks = num_blocks
        self.free_blocks: list[int] = list(range(num_blocks - 1, -1, -1))
        self.seqs: dict[str, _DraftSeq] = {}

    # ---- memory -----------------------------------------------------------------------------
    def _reserve(self, seq: _DraftSeq, num_tokens: int) -> bool:
        need = -(-num_tokens // self.block_size) - len(seq.block_ids)
        if need > len(self.free_blocks):
            return False
        for _ in range(max(need, 0)):
            seq.block_ids.append(self.free_blocks.pop())
        return True

    def free(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None:
            self.free_blocks.extend(reversed(seq.block_ids))

    # ---- proposing --------------------------------------------------------------------------
    def _forward(self, ids: list[int], positions: list[int], query_lens: list[int], seq_lens: list[int],
                 blocks: list[list[int]]) -> torch.Tensor:
        """Greedy next token after each sequence's last new token."""
        meta = build_attention_metadata(query_lens, seq_lens, blocks, self.block_size, self.model.device)
        hidden = self.model(torch.tensor(ids, device=self.model.device), torch.tensor(positions, device=self.model.device),
                            meta, self.kv_caches)
        last = torch.tensor(meta.query_start_loc[1:], device=hidden.device) - 1
        return self.model.compute_logits(hidden[last]).argmax(-1).tolist()

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
        ids, pos, qlens, slens, blocks = [], [], [], [], []
        for _, seq, tokens, _ in active:
            new = tokens[len(seq.cached):]
            ids.extend(new)
            pos.extend(range(len(seq.cached), len(tokens)))
            qlens.append(len(new))
            slens.append(len(tokens))
            blocks.append(seq.block_ids)
            seq.cached = list(tokens)
        nxt = self._forward(ids, pos, qlens, slens, blocks)
        for (rid, _, _, _), t in zip(active, nxt):
            drafts[rid].append(t)
        for step in range(1, max(a[3] for a in active)):
            running = [a for a in active if a[3] > step]
            ids = [drafts[rid][-1] for rid, *_ in running]
            pos = [len(seq.cached) for _, seq, _, _ in running]
            nxt = self._forward(ids, pos, [1] * len(running), [p + 1 for p in pos], [seq.block_ids for _, seq, _, _ in running])
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
        copy.model.embed_tokens = target.model.embed_tokens  # shared: same table, no second copy
        return copy.model
    if spec.startswith("self:"):
        raise ValueError(f"unknown self-draft {spec!r}; use self:int4 or self:int8")
    path = resolve_model(spec)
    draft = load_model(Path(path), dtype=target.model.dtype, device=target.model.device)
    check_same_tokenizer(target.tokenizer, draft.tokenizer, spec)
    return draft.model
