"""Weight storage formats and what one matrix costs in each.

Block formats follow their on-disk layouts (GGUF: bytes per block of 32 or 256 values; kiln's INT4/INT8/
FP8 folders: one byte or nibble per weight plus fp16 scales per group or row). Invariant: `matrix_bytes`
is exact for the GGUF block types and for dense types, and within a scale per row/group for kiln's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# GGUF block types: (values per block, bytes per block), as ggml lays them out.
GGUF_BLOCKS: dict[str, tuple[int, int]] = {
    "q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
    "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144), "q5_k": (256, 176), "q6_k": (256, 210),
}
DENSE_BYTES = {"fp32": 4, "float32": 4, "f32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "f16": 2}


@dataclass(frozen=True)
class WeightFormat:
    """How a model's tensors are stored under one `--weights` choice.

    `matrix`: the linear layers' type; `attn_v_down`: the type of attn_v / ffn_down where a mixed
    recipe promotes them (Q4_K_M: Q6_K in half the layers, `promoted_share`); `embedding` / `head`:
    the token embedding and (untied) LM head. kiln's INT4/INT8/FP8 folders keep embeddings in fp16."""

    name: str
    matrix: str
    embedding: str
    head: str
    attn_v_down: str | None = None
    promoted_share: float = 0.0
    group_size: int = 128  # kiln int4 groups


FORMATS: dict[str, WeightFormat] = {
    "fp32": WeightFormat("fp32", "fp32", "fp32", "fp32"),
    "fp16": WeightFormat("fp16", "fp16", "fp16", "fp16"),
    "bf16": WeightFormat("bf16", "bf16", "bf16", "bf16"),
    "int8": WeightFormat("int8", "int8", "fp16", "int8"),
    "fp8": WeightFormat("fp8", "fp8", "fp16", "fp8"),
    "int4": WeightFormat("int4", "int4", "fp16", "int4"),
    # GGUF recipes, as llama.cpp's quantizer applies them (the LM head / tied embedding one step up).
    "q8_0": WeightFormat("q8_0", "q8_0", "q8_0", "q8_0"),
    "q4_0": WeightFormat("q4_0", "q4_0", "q4_0", "q8_0"),
    "q4_1": WeightFormat("q4_1", "q4_1", "q4_1", "q8_0"),
    "q5_0": WeightFormat("q5_0", "q5_0", "q5_0", "q8_0"),
    "q4_k_m": WeightFormat("q4_k_m", "q4_k", "q4_k", "q6_k", attn_v_down="q6_k", promoted_share=0.5),
    "q5_k_m": WeightFormat("q5_k_m", "q5_k", "q5_k", "q6_k", attn_v_down="q6_k", promoted_share=0.5),
    "q6_k": WeightFormat("q6_k", "q6_k", "q6_k", "q6_k"),
}


def matrix_bytes(type_name: str, rows: int, cols: int, group_size: int = 128) -> int:
    """Bytes of a rows x cols matrix (cols = the input dimension, along which blocks run) in `type_name`."""
    t = type_name.lower()
    if t in DENSE_BYTES:
        return rows * cols * DENSE_BYTES[t]
    if t in GGUF_BLOCKS:
        per_block, block_bytes = GGUF_BLOCKS[t]
        return rows * math.ceil(cols / per_block) * block_bytes
    if t in ("int8", "fp8"):
        return rows * cols + rows * 2  # one byte a weight + an fp16 scale per output channel
    if t == "int4":
        return rows * math.ceil(cols / 2) + rows * math.ceil(cols / group_size) * 4  # nibbles + fp16 scale and zero per group
    raise ValueError(f"unknown weight type {type_name!r}; known: {', '.join(sorted({*DENSE_BYTES, *GGUF_BLOCKS, 'int8', 'fp8', 'int4'}))}")


def bits_per_weight(type_name: str) -> float:
    """Mean bits per weight of a large matrix in `type_name` (for tables)."""
    return 8 * matrix_bytes(type_name, 4096, 4096) / (4096 * 4096)


def weight_format(name: str) -> WeightFormat:
    key = name.lower().replace("-", "_")
    key = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp8_e4m3": "fp8"}.get(key, key)
    if key not in FORMATS:
        raise ValueError(f"--weights must be one of {', '.join(FORMATS)} (or 'file' for a GGUF's own types); got {name!r}")
    return FORMATS[key]
