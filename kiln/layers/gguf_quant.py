"""GGUF Q4_0 / Q4_1 / Q8_0 weights kept in their 4- and 8-bit form inside a `Linear`.

The GGUF loader hands such tensors over as `GGUFQuantizedTensor` (raw blocks, rows already
in kiln's order); a Linear switched to `GGUFQuantLinearMethod` repacks them once into the
layout `kiln.kernels.quant_matmul` reads (pairs of blocks interleaved by nibble, fp16 scales) and
holds a dense copy only when asked to. Decode-sized batches (M <= `dense_threshold`) run the
int16·int4 kernel; with fp32 activations on AVX-512, batches from 6 to 96 rows run the panel
kernel (PANEL_ROWS); larger ones (prefill chunks, big decode batches) use the dense GEMM, which
wins there (benchmarks/results/quant_kernels.json): with `keep_dense` on a resident copy in the
model dtype (fastest; ~2.4x the weight memory of blocks alone), otherwise on weights
dequantized per call (memory-lean).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from kiln.kernels.decode_step import LinearEntry, block_entry
from kiln.kernels.packed_linear import is_packed, pack, packed_linear, packing_available
from kiln.kernels.quant_matmul import QK, dequantize, pack_q4, quant_matmul, quant_matmul_panels, use_native_quant
from kiln.kernels.tune import copy_dtype, limits, load_tuning
from kiln.layers.linear_method import LinearMethod

if TYPE_CHECKING:
    from kiln.layers.linear import Linear

# GGUF block sizes in bytes (32 weights each): fp16 d [+ fp16 m] + quants.
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}
Q4_TYPES = ("Q4_0", "Q4_1")
NATIVE_TYPES = frozenset(BLOCK_BYTES)
PACK_ROWS = 4096  # rows packed per step at load (bounds the transient copies)

# Built-in crossovers, used where `kiln tune` has not measured this machine (kiln.kernels.tune).
# Measured on an AMD EPYC (benchmarks/quant_kernels.py), by the library's SIMD path:
# (largest M where the block kernel beats a resident bf16 GEMM, ... beats dequantize-per-call + GEMM).
# AVX-512 (three runs): 1.07-1.10x at M=16, 0.87x at 32 vs resident bf16; with fp32 activations
# against a resident fp32 copy (the default dtype on this CPU) the crossover is the same, 1.17x at
# M=16 and 0.78x at 32; 0.84x at 64 vs dequantize.
# AVX2 (quant_kernels_haswell.json): 1.24x at M=4, 0.83x at 8.
THRESHOLDS = {"AVX-512": (16, 32), "AVX2": (4, 16)}
SCALAR_THRESHOLDS = (4, 16)  # portable C++ loop: not measured; the values used before the per-path split


# fp32 activations have a third path between the two (quant_matmul_panels: weights dequantized
# panel by panel into L1, register-blocked FMAs), AVX-512 only: (first M it runs, last M it runs).
# Measured (quant_kernels.json, one decode step's matmuls, distinct weights): block kernel 12.4 ms
# vs panel 13.9 at M=4, 21.8 vs 18.0 at M=8 (linear interpolation crosses at ~5); panel vs resident
# fp32 GEMM 1.30x at M=64, 1.06x at 96, 0.97x at 128 (a later run: 1.35x, 1.13x, 1.04x; at 128 the two are
# within run-to-run noise, so the GEMM keeps M > 96).
PANEL_ROWS = {"AVX-512": (6, 96)}


def default_panel_rows() -> tuple[int, int]:
    from kiln.kernels.native import simd_path

    return PANEL_ROWS.get(simd_path(), (0, 0))


def default_dense_threshold(keep_dense: bool) -> int:
    """Largest batch the block kernel runs before the dense GEMM takes over (see THRESHOLDS)."""
    from kiln.kernels.native import simd_path

    vs_resident, vs_dequantize = THRESHOLDS.get(simd_path(), SCALAR_THRESHOLDS)
    return vs_resident if keep_dense else vs_dequantize


@dataclass
class GGUFQuantizedTensor:
    """A 2-D GGUF tensor still in its blocks: `raw` is uint8 [rows, K / 32 * block_bytes]."""

    qtype: str
    raw: torch.Tensor
    cols: int
    origin: str = ""  # the file's type when the blocks were repacked into `qtype` (kiln.layers.gguf_repack)
    # set by the loader when `raw` is a view of the model file's mapping: called with each slice of `raw` once
    # it is consumed, so those file pages leave the resident set while a large tensor is still being packed
    consumed: "Callable[[torch.Tensor], None] | None" = None

    @property
    def shape(self) -> tuple[int, int]:
        return (self.raw.shape[0], self.cols)

    def dequantize(self) -> torch.Tensor:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize as gguf_dequantize

        return torch.from_numpy(np.ascontiguousarray(
            gguf_dequantize(self.raw.numpy(), GGMLQuantizationType[self.qtype]), dtype=np.float32))


def pack_blocks(t: GGUFQuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF blocks → (qs, d, m) in the kernel layout (see kiln.kernels.quant_matmul); exact."""
    n, k = t.shape
    nb = k // QK
    blocks = t.raw.reshape(n, nb, BLOCK_BYTES[t.qtype])
    d = blocks[..., 0:2].contiguous().view(torch.float16).reshape(n, nb)
    if t.qtype == "Q8_0":
        return blocks[..., 2:].contiguous().view(torch.int8).reshape(n, k), d.contiguous(), torch.empty(0, dtype=torch.float16)
    if t.qtype == "Q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).reshape(n, nb)
        packed = blocks[..., 4:]
    else:  # Q4_0: w = d * (q - 8) = d * q + (-8 d), exact in float16
        m = -8.0 * d
        packed = blocks[..., 2:]
    q = torch.cat((packed & 0x0F, packed >> 4), dim=-1)  # GGUF: byte j = element j | element j+16 << 4
    return pack_q4(q), d.contiguous(), m.contiguous()


