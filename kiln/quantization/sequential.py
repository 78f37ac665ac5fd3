"""Sequential ("true sequential") calibration: each Linear calibrated on the inputs that the
already-quantized layers before it produce, as the GPTQ paper and every maintained implementation do.

The decoder blocks run one at a time over every calibration window. Inside a block the Linears are
taken in the order the forward calls them (Llama: qkv_proj, o_proj, gate_up_proj, down_proj; the
fused modules are AutoGPTQ's "true sequential" groups [q,k,v], [o], [gate,up], [down]): the block
runs with statistics hooks on the next Linear only, stopping right after that Linear has seen its
input, then that Linear is quantized and computes with its quantized weight from then on. Once the
whole block is quantized it runs once more to produce the next block's inputs.

Invariants: the windows' hidden states between blocks are the quantized model's; each Linear's
statistics are gathered after every Linear before it (in call order) is quantized; on return every
Linear has its original full-precision weight back (the caller installs the quantized layers), so a
sensitivity scan can still swap one layer at a time.

The block interface assumed is the Llama-family one (kiln.models.llama): `model.embed_tokens`,
`model.layers[i](positions, hidden, residual, kv_cache, meta) -> (hidden, residual)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kiln.core.kv_cache_utils import cdiv
from kiln.kernels.attention_metadata import AttentionMetadata, build_attention_metadata
from kiln.layers.linear import Linear
from kiln.quantization.calibration import AWQ_SAMPLE_ROWS, LayerStats, _progress, accumulate
from kiln.worker.forward import allocate_model_kv_caches, model_kv_dtype

BLOCK_SIZE = 16

# (layer name "layers.N.<module>", its fp32 weight, its statistics) → the weight it computes with once quantized
QuantizeFn = Callable[[str, torch.Tensor, LayerStats], torch.Tensor]


class _StopBlock(Exception):
    """Raised by a hook once the Linear being calibrated has seen its input: the rest of the block is not needed."""


@dataclass
class _WindowState:
    """One calibration window between two blocks."""

    positions: torch.Tensor
    meta: AttentionMetadata
    hidden: torch.Tensor
    residual: torch.Tensor | None

    def run(self, block: nn.Module, kv_cache) -> tuple[torch.Tensor, torch.Tensor]:
        """The block over this window, on copies: the fused add + norm ops update their inputs in
        place, and the same block inputs are run once per Linear of the block."""
        residual = None if self.residual is None else self.residual.clone()
        return block(self.positions, self.hidden.clone(), residual, kv_cache, self.meta)


def _initial_states(model: nn.Module, windows: list[list[int]]) -> list[_WindowState]:
    states = []
    for ids in windows:
        n = len(ids)
        meta = build_attention_metadata([n], [n], [list(range(cdiv(n, BLOCK_SIZE)))], BLOCK_SIZE, model.device)
        hidden = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=model.device))
        states.append(_WindowState(torch.arange(n, device=model.device), meta, hidden, None))
    return states


def _call_order(block: nn.Module, state: _WindowState, kv_cache) -> list[tuple[str, Linear]]:
    """The block's Linears in the order its forward calls them (found by running it once)."""
    order: list[tuple[str, Linear]] = []
    handles = [m.register_forward_pre_hook(lambda mod, _a, n=n: order.append((n, mod)))
               for n, m in block.named_modules() if isinstance(m, Linear)]
    try:
        state.run(block, kv_cache)
    finally:
        for h in handles:
            h.remove()
    seen: set[str] = set()
    return [(n, m) for n, m in order if not (n in seen or seen.add(n))]


@torch.inference_mode()
def sequential_quantize(
    model: nn.Module, windows: list[list[int]], quantize: QuantizeFn, hessian: bool = False, absmean: bool = False,
    progress: bool = True, first_token_weight: float = 1.0,
) -> dict[str, LayerStats]:
    """Quantize every decoder Linear in forward order through `quantize`, each on sequential inputs.

    Returns the statistics each Linear was quantized with (keyed "layers.N.<module>", as
    calibration.target_linears names them), for re-quantizing a layer at other bits later.
    """
    max_len = max(len(w) for w in windows)
    kv_cache = allocate_model_kv_caches(model, cdiv(max_len, BLOCK_SIZE), BLOCK_SIZE, model_kv_dtype(model))[0]
    per_window = max(AWQ_SAMPLE_ROWS // max(len(windows), 1), 1)
    generator = torch.Generator().manual_seed(0)
    states = _initial_states(model, windows)
    all_stats: dict[str, LayerStats] = {}
    originals: dict[str, tuple[Linear, torch.Tensor]] = {}
    try:
        for i in _progress(list(range(len(model.layers))), "sequential", progress, "block"):
            block = model.layers[i]
            for leaf, linear in _call_order(block, states[0], kv_cache):
                name = f"layers.{i}.{leaf}"
                st = LayerStats()

                def hook(_m: nn.Module, args: tuple, st: LayerStats = st) -> None:
                    accumulate(st, args[0], hessian, absmean, False, per_window, generator, first_token_weight)
                    raise _StopBlock

                handle = linear.register_forward_pre_hook(hook)
                try:
                    for s in states:
                        try:
                            s.run(block, kv_cache)
                        except _StopBlock:
                            pass
                finally:
                    handle.remove()
                original = linear.weight.data
                originals[name] = (linear, original)
                linear.weight.data = quantize(name, original.float(), st).to(original.dtype)
                all_stats[name] = st
            for s in states:
                s.hidden, s.residual = s.run(block, kv_cache)
    finally:
        for linear, original in originals.values():
            linear.weight.data = original
    return all_stats
