"""What one forward pass needs to know to read and write the paged KV cache.

A step's batch is flat: the tokens of all scheduled sequences laid end to end. Sequence
i owns tokens [query_start_loc[i], query_start_loc[i+1]) of the batch; its context after
this step is seq_lens[i] tokens (cached prefix + the new ones), stored in the blocks
listed in block_tables[i]. Decode sequences (one new token) come first so the decode
kernel sees a contiguous range; prefill chunks (several new tokens) follow.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: flat KV slot (block_id * block_size + offset) per token
    query_start_loc: list[int]  # [B+1] prefix sums of new-token counts
    seq_lens: list[int]  # [B] context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32, padded with 0
    num_decodes: int  # sequences [0, num_decodes) have exactly one new token
    seq_lens_tensor: torch.Tensor  # [B] int32, the same as seq_lens
    block_size: int
    # Hybrid KV cache (kiln.core.kv_cache_groups): one metadata per layer group (its own block tables
    # and slots) and each layer's group; None for the plain cache, where this metadata serves all layers.
    groups: list[AttentionMetadata] | None = None
    layer_group: tuple[int, ...] | None = None
    # Speculative verification: every sequence's new tokens are its next token plus draft tokens (no
    # prompt chunk), so each row may attend as a decode row at its own position (the fused decode step
    # runs such a batch row by row; kiln.kernels.decode_step).
    verification: bool = False

    def for_layer(self, layer: int) -> AttentionMetadata:
        """The metadata layer `layer` reads and writes its KV through."""
        if self.groups is None or self.layer_group is None:
            return self
        return self.groups[self.layer_group[layer]]

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    @property
    def num_decode_tokens(self) -> int:
        return self.num_decodes


def build_group_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    group_block_ids: list[list[list[int]]],
    block_size: int,
    layer_group: tuple[int, ...],
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Metadata for a hybrid cache: `group_block_ids[i][g]` is sequence i's table in group g."""
    num_groups = len(group_block_ids[0]) if group_block_ids else len(set(layer_group))
    groups = [build_attention_metadata(query_lens, seq_lens, [tables[g] for tables in group_block_ids], block_size,
                                       device) for g in range(num_groups)]
    first = groups[0]
    return AttentionMetadata(first.slot_mapping, first.query_start_loc, first.seq_lens, first.block_tables,
                             first.num_decodes, first.seq_lens_tensor, block_size, groups, layer_group)


def build_attention_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_ids: list[list[int]],
    block_size: int,
    device: torch.device | str = "cpu",
) -> AttentionMetadata:
    """Build metadata for sequences already ordered decodes-first.

    Invariant: every sequence's block list covers seq_lens[i] tokens.
    """
    num_decodes = 0
    for q in query_lens:
        if q != 1:
            break
        num_decodes += 1
    slots: list[int] = []
    starts = [0]
    for q_len, s_len, blocks in zip(query_lens, seq_lens, block_ids):
        if len(blocks) * block_size < s_len:
            raise ValueError(f"{len(blocks)} blocks cannot hold {s_len} tokens")
        for pos in range(s_len - q_len, s_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + q_len)
    max_blocks = max((len(b) for b in block_ids), default=0)
    table = torch.zeros((len(block_ids), max(max_blocks, 1)), dtype=torch.int32)
    for i, blocks in enumerate(block_ids):
        if blocks:
            table[i, : len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=starts,
        seq_lens=list(seq_lens),
        block_tables=table.to(device),
        num_decodes=num_decodes,
        seq_lens_tensor=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_size=block_size,
    )
