"""Which part of the model one tensor-parallel rank holds (pure arithmetic, no torch.distributed).

Query heads are split evenly: rank r holds heads [r·H/N, (r+1)·H/N). KV heads are split the same
way when N divides their count; when N is a multiple of it, each KV head is replicated on the N/Hkv
ranks whose query heads read it (rank r holds KV head r·Hkv/N). Either way every query head a rank
holds finds its KV head on the same rank, so attention needs no communication. The MLP's
intermediate rows and the vocabulary split evenly too; a vocabulary N does not divide is padded to
ceil(V/N) rows per rank (the padding rows are zero and cut from the gathered logits).
"""

from __future__ import annotations

from dataclasses import dataclass

from kiln.config import ModelConfig


def valid_tp_sizes(num_heads: int, num_kv_heads: int, intermediate_size: int) -> list[int]:
    """Every N that divides the query heads and the MLP width and divides or is a multiple of the KV heads."""
    return [n for n in range(1, num_heads + 1)
            if num_heads % n == 0 and intermediate_size % n == 0 and (num_kv_heads % n == 0 or n % num_kv_heads == 0)]


def check_tp_size(cfg: ModelConfig, n: int) -> None:
    """ValueError naming the valid sizes when `n` ranks cannot split this model's heads."""
    valid = valid_tp_sizes(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    if n not in valid:
        raise ValueError(
            f"tensor_parallel_size {n} cannot split this model ({cfg.num_attention_heads} query heads, "
            f"{cfg.num_key_value_heads} KV heads, MLP width {cfg.intermediate_size}): it must divide the query "
            f"heads and the MLP width, and divide or be a multiple of the KV heads; valid sizes: "
            f"{', '.join(map(str, valid))}")


@dataclass(frozen=True)
class RankShare:
    """Rank `rank` of `world`: its rows and columns of each sharded tensor of a Llama-family model."""

    rank: int
    world: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def of(cls, cfg: ModelConfig, rank: int, world: int) -> RankShare:
        check_tp_size(cfg, world)
        return cls(rank, world, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                   cfg.intermediate_size, cfg.vocab_size)

    @property
    def heads(self) -> int:
        return self.num_heads // self.world

    @property
    def kv_heads(self) -> int:
        return max(1, self.num_kv_heads // self.world)

    def q_rows(self) -> slice:
        """Rows of q_proj (and columns of o_proj) this rank holds."""
        size = self.heads * self.head_dim
        return slice(self.rank * size, (self.rank + 1) * size)

    def kv_rows(self) -> slice:
        """Rows of k_proj / v_proj: this rank's KV heads (a replicated head when world > KV heads)."""
        first = self.rank * self.num_kv_heads // self.world
        return slice(first * self.head_dim, (first + self.kv_heads) * self.head_dim)

    def mlp_rows(self) -> slice:
        """Rows of gate_proj / up_proj (and columns of down_proj)."""
        size = self.intermediate_size // self.world
        return slice(self.rank * size, (self.rank + 1) * size)

    @property
    def vocab_per_rank(self) -> int:
        return -(-self.vocab_size // self.world)

    def vocab_rows(self) -> slice:
        """Vocabulary rows of the embedding / LM head this rank holds (the last rank's may be short)."""
        start = min(self.rank * self.vocab_per_rank, self.vocab_size)
        return slice(start, min(start + self.vocab_per_rank, self.vocab_size))
