"""Whether an engine's KV cache is plain or hybrid (sliding-window layers in their own block tables).

A model whose layers all attend globally keeps kiln's plain paged cache (one table per request,
a block holds every layer). With sliding-window layers the cache is hybrid
(kiln.core.kv_cache_groups): a block holds `layers_per_block` layers, so the same memory holds
num_layers / layers_per_block times the blocks, and local groups give blocks back as their window
slides. A model class opts in with `supports_kv_groups` (it reads each layer's metadata with
`meta.for_layer`); one that does not, with several window kinds, keeps the plain cache (windows
still masked by the attention, no blocks freed).
"""

from __future__ import annotations

from dataclasses import replace

from kiln.config import SchedulerConfig
from kiln.core.kv_cache_groups import KVCacheGroup, layers_per_block, max_tokens_per_sequence, plan_kv_groups
from kiln.engine.kv_budget import KVBudget


def plan_hybrid_kv(loaded, budget: KVBudget, scheduler: SchedulerConfig
                   ) -> tuple[list[KVCacheGroup] | None, KVBudget, int]:
    """(groups or None for the plain cache, the budget in pool blocks, the longest sequence it holds)."""
    cfg = loaded.config
    groups = plan_kv_groups(cfg.layer_windows, cfg.num_hidden_layers,
                            hybrid=bool(getattr(loaded.model, "supports_kv_groups", False)))
    if len(groups) == 1 and groups[0].window is None:
        return None, budget, budget.num_tokens
    # Same bytes, smaller blocks: one block now holds layers_per_block layers' K/V, not all of them.
    num_blocks = budget.num_blocks * cfg.num_hidden_layers // layers_per_block(groups)
    local = sum(g.window is not None for g in groups)
    label = (f"hybrid: {len(groups) - local} global + {local} sliding-window groups of "
             f"{layers_per_block(groups)} layers per block")
    budget = replace(budget, num_blocks=num_blocks, storage=f"{budget.storage}; {label}" if budget.storage else label)
    longest = max_tokens_per_sequence(groups, num_blocks, budget.block_size, scheduler.max_num_batched_tokens)
    return groups, budget, longest