class GGUFQuantLinearMethod(LinearMethod):
    """x @ W^T for a Linear whose W stays in GGUF Q4 or Q8 blocks."""

    def __init__(self, qtype_family: str, keep_dense: bool = False, dense_threshold: int | None = None,
                 panel_rows: tuple[int, int] | None = None) -> None:
        if qtype_family not in ("Q4", "Q8"):
            raise ValueError(f"qtype_family must be 'Q4' or 'Q8', got {qtype_family!r}")
        self.is_q4 = qtype_family == "Q4"
        self.keep_dense = keep_dense
        self.dense_threshold = dense_threshold if dense_threshold is not None else default_dense_threshold(keep_dense)
        self.panel_rows = panel_rows if panel_rows is not None else default_panel_rows()
        # `kiln tune`'s crossovers for this machine replace the built-in ones, unless the caller set its own
        self.tuning = load_tuning() if dense_threshold is None and panel_rows is None else None
        self._tuned_limits: dict[torch.dtype, tuple[int, int] | None] = {}
        self.source_types: set[str] = set()

    def _tuned(self, dtype: torch.dtype) -> tuple[int, int] | None:
        # looked up once per dtype: apply() asks on every call
        if dtype not in self._tuned_limits:
            self._tuned_limits[dtype] = limits(self.tuning, dtype, self.keep_dense) if self.tuning is not None else None
        return self._tuned_limits[dtype]

    def block_max_rows(self, dtype: torch.dtype) -> int:
        """Largest M the block kernel takes for activations of `dtype`."""
        tuned = self._tuned(dtype)
        if tuned is not None:
            return tuned[0]
        first_panel, last_panel = self.panel_rows
        if dtype == torch.float32 and last_panel > 0:
            return min(self.dense_threshold, first_panel - 1)
        return self.dense_threshold

    def panel_max_rows(self, dtype: torch.dtype) -> int:
        """Largest M the panel kernel takes (0: never; it runs fp32 activations only)."""
        if dtype != torch.float32:
            return 0
        tuned = self._tuned(dtype)
        return tuned[1] if tuned is not None else self.panel_rows[1]

    @property
    def name(self) -> str:
        types = "/".join(sorted(self.source_types)) or ("Q4" if self.is_q4 else "Q8")
        path = self.kernel_name if use_native_quant(torch.empty(0)) else "reference (dequantize + matmul)"
        dense = "resident dense copy" if self.keep_dense else "dequantized per call"
        if self.tuning is not None:
            f32, b16 = self._tuned(torch.float32), self._tuned(torch.bfloat16)
            return (f"gguf {types}: {path} (tuned here: fp32 M<={f32[0] if f32 else '?'}"
                    + (f", panel kernel to M={f32[1]}" if f32 and f32[1] else "")
                    + f"; bf16 M<={b16[0] if b16 else '?'}), dense GEMM above ({dense})")
        panel = ""
        if self.panel_rows[1] > 0 and use_native_quant(torch.empty(0)):
            panel = (f" (fp32: M<={self.block_max_rows(torch.float32)}, then the panel kernel up to "
                     f"M={self.panel_rows[1]})")
        return f"gguf {types}: {path} for M<={self.dense_threshold}{panel}, dense GEMM above ({dense})"

    @property
    def kernel_name(self) -> str:
        """The native kernel small batches run, in words."""
        return "native int16·int{} kernel".format(4 if self.is_q4 else 8)

    def accepts(self, qtype: str) -> bool:
        # Q5_0 shards of a layer mixing them with Q8_0 are repacked into Q8_0 at load (exact)
        return qtype in (Q4_TYPES if self.is_q4 else ("Q8_0", "Q5_0"))

    def create_weights(self, layer: "Linear") -> None:
        """Replace the dense `weight` by packed buffers (allocated once, filled shard by shard)."""
        n, k = sum(layer.output_sizes), layer.input_size
        if k % QK:
            raise ValueError(f"input size {k} is not a multiple of {QK}")
        device, dtype = layer.weight.device, layer.weight.dtype
        del layer.weight
        nb = k // QK
        qs_shape, qs_dtype = ((n, (nb + 1) // 2, QK), torch.uint8) if self.is_q4 else ((n, k), torch.int8)
        layer.register_buffer("qs", torch.zeros(qs_shape, dtype=qs_dtype, device=device))
        layer.register_buffer("d", torch.zeros(n, nb, dtype=torch.float16, device=device))
        layer.register_buffer("m", torch.zeros((n, nb) if self.is_q4 else (0,), dtype=torch.float16, device=device))
        layer.dense_weight = None
        # the resident copy's dtype: the model's, or bf16 under fp32 activations where `kiln tune` found
        # bf16 GEMMs (casts included) faster here (kiln.kernels.tune.dense_copy_dtype)
        layer.dense_dtype = copy_dtype(self.tuning, dtype) if self.keep_dense else dtype

    def process_weights_after_loading(self, layer: "Linear", dense: torch.Tensor | None = None) -> None:
        """After every shard is loaded: build (or adopt, e.g. a tied embedding) the dense copy.

        The copy is kept pre-packed for oneDNN where that works for its dtype (kiln.kernels.packed_linear: bf16,
        and fp32 where oneDNN's packed GEMM matches torch's). A tied head's fp32 table (an fp32 model) is
        packed into a copy of the head's dtype, and the table stays for embedding lookups: its batched rows
        would otherwise run torch's GEMM on the plain table (at 32 rows 4.4x slower than a packed bf16 copy on
        an AVX-512 EPYC, 2x slower than a packed fp32 copy on an AVX2 EPYC). A bf16 table is adopted as it
        is: a packed copy would double its memory for ~1.3x on the head's GEMM."""
        if not self.keep_dense:
            return
        copy = layer.dense_dtype
        if packing_available(next(layer.buffers()).device, copy):
            if dense is None:
                layer.dense_weight = pack(self.dequantize_weight(layer, copy), copy)
                return
            if dense.dtype == torch.float32:
                layer.dense_weight = pack(dense, copy)
                return
        layer.dense_weight = dense if dense is not None else self.dequantize_weight(layer, layer.dense_dtype)

    # The three kernels `apply` chooses between; a subclass holding another block layout overrides them.
    def block_matmul(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return quant_matmul(x, layer.qs, layer.d, layer.m, self.is_q4)

    def panel_matmul(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return quant_matmul_panels(x, layer.qs, layer.d, layer.m, self.is_q4)

    def dequantize_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        return dequantize(layer.qs, layer.d, layer.m, self.is_q4, dtype)

    def load_param(self, layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                   shard: str | None = None) -> None:
        """`weight` must come as GGUF blocks (packed at `shard`'s rows); a bias loads densely."""
        if name != "weight":
            super().load_param(layer, name, tensor, shard)
        elif isinstance(tensor, GGUFQuantizedTensor):
            self.load_shard(layer, tensor, layer.shard_slice(shard))
        else:
            raise ValueError(f"this layer keeps quantized blocks ({self.name}); got a dense tensor")

    def load_shard(self, layer: "Linear", t: GGUFQuantizedTensor, rows: slice) -> None:
        if not self.accepts(t.qtype):
            raise ValueError(f"tensor type {t.qtype} does not fit this layer's {'Q4' if self.is_q4 else 'Q8'} blocks")
        if t.qtype == "Q5_0":
            from kiln.layers.gguf_repack import repack

            t = GGUFQuantizedTensor("Q8_0", torch.from_numpy(repack("Q5_0", t.raw.numpy())), t.cols, origin="Q5_0")
        expected = (rows.stop - rows.start, layer.input_size)
        if t.shape != expected:
            raise ValueError(f"shape mismatch: expected {expected}, got {t.shape}")
        # packed PACK_ROWS rows at a time (rows are independent, so the result is the same): the whole-tensor
        # temporaries of the default model's 49k-row Q8_0 head added 27 MiB to the streamed load's peak
        for lo in range(0, t.shape[0], PACK_ROWS):
            qs, d, m = pack_blocks(GGUFQuantizedTensor(t.qtype, t.raw[lo:lo + PACK_ROWS], t.cols))
            dst = slice(rows.start + lo, rows.start + lo + qs.shape[0])
            layer.qs[dst].copy_(qs)
            layer.d[dst].copy_(d)
            if self.is_q4:
                layer.m[dst].copy_(m)
            if t.consumed is not None:
                t.consumed(t.raw[lo:lo + PACK_ROWS])
        self.source_types.add(f"{t.origin}→{t.qtype}" if t.origin else t.qtype)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        rows = x2.shape[0]
        if rows <= self.block_max_rows(x2.dtype):
            y = self.block_matmul(layer, x2)
            if layer.bias is not None:
                y = y + layer.bias
        elif rows <= self.panel_max_rows(x2.dtype) and use_native_quant(x2):
            y = self.panel_matmul(layer, x2)
            if layer.bias is not None:
                y = y + layer.bias
        else:
            w = layer.dense_weight
            if is_packed(w):
                return packed_linear(x2, w, layer.bias).reshape(*lead, -1)
            if w is not None and w.dtype == torch.bfloat16 and x2.dtype == torch.float32:
                y = F.linear(x2.to(torch.bfloat16), w).float()  # the tuned bf16 copy (see create_weights)
                if layer.bias is not None:
                    y = y + layer.bias
                return y.reshape(*lead, y.shape[-1])
            if w is None or w.dtype != x.dtype:
                w = self.dequantize_weight(layer, x.dtype)
            y = F.linear(x2, w, layer.bias)
        return y.reshape(*lead, y.shape[-1])

    def decode_plan_entry(self, layer: "Linear", dtype: torch.dtype) -> LinearEntry:
        """The packed blocks with this method's row limits: the plan picks kernels exactly as `apply` does."""
        return block_entry(layer.qs, layer.d, layer.m, layer.dense_weight, layer.bias, self.is_q4,
                           self.block_max_rows(dtype), self.panel_max_rows(dtype))


def family_of(qtypes: set[str]) -> str | None:
    """'Q4' / 'Q8' when every shard of a layer can share one packed block layout, 'Q5' when every shard is
    Q5_0 (kiln.layers.gguf_q5), a K-quant type ('Q6_K',
    ...) when every shard is that type (run as stored by kiln.layers.kquant_linear), else None (dense).
    File types that are repacked at load (Q5_0, Q4_K: kiln.layers.gguf_repack) count as their target."""
    from kiln.kernels.kquant_matmul import KQUANT_TYPES
    from kiln.layers.gguf_repack import repack_target

    if qtypes == {"Q5_0"}:
        return "Q5"  # kept in 5 bits (kiln.layers.gguf_q5); mixed with Q8_0 it is repacked to Q8_0 below
    qtypes = {repack_target(t) for t in qtypes}
    if qtypes and qtypes <= set(Q4_TYPES):
        return "Q4"
    if qtypes == {"Q8_0"}:
        return "Q8"
    if len(qtypes) == 1 and next(iter(qtypes)) in KQUANT_TYPES:
        return next(iter(qtypes))
    return None


def block_method(family: str, keep_dense: bool) -> GGUFQuantLinearMethod:
    """The LinearMethod for a `family_of` result: the Q4/Q8 block layout or a K-quant one."""
    if family in ("Q4", "Q8"):
        return GGUFQuantLinearMethod(family, keep_dense=keep_dense)
    if family == "Q5":
        from kiln.layers.gguf_q5 import GGUFQ5LinearMethod

        return GGUFQ5LinearMethod(keep_dense=keep_dense)
    from kiln.layers.kquant_linear import KQuantLinearMethod

    return KQuantLinearMethod(family, keep_dense=keep_dense)
