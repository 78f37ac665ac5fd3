"""GGUF files through the `gguf` library: metadata → ModelConfig, tensors → HF-named torch tensors.

Every tensor type the library can dequantize is supported (they are expanded to the model
dtype at load). Tensor names and the metadata → ModelConfig parser come from the architecture's
registry entry (kiln.models.registry). llama.cpp stores the Q and K projections of some
architectures (`llama`, `mistral`: the entries with `gguf_rope_permuted`) with rows permuted for its
interleaved RoPE; they are permuted back here so the model can use the Hugging Face "rotate half"
layout for every architecture.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.config import ModelConfig
from kiln.errors import ModelLoadError
from kiln.kernels.kquant_matmul import KQUANT_BYTES, KQUANT_TYPES, QKK
from kiln.layers.gguf_quant import BLOCK_BYTES, NATIVE_TYPES, GGUFQuantizedTensor
from kiln.layers.gguf_repack import REPACKED, repack, repack_target
from kiln.models.architecture import GGUFHeader, WeightNames
from kiln.models.registry import get_architecture

GGUF_MAGIC = b"GGUF"
# kept in blocks (repacked where needed; K-quant super-blocks as stored) for native layers
RUNNABLE_TYPES = NATIVE_TYPES | frozenset(REPACKED) | KQUANT_TYPES


def open_gguf(path: Path, lean: bool = False) -> Any:
    """A `gguf.GGUFReader` (with `lean`: a `LeanGGUFReader`, whose metadata costs a few MiB instead of
    ~170 on a 49k-token vocabulary) or a ModelLoadError saying why the file is not a usable GGUF."""
    from gguf import GGUFReader

    from kiln.loader.gguf_lean import LeanGGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(path, "file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelLoadError(path, f"not a GGUF file (magic bytes {magic!r}, expected b'GGUF')")
    try:
        return LeanGGUFReader(path) if lean else GGUFReader(path, "r")
    except Exception as exc:  # the library raises ValueError/IndexError/... on corrupt files
        raise ModelLoadError(path, f"corrupt or truncated GGUF ({type(exc).__name__}: {exc})") from None


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def gguf_model_config(reader: Any, path: Path) -> ModelConfig:
    """The file's ModelConfig, parsed by its architecture's registry entry (ModelLoadError if unknown)."""
    arch = _field(reader, "general.architecture")
    entry = get_architecture(arch, path)
    header = GGUFHeader(arch, lambda key: _field(reader, key), frozenset(t.name for t in reader.tensors), path)
    return entry.config_from_gguf(header)


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
    """A Q4_0/Q4_1/Q5_0/Q8_0 or Q5_K/Q6_K matrix as its raw blocks (uint8 [rows, bytes per row]), no
    dequantization; a Q4_K one repacked into Q4_1 blocks (kiln.layers.gguf_repack)."""
    cols = int(tensor.shape[0])  # GGUF lists dims innermost first
    rows = int(np.prod(tensor.shape[1:]))
    data = np.asarray(tensor.data)
    qtype = tensor.tensor_type.name
    if qtype in REPACKED:
        _, block_bytes, block_weights = REPACKED[qtype]
    elif qtype in KQUANT_BYTES:
        block_bytes, block_weights = KQUANT_BYTES[qtype], QKK
    else:
        block_bytes, block_weights = BLOCK_BYTES[qtype], 32
    row_bytes = cols // block_weights * block_bytes
    if cols % block_weights or data.size != rows * row_bytes:
        raise ModelLoadError(path, f"tensor {tensor.name!r} is corrupt or truncated ({data.size} bytes for {rows}x{cols})")
    # a read-only map (the library reader) is copied; kiln's lean reader maps the file copy-on-write, so its
    # blocks are read in place (nothing writes them: packing, repacking and un-permuting build new tensors)
    in_place = data.flags.writeable
    raw = (data if in_place else np.array(data, dtype=np.uint8)).reshape(rows, row_bytes)
    if qtype in REPACKED and qtype != "Q5_0":
        return GGUFQuantizedTensor(repack_target(qtype), torch.from_numpy(repack(qtype, raw)), cols, origin=qtype)
    # Q5_0 stays as stored: a Q5 layer keeps it in 5 bits, a layer mixing it with Q8_0 repacks it (gguf_quant)
    return GGUFQuantizedTensor(qtype, torch.from_numpy(raw), cols, consumed=release_consumed if in_place else None)


def release_consumed(view: torch.Tensor) -> None:
    """What a packed chunk of a file-mapped tensor leaves behind goes back to the OS: its file pages
    (`drop_file_pages`) and the heap its packing temporaries freed (glibc does not always reuse those holes
    for the next chunk: measured +2.3 MiB per 4,096-row chunk of the default model's head without the trim)."""
    from kiln.offload.weight_offload import return_freed_heap

    drop_file_pages(view)
    return_freed_heap()


def drop_file_pages(view: torch.Tensor) -> None:
    """Unmap the whole pages inside `view`'s bytes from this process (`MADV_DONTNEED`). Only for views of the
    lean reader's file mapping, which nothing writes: the pages come back from the file on a later touch.
    (On anonymous memory this would zero the data: never call it on a tensor that is not such a view.)"""
    import ctypes
    import ctypes.util
    import mmap

    global _LIBC
    if _LIBC is None:
        _LIBC = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    start = view.data_ptr()
    end = start + view.numel() * view.element_size()
    lo = (start + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE  # whole pages only: neighbours keep theirs
    hi = end // mmap.PAGESIZE * mmap.PAGESIZE
    if hi > lo:
        _LIBC.madvise(lo, hi - lo, mmap.MADV_DONTNEED)  # a failure only leaves the pages resident


_LIBC: Any = None


def iter_gguf_weights(
    reader: Any, cfg: ModelConfig, path: Path, keep_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFQuantizedTensor]]:
    """Yield (hf_name, tensor) for every tensor of the model, Q/K un-permuted for llama.

    Tensors are float32, except that with `keep_blocks` a 2-D Q4_0 / Q4_1 / Q8_0 tensor is
    yielded as a `GGUFQuantizedTensor` (its rows un-permuted the same way) for layers that
    run those blocks natively; the weight loaders dequantize it for layers that do not.
    """
    names = get_architecture(cfg.architecture, path).weight_names
    for tensor in reader.tensors:
        name = names.hf_name(tensor.name)
        if name is None:
            if tensor.name == "rope_freqs.weight":
                continue  # Llama 3.1 frequency factors: handled via config (see load_gguf)
            raise ModelLoadError(path, f"unexpected tensor {tensor.name!r} for architecture {cfg.architecture}")
        if keep_blocks and tensor.tensor_type.name in RUNNABLE_TYPES and len(tensor.shape) == 2:
            blocks = _raw_blocks(tensor, path)
            heads = _qk_heads(tensor.name, cfg)
            if heads is not None:
                if blocks.shape != (heads * cfg.head_dim, cfg.hidden_size):
                    raise ModelLoadError(path, f"tensor {tensor.name!r}: shape mismatch: expected "
                                               f"{(heads * cfg.head_dim, cfg.hidden_size)}, got {blocks.shape}")
                blocks.raw = unpermute_qk(blocks.raw, heads).contiguous()
                blocks.consumed = None  # a copy now, not the file's pages
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
    """Heads whose rows llama.cpp permuted in this tensor (Q/K of an architecture it permutes), else None."""
    if not get_architecture(cfg.architecture, "ModelConfig.architecture").gguf_rope_permuted:
        return None
    if gguf_name.endswith("attn_q.weight") or gguf_name.endswith("attn_q.bias"):
        return cfg.num_attention_heads
    if gguf_name.endswith("attn_k.weight") or gguf_name.endswith("attn_k.bias"):
        return cfg.num_key_value_heads
    return None


def gguf_layer_types(reader: Any, names: WeightNames) -> dict[str, set[str]]:
    """HF module path (before q/k/v and gate/up fusion) → tensor types of its 2-D weights."""
    types: dict[str, set[str]] = {}
    for tensor in reader.tensors:
        name = names.hf_name(tensor.name)
        if name is not None and name.endswith(".weight") and len(tensor.shape) == 2:
            types.setdefault(name.removesuffix(".weight"), set()).add(tensor.tensor_type.name)
    return types


def rope_freq_factors(reader: Any) -> torch.Tensor | None:
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":
            return torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
    return None


def release_tensor_pages(reader: Any, tensors: list[Any]) -> None:
    """Drop the file pages of `tensors` from this process's resident set once they are consumed.

    The reader maps the whole file; every page a tensor's read touched stays in the resident set (as
    file-backed RSS) for as long as the mapping lives, so a streamed load would end up holding the whole
    file. `MADV_DONTNEED` on a clean, read-only file mapping only unmaps the pages: the page cache keeps
    them and a later read faults them back in, so nothing is lost (a neighbouring tensor sharing an edge page
    just faults it again)."""
    import mmap

    mapping = getattr(reader.data, "_mmap", None)  # numpy's memmap keeps its mmap.mmap here
    if mapping is None or not tensors:
        return
    page = mmap.PAGESIZE
    for tensor in tensors:
        start = int(tensor.data_offset) // page * page
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > start:
            try:
                mapping.madvise(mmap.MADV_DONTNEED, start, end - start)
            except (OSError, ValueError):  # a platform without madvise: the pages stay, nothing breaks
                return
