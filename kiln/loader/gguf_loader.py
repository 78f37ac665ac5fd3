"""GGUF files through the `gguf` library: metadata → ModelConfig, tensors → HF-named torch tensors.

Every tensor type the library can dequantize is supported (they are expanded to the model
dtype at load). llama.cpp stores the Q and K projections of `llama`-arch models with
rows permuted for its interleaved RoPE; they are permuted back here so the model can use
the Hugging Face "rotate half" layout for every architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import SUPPORTED_ARCHITECTURES, ModelConfig, RopeScaling
from kiln.errors import ModelLoadError
from kiln.layers.gguf_quant import BLOCK_BYTES, NATIVE_TYPES, GGUFQuantizedTensor

GGUF_MAGIC = b"GGUF"

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def open_gguf(path: Path) -> Any:
    """A `gguf.GGUFReader` or a ModelLoadError saying why the file is not a usable GGUF."""
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return GGUFReader(path, "r")
    except Exception as exc:  # the library raises ValueError/IndexError/... on corrupt files
        raise ModelLoadError(path, f"corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_model_config(reader: Any, path: Path) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            path, f"unsupported architecture {arch!r}; kiln supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None, required: bool = True) -> Any:
        value = _field(reader, f"{arch}.{name}", default)
        if value is None and required:
            raise ModelLoadError(path, f"missing metadata key {arch}.{name}")
        return value

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = int(key("attention.key_length", hidden // heads))
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = int(key("vocab_size", len(tokens) if tokens else None))
    names = {t.name for t in reader.tensors}
    scaling = None
    scaling_type = _field(reader, f"{arch}.rope.scaling.type")
    if scaling_type == "linear":
        scaling = RopeScaling("linear", factor=float(key("rope.scaling.factor")))
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    eos_ids = tuple(sorted({int(i) for i in (eos, eot) if i is not None}))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    return ModelConfig(
        architecture=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(key("feed_forward_length")),
        num_hidden_layers=int(key("block_count")),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        max_position_embeddings=int(key("context_length", 4096)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        bos_token_id=int(bos) if bos is not None else None,
        eos_token_ids=eos_ids,
        name=str(_field(reader, "general.name", path.stem)),
    )


def hf_name_for(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; None for tensors kiln ignores."""
    parts = gguf_name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}"
    return None


def unpermute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Invert llama.cpp's conversion permute of Q/K rows (interleaved → rotate-half RoPE)."""
    shape = w.shape
    return w.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def dequantize_tensor(tensor: Any) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    if tensor.tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return np.asarray(tensor.data, dtype=np.float32)
    return dequantize(tensor.data, tensor.tensor_type)


def _raw_blocks(tensor: Any, path: Path) -> GGUFQuantizedTensor:
    """A Q4_0/Q4_1/Q8_0 matrix as its raw blocks (uint8 [rows, bytes per row]), no dequantization."""
    cols = int(tensor.shape[0])  # GGUF lists dims innermost first
    rows = int(np.prod(tensor.shape[1:]))
    data = np.asarray(tensor.data)
    row_bytes = cols // 32 * BLOCK_BYTES[tensor.tensor_type.name]
    if cols % 32 or data.size != rows * row_bytes:
        raise ModelLoadError(path, f"tensor {tensor.name!r} is corrupt or truncated ({data.size} bytes for {rows}x{cols})")
    return GGUFQuantizedTensor(tensor.tensor_type.name, torch.from_numpy(np.array(data, dtype=np.uint8).reshape(rows, row_bytes)), cols)


def iter_gguf_weights(
    reader: Any, cfg: ModelConfig, path: Path, keep_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    """Yield (hf_name, tensor) for every tensor of the model, Q/K un-permuted for llama.

    Tensors are float32, except that with `keep_blocks` a 2-D Q4_0 / Q4_1 / Q8_0 tensor is
    yielded as a `GGUFQuantizedTensor` (its rows un-permuted the same way) for layers that
    run those blocks natively; the weight loaders dequantize it for layers that do not.
    """
    for tensor in reader.tensors:
        name = hf_name_for(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":
                continue  # Llama 3.1 frequency factors: handled via config (see load_gguf)
            raise ModelLoadError(path, f"unexpected tensor {tensor.name!r} for architecture {cfg.architecture}")
        if keep_blocks and tensor.tensor_type.name in NATIVE_TYPES and len(tensor.shape) == 2:
            blocks = _raw_blocks(tensor, path)
            heads = _qk_heads(tensor.name, cfg)
            if heads is not None:
                if blocks.shape != (heads * cfg.head_dim, cfg.hidden_size):
                    raise ModelLoadError(path, f"tensor {tensor.name!r}: shape mismatch: expected "
                                               f"{(heads * cfg.head_dim, cfg.hidden_size)}, got {blocks.shape}")
                blocks.raw = unpermute_qk(blocks.raw, heads).contiguous()
            yield name, blocks
            continue
        try:
            array = dequantize_tensor(tensor)
        except NotImplementedError:
            raise ModelLoadError(
                path, f"tensor {tensor.name!r} has type {tensor.tensor_type.name}, which the gguf library cannot dequantize"
            ) from None
        except ValueError as exc:
            raise ModelLoadError(path, f"tensor {tensor.name!r} is corrupt or truncated ({exc})") from None
        if not array.flags.writeable or not array.flags.c_contiguous:
            array = np.array(array, dtype=np.float32, order="C")  # memory-mapped F32 tensors are read-only
        weight = torch.from_numpy(array)
        heads = _qk_heads(tensor.name, cfg)
        if heads is not None:
            if weight.shape[0] != heads * cfg.head_dim or (weight.dim() == 2 and weight.shape[1] != cfg.hidden_size):
                expected = (heads * cfg.head_dim, cfg.hidden_size) if weight.dim() == 2 else (heads * cfg.head_dim,)
                raise ModelLoadError(
                    path, f"tensor {tensor.name!r}: shape mismatch: expected {expected}, got {tuple(weight.shape)}"
                )
            weight = unpermute_qk(weight, heads)
        yield name, weight


def _qk_heads(gguf_name: str, cfg: ModelConfig) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (llama arch Q/K), else None."""
    if cfg.architecture not in ("llama", "mistral"):
        return None
    if gguf_name.endswith("attn_q.weight") or gguf_name.endswith("attn_q.bias"):
        return cfg.num_attention_heads
    if gguf_name.endswith("attn_k.weight") or gguf_name.endswith("attn_k.bias"):
        return cfg.num_key_value_heads
    return None


def gguf_layer_types(reader: Any) -> dict[str, set[str]]:
    """HF module path (before q/k/v and gate/up fusion) → tensor types of its 2-D weights."""
    types: dict[str, set[str]] = {}
    for tensor in reader.tensors:
        name = hf_name_for(tensor.name)
        if name is not None and name.endswith(".weight") and len(tensor.shape) == 2:
            types.setdefault(name.removesuffix(".weight"), set()).add(tensor.tensor_type.name)
    return types


def rope_freq_factors(reader: Any) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
    return None
