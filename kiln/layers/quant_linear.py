"""Linear methods for kiln's own quantized checkpoints (layout: kiln.kernels.dequant).

All three are `QuantizedBuffersMethod`s: the dense weight is replaced by the format's buffers, loaded
by name from a kiln quantized folder.

- `IntWeightLinearMethod`: INT8 per-channel / INT4 group-wise weights (RTN, GPTQ, AWQ), W8A16/W4A16.
- `FP8WeightLinearMethod`: FP8 E4M3 weights with a per-channel scale.
- `W8A8LinearMethod`: SmoothQuant: INT8 weights per channel, INT8 activations per token (dynamic),
  an INT8×INT8→INT32 GEMM (`torch._int_mm`).

Weight-only INT layouts whose groups are whole 32-blocks (INT4 with group 32/64/128/256, INT8
symmetric per channel) are repacked after loading (`process_weights_after_loading`) into the
GGUF-style block layout of kiln.kernels.quant_matmul and run the native block kernel for small
batches (M <= 16; dequantize + GEMM above), exactly like GGUF Q4_1 / Q8_0 weights: w = d·q + m with
d = scale and m = -scale·zero rounded to fp16 (INT8: exact). The packed copy lives next to the
checkpoint tensors (which stay, so a loaded model can be re-saved or converted). Other layouts (FP8,
asymmetric INT8, odd group sizes) and tensors not yet finalized run the *reference path*: dequantize
to the activation dtype, then a dense GEMM, which is correct everywhere but not faster than the
dense model. `name` says which path a layer takes, and `kiln info` prints it. An optional
per-input-channel `smooth` vector (AWQ, SmoothQuant) divides the activations first: the stored
weight is W·diag(smooth), so (x / smooth) @ (W·diag(smooth))^T = x @ W^T.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from kiln.kernels.decode_step import LinearEntry
from kiln.kernels.dequant import dequantize_codes, fp8_dequantize, int8_per_token, unpack_int4
from kiln.layers.linear_method import LinearMethod

if TYPE_CHECKING:
    from kiln.layers.gguf_quant import GGUFQuantizedTensor, GGUFQuantLinearMethod
    from kiln.layers.linear import Linear

BufferSpecs = dict[str, tuple[tuple[int, ...], torch.dtype]]


class QuantizedBuffersMethod(LinearMethod):
    """What kiln's quantized formats share: the dense `weight` replaced by the format's own buffers
    (`buffer_specs`), each loaded by name from a kiln quantized folder, whole (every shard at once).

    `apply` here is the reference path: dequantize to the activation dtype, then a dense GEMM.
    """

    quantized_checkpoint = True
    # Foreign checkpoints (GPTQ, AWQ, compressed-tensors) quantize q/k/v and gate/up separately: their
    # tensors, translated to this layout, arrive per shard and fill the shard's rows of each buffer.
    buffers_by_shard = False

    @abstractmethod
    def buffer_specs(self, layer: "Linear") -> BufferSpecs:
        """Buffer name → (shape, dtype), in checkpoint order."""

    @abstractmethod
    def dequantized_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        """The [N, K] weight this layer computes with, in `dtype` (for the reference path and error checks)."""

    def create_weights(self, layer: "Linear") -> None:
        device = layer.weight.device
        layer.dense_dtype = layer.weight.dtype
        del layer.weight
        for name, (shape, dtype) in self.buffer_specs(layer).items():
            layer.register_buffer(name, torch.zeros(shape, dtype=dtype, device=device))

    def checkpoint_params(self, layer: "Linear") -> list[str]:
        return list(self.buffer_specs(layer))

    def finalized_buffer_specs(self, layer: "Linear", device: torch.device) -> BufferSpecs:
        """The buffers `process_weights_after_loading` will add on `device` (none here). The streamed load
        (kiln.loader.streamed_load) sizes its split on a meta model before any weight is read, so it registers
        these up front; invariant: exactly the names, shapes and dtypes the finalize then registers."""
        return {}

    def load_param(self, layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                   shard: str | None = None) -> None:
        """A buffer by name (exact shape and dtype), or the dense bias at `shard`'s rows; with
        `buffers_by_shard`, the buffer rows of `shard` (buffers whose dim 0 is the output rows)."""
        if name == "bias":
            super().load_param(layer, name, tensor, shard)
        elif name == "weight":
            raise ValueError(f"this layer keeps quantized blocks ({self.name}); got a dense tensor")
        else:
            _load_buffer(layer, name, tensor, layer.shard_slice(shard) if self.buffers_by_shard else None)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantized_weight(layer, x.dtype), layer.bias)


def _load_buffer(layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                 rows: slice | None = None) -> None:
    target = getattr(layer, name, None)
    if not isinstance(target, torch.Tensor) or not isinstance(tensor, torch.Tensor):
        raise ValueError(f"unexpected quantized tensor {name!r} for this layer")
    if rows is not None:
        target = target[rows]
    if tuple(target.shape) != tuple(tensor.shape):
        raise ValueError(f"shape mismatch for {name}: expected {tuple(target.shape)}, got {tuple(tensor.shape)}")
    if target.dtype != tensor.dtype:
        raise ValueError(f"dtype mismatch for {name}: expected {target.dtype}, got {tensor.dtype}")
    target.copy_(tensor)


class IntWeightLinearMethod(QuantizedBuffersMethod):
    """Weights as unsigned codes (INT4 packed two per byte) with fp16 group scales and uint8 zeros."""

    def __init__(self, bits: int, group_size: int, sym: bool, smooth: bool = False, act_order: bool = False) -> None:
        self.bits, self.group_size, self.sym, self.smooth = bits, group_size, sym, smooth
        # act-order checkpoints (GPTQ desc_act, compressed-tensors actorder "group"): the codes are stored
        # with their columns sorted into contiguous groups and `input_perm` [K] gathers the activations the
        # same way, so W @ x = W[:, perm] @ x[perm] (kiln.quantization.foreign.layout.act_order_permutation)
        self.act_order = act_order
        self._permuted: bool | None = None  # whether input_perm is other than the identity (known after loading)
        self.blocks: "GGUFQuantLinearMethod | None" = None  # set after loading when the native kernel serves us

    @property
    def name(self) -> str:
        group = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        head = f"int{self.bits} {group} {'sym' if self.sym else 'asym'}{' +smooth' if self.smooth else ''}"
        if self._permuted:
            head += " +act-order (activations gathered by the input permutation)"
        if self.blocks is not None:
            b = self.blocks
            panel = f", fp32 panel kernel up to M={b.panel_rows[1]}" if b.panel_rows[1] > 0 else ""
            return f"{head}: native block kernel for M<={b.block_max_rows(torch.float32)} (fp32) / " \
                   f"{b.dense_threshold} (bf16){panel}, dequantize + GEMM above"
        return f"{head}: reference path (dequantize + dense matmul)"

    def block_layout_fits(self, layer: "Linear") -> bool:
        """Whether the weights map exactly onto 32-element blocks of one scale each."""
        k = layer.input_size
        groups_ok = self.group_size == -1 or self.group_size % 32 == 0
        return k % 32 == 0 and groups_ok and (self.bits == 4 or self.sym)

    def finalized_buffer_specs(self, layer: "Linear", device: torch.device) -> BufferSpecs:
        from kiln.kernels.quant_matmul import QK, use_native_quant

        if not self.block_layout_fits(layer) or not use_native_quant(torch.empty(0, device=device)):
            return {}
        n, k = sum(layer.output_sizes), layer.input_size
        nb = k // QK
        if self.bits == 4:  # pack_q4: pairs of blocks in one 32-byte row
            return {"qs": ((n, -(-nb // 2), QK), torch.uint8), "d": ((n, nb), torch.float16),
                    "m": ((n, nb), torch.float16)}
        return {"qs": ((n, k), torch.int8), "d": ((n, nb), torch.float16), "m": ((0,), torch.float16)}

    def process_weights_after_loading(self, layer: "Linear", dense: torch.Tensor | None = None) -> None:
        """Repack into the native block layout when the kernels are built and it fits (the buffers
        `finalized_buffer_specs` names)."""
        from kiln.kernels.quant_matmul import QK, pack_q4, use_native_quant
        from kiln.layers.gguf_quant import GGUFQuantLinearMethod

        self._permuted = None
        self._is_permuted(layer)  # from the loaded input_perm: an identity (static groups) costs nothing
        if not self.block_layout_fits(layer) or not use_native_quant(layer.qweight):
            return
        codes = unpack_int4(layer.qweight) if self.bits == 4 else layer.qweight
        n, k = codes.shape
        nb = k // QK
        group_len = k if self.group_size == -1 else self.group_size
        block_group = torch.arange(nb, device=codes.device) * QK // group_len
        d = layer.scales[:, block_group].contiguous()
        zero = layer.qzeros[:, block_group]
        if self.bits == 4:
            qs = pack_q4(codes.reshape(n, nb, QK))
            m = (-(d.float() * zero.float())).to(torch.float16)
        else:  # symmetric: code - 128 is the signed value
            qs = (codes.to(torch.int16) - 128).to(torch.int8)
            m = torch.empty(0, dtype=torch.float16, device=codes.device)
        layer.register_buffer("qs", qs, persistent=False)
        layer.register_buffer("d", d, persistent=False)
        layer.register_buffer("m", m.contiguous(), persistent=False)
        layer.dense_weight = None
        self.blocks = GGUFQuantLinearMethod("Q4" if self.bits == 4 else "Q8", keep_dense=False)

    def tp_layout(self, layer: "Linear", name: str) -> tuple[int | None, int | None, int]:
        per_channel = self.group_size == -1
        if name == "input_perm":
            raise ValueError("an act-order layer (its input permuted) cannot be split for tensor parallel; "
                             "run it with --tensor-parallel-size 1 or re-quantize with static groups")
        layouts = {"qweight": (0, 1, 2 if self.bits == 4 else 1), "scales": (0, None if per_channel else 1,
                   self.group_size), "qzeros": (0, None if per_channel else 1, self.group_size), "smooth": (None, 0, 1)}
        return layouts[name] if name in layouts else super().tp_layout(layer, name)

    def buffer_specs(self, layer: "Linear") -> BufferSpecs:
        n, k = sum(layer.output_sizes), layer.input_size
        g = 1 if self.group_size == -1 else -(-k // self.group_size)  # a short last group when G ∤ K
        cols = k // 2 if self.bits == 4 else k
        specs = {"qweight": ((n, cols), torch.uint8), "scales": ((n, g), torch.float16), "qzeros": ((n, g), torch.uint8)}
        if self.smooth:
            specs["smooth"] = ((k,), torch.float32)
        if self.act_order:
            specs["input_perm"] = ((k,), torch.int64)
        return specs

    def load_param(self, layer: "Linear", name: str, tensor: "torch.Tensor | GGUFQuantizedTensor",
                   shard: str | None = None) -> None:
        """As the base class; `input_perm` is one vector for the whole layer, which every shard of a fused
        layer (q/k/v share their input, so GPTQ sorts their columns alike) must bring identically."""
        if name != "input_perm":
            return super().load_param(layer, name, tensor, shard)
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != (layer.input_size,):
            raise ValueError(f"input_perm must be a vector of {layer.input_size} column indices")
        seen = getattr(layer, "_input_perm_shards", set())
        if seen and not torch.equal(layer.input_perm, tensor.to(torch.int64)):
            raise ValueError("the modules fused into this layer were quantized with different act-order column "
                             "orders (g_idx); kiln runs them as one layer and needs one order")
        layer.input_perm.copy_(tensor)
        layer._input_perm_shards = seen | {shard}

    def _is_permuted(self, layer: "Linear") -> bool:
        if self._permuted is None:
            self._permuted = self.act_order and not torch.equal(
                layer.input_perm, torch.arange(layer.input_size, device=layer.input_perm.device))
        return self._permuted

    def dequantized_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        """The weight in the input's own column order (an act-order layer's stored order undone)."""
        codes = unpack_int4(layer.qweight) if self.bits == 4 else layer.qweight
        w = dequantize_codes(codes, layer.scales, layer.qzeros, self.group_size, dtype)
        return w[:, torch.argsort(layer.input_perm)] if self._is_permuted(layer) else w

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        if self.smooth:
            x = (x / layer.smooth).to(x.dtype)
        if self.blocks is not None:
            if self._is_permuted(layer):
                x = x.index_select(-1, layer.input_perm)
            return self.blocks.apply(layer, x)
        return super().apply(layer, x)

    def decode_plan_entry(self, layer: "Linear", dtype: torch.dtype) -> LinearEntry | None:
        # The plan has no step that divides activations by `smooth` or gathers them by an act-order
        # permutation; unrepacked codes have no kernel.
        if self.smooth or self.blocks is None or self._is_permuted(layer):
            return None
        return self.blocks.decode_plan_entry(layer, dtype)


class FP8WeightLinearMethod(QuantizedBuffersMethod):
    """float8_e4m3fn weights [N, K] with an fp32 scale per output channel."""

    name = "fp8 e4m3 per-channel: reference path (dequantize + dense matmul)"

    def tp_layout(self, layer: "Linear", name: str) -> tuple[int | None, int | None, int]:
        return {"qweight": (0, 1, 1), "scales": (0, None, 1)}.get(name) or super().tp_layout(layer, name)

    def buffer_specs(self, layer: "Linear") -> BufferSpecs:
        n, k = sum(layer.output_sizes), layer.input_size
        return {"qweight": ((n, k), torch.float8_e4m3fn), "scales": ((n,), torch.float32)}

    def dequantized_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        return fp8_dequantize(layer.qweight, layer.scales, dtype)


class W8A8LinearMethod(QuantizedBuffersMethod):
    """SmoothQuant W8A8: y = (s_x · s_w) ⊙ (int8(x / smooth) @ int8(W·diag(smooth))^T).

    `qweight_t` is stored transposed [K, N] because `torch._int_mm` wants its second operand
    that way; activation scales are per token, weight scales per output channel.
    """

    name = "w8a8 int8 (SmoothQuant; per-token dynamic activations): torch._int_mm"

    def tp_layout(self, layer: "Linear", name: str) -> tuple[int | None, int | None, int]:
        layouts = {"qweight_t": (1, 0, 1), "scales": (0, None, 1), "smooth": (None, 0, 1)}
        return layouts.get(name) or super().tp_layout(layer, name)

    def buffer_specs(self, layer: "Linear") -> BufferSpecs:
        n, k = sum(layer.output_sizes), layer.input_size
        return {"qweight_t": ((k, n), torch.int8), "scales": ((n,), torch.float32), "smooth": ((k,), torch.float32)}

    def dequantized_weight(self, layer: "Linear", dtype: torch.dtype) -> torch.Tensor:
        """The weight this layer computes with (smoothing undone), for error checks."""
        return (layer.qweight_t.t().float() * layer.scales.unsqueeze(1) / layer.smooth.unsqueeze(0)).to(dtype)

    def apply(self, layer: "Linear", x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        xq, xscale = int8_per_token(x2.float() / layer.smooth)
        if x2.device.type == "cuda" and xq.shape[0] <= 16:
            # cuBLASLt's int8 GEMM wants M > 16: pad the rows (the extra ones are dropped).
            xq = F.pad(xq, (0, 0, 0, 17 - xq.shape[0]))
        acc = torch._int_mm(xq, layer.qweight_t)[: x2.shape[0]]
        y = acc.float() * xscale * layer.scales
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype).reshape(*lead, -1)


def method_for(entry: dict) -> QuantizedBuffersMethod:
    """The LinearMethod a `quantization_config["layers"]` entry describes; ValueError on an unknown one."""
    fmt = entry.get("format")
    if fmt == "int":
        return IntWeightLinearMethod(int(entry["bits"]), int(entry["group_size"]), bool(entry["sym"]),
                                     bool(entry.get("smooth", False)), bool(entry.get("act_order", False)))
    if fmt == "fp8":
        return FP8WeightLinearMethod()
    if fmt == "w8a8":
        return W8A8LinearMethod()
    raise ValueError(f"unknown quantized layer format {fmt!r} (expected int, fp8 or w8a8)")
