"""Which GGML type each tensor gets in a K-quant file (`kiln convert --type q4_k_m|q5_k_m|q6_k`).

The mix is llama.cpp's `llama-quantize` recipe (src/llama-quant.cpp, `llama_tensor_get_type`) for the
Llama-architecture tensors kiln writes, so a kiln-made Q4_K_M has the same tensor types as llama.cpp's
from the same input:

- base type: Q4_K for q4_k_m, Q5_K for q5_k_m, Q6_K for q6_k; 1-D tensors (norms, biases) stay F32;
- the output head (`output.weight`, or `token_embd.weight` when the embeddings are tied, because it is
  then the output head too) → Q6_K; Q8_0 when its rows are not a whole number of 256-value super-blocks;
- q4_k_m and q5_k_m raise `attn_v` and `ffn_down` to Q6_K on the layers where `more_bits(i, n)` holds:
  the first n/8 layers, the last n/8, and every third layer in between (i − n/8 ≡ 2 mod 3), with C's
  integer division (n = 30: layers 0-2, 5, 8, 11, 14, 17, 20, 23, 26-29);
- every other 2-D weight (attn_q/k/output, ffn_gate/up, an untied token embedding) → the base type;
- fallback for rows (GGUF's ne[0], the input dimension) that are not a multiple of 256, as
  llama-quantize does: Q4_K → Q5_0, Q5_K → Q5_1, Q6_K → Q8_0, and F16 if not even a multiple of 32.
  SmolLM2-135M's hidden size 576 = 2.25 · 256 is such a case: every matrix that reads the hidden state
  (attention, gate/up, the tied head) falls back; only `ffn_down` (input 1536 = 6 · 256) is a K-quant.
- `pure=True` (llama-quantize `--pure`): the base type everywhere (fallbacks still apply).
"""

from __future__ import annotations

import re
from typing import Any

KQUANT_TYPES = ("q4_k_m", "q5_k_m", "q6_k")
QK_K = 256
_LAYER = re.compile(r"^blk\.(\d+)\.")


def more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's `use_more_bits`: the layers q4_k_m / q5_k_m give Q6_K attn_v and ffn_down."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def fallback(ggml: Any, n_cols: int) -> Any:
    """The type a tensor with rows of `n_cols` values is written in when `ggml` does not fit them."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    if n_cols % GGML_QUANT_SIZES[ggml][0] == 0:
        return ggml
    smaller = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0}.get(ggml, ggml)
    return smaller if n_cols % GGML_QUANT_SIZES[smaller][0] == 0 else Q.F16


def kquant_type(name: str, shape: tuple[int, ...], ftype: str, n_layers: int, output_head: bool,
                pure: bool = False) -> Any:
    """GGML type of the GGUF tensor `name` ([rows, cols] in kiln's order) in a `ftype` file (module docstring)."""
    from gguf import GGMLQuantizationType as Q

    if ftype not in KQUANT_TYPES:
        raise ValueError(f"not a K-quant file type: {ftype!r} (have {', '.join(KQUANT_TYPES)})")
    if len(shape) == 1:
        return Q.F32
    base = {"q4_k_m": Q.Q4_K, "q5_k_m": Q.Q5_K, "q6_k": Q.Q6_K}[ftype]
    chosen = base
    if not pure:
        layer = _LAYER.match(name)
        if output_head:
            chosen = Q.Q6_K if shape[-1] % QK_K == 0 else Q.Q8_0
        elif ftype in ("q4_k_m", "q5_k_m") and layer and name.endswith((".attn_v.weight", ".ffn_down.weight")) \
                and more_bits(int(layer.group(1)), n_layers):
            chosen = Q.Q6_K
    return fallback(chosen, shape[-1])
