"""Dense copies pre-packed for oneDNN (kiln.kernels.packed_linear) against the plain copies they replace.

The packed GEMM must compute what `F.linear` computes on the plain copy: bit for bit in bf16, to fp32
rounding in fp32 (oneDNN and MKL sum in different orders), on the op itself and inside a quantized layer's
large-M path; the fused decode step (csrc/decode_linear.h calls the same oneDNN op) must equal the
op-by-op path bit for bit; the switch (`--no-packed-gemm`) must give the plain copy back; the memory
accounting and the huge-page move must treat the opaque tensor correctly.

Which dtypes pack is a property of the CPU and torch build (`packing_available`): on a CPU without native
bf16 instructions oneDNN's bf16 GEMM does not equal torch's bit for bit, so kiln keeps bf16 copies plain
there and the bf16 tests skip with that reason; the fp32 tests run wherever oneDNN does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import switches
from kiln.kernels.packed_linear import is_packed, pack, pack_bf16, packed_linear, packing_available

needs_bf16_packing = pytest.mark.skipif(
    not packing_available("cpu", torch.bfloat16),
    reason="oneDNN's packed bf16 GEMM does not equal torch's bit for bit on this CPU/build (e.g. no native bf16 "
           "instructions), so kiln keeps bf16 copies plain here")
needs_fp32_packing = pytest.mark.skipif(not packing_available("cpu", torch.float32),
                                        reason="this torch build has no working oneDNN fp32 GEMM")
# the packed fp32 GEMM against torch's on the plain copy: sums of the same products in another order
FP32_TOL = {"rtol": 1e-5, "atol": 1e-4}


@needs_bf16_packing
@pytest.mark.parametrize("rows", [1, 17, 40, 129])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_packed_linear_equals_plain_bf16_linear(rows: int, x_dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 160, generator=g)
    x = torch.randn(rows, 160, generator=g).to(x_dtype)
    packed = pack_bf16(w)
    assert is_packed(packed) and not is_packed(w) and packed.shape == w.shape
    want = F.linear(x.to(torch.bfloat16), w.to(torch.bfloat16)).to(x_dtype)
    got = packed_linear(x, packed)
    assert got.dtype == x_dtype and torch.equal(got, want)
    bias = torch.randn(96, generator=g).to(x_dtype)
    # the bias where the plain path adds it: inside the bf16 GEMM, after the cast for fp32 activations
    want_biased = (F.linear(x, w.to(torch.bfloat16), bias) if x_dtype == torch.bfloat16 else want + bias)
    assert torch.equal(packed_linear(x, packed, bias), want_biased)
    # leading dimensions are kept
    assert torch.equal(packed_linear(x.reshape(1, rows, 160), packed), want.reshape(1, rows, 96))


@needs_fp32_packing
@pytest.mark.parametrize("rows", [1, 17, 40, 129])
def test_packed_fp32_linear_matches_plain_linear(rows: int) -> None:
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 576, generator=g)
    x = torch.randn(rows, 576, generator=g)
    packed = pack(w, torch.float32)
    assert is_packed(packed) and packed.dtype == torch.float32 and packed.shape == w.shape
    got = packed_linear(x, packed)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, w), **FP32_TOL)
    # against fp64: no less accurate than torch's own fp32 GEMM (to a factor for the different order)
    exact = F.linear(x.double(), w.double())
    assert (got.double() - exact).abs().max() <= 4 * (F.linear(x, w).double() - exact).abs().max() + 1e-6
    bias = torch.randn(96, generator=g)
    torch.testing.assert_close(packed_linear(x, packed, bias), F.linear(x, w, bias), **FP32_TOL)
    torch.testing.assert_close(packed_linear(x.reshape(1, rows, 576), packed), F.linear(x, w).reshape(1, rows, 96),
                               **FP32_TOL)
    # bf16 activations on an fp32 copy are computed in fp32 and returned in bf16
    assert packed_linear(x.bfloat16(), packed).dtype == torch.bfloat16


def test_resident_copy_is_what_the_engine_keeps() -> None:
    """`kiln tune` times the resident path on `resident_copy`: packed exactly where layers pack."""
    from kiln.kernels.packed_linear import resident_copy, resident_linear

    g = torch.Generator().manual_seed(3)
    for dtype in (torch.float32, torch.bfloat16):
        w = torch.randn(64, 128, generator=g).to(dtype)
        x = torch.randn(5, 128, generator=g)
        copy = resident_copy(w)
        assert is_packed(copy) == packing_available("cpu", dtype)
        want = F.linear(x.to(dtype), w).float()
        got = resident_linear(x, copy)
        assert got.dtype == torch.float32
        if dtype == torch.bfloat16:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, **FP32_TOL)


def test_pack_refuses_a_non_matrix_and_other_dtypes() -> None:
    with pytest.raises(ValueError, match=r"\[N, K\]"):
        pack_bf16(torch.randn(4, 4, 4))
    with pytest.raises(ValueError, match="bf16 or fp32"):
        pack(torch.randn(4, 4), torch.float16)


def test_switch_turns_packing_off() -> None:
    with switches.overridden(packed_gemm=False):
        assert not packing_available("cpu") and not packing_available("cpu", torch.float32)
    assert not packing_available("meta") and not packing_available("meta", torch.float32)
    assert not packing_available("cpu", torch.float16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _bf16_model(path: Path, packed: bool, dtype: str = "bfloat16"):
    """The tiny GGUF with resident bf16 dense copies (in a bf16 model, or in an fp32 one where `kiln tune` keeps
    them in bf16: `bf16_copies_under_fp32`), its block kernels limited to one row (so every batch of two or more
    rows takes the dense-copy path)."""
    from kiln import LLM
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod

    llm = LLM(str(path), dtype=dtype, kv_cache_memory=1 << 20, max_num_batched_tokens=64, packed_gemm=packed)
    model = llm.engine.loaded.model
    methods = [m.method for m in model.modules() if isinstance(getattr(m, "method", None), GGUFQuantLinearMethod)]
    assert methods, "the tiny model has block layers"
    for method in methods:
        method.tuning, method.dense_threshold, method.panel_rows = None, 1, (0, 0)  # no fp32 panel kernel either
        method._tuned_limits.clear()
    return llm, model


@needs_bf16_packing
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_block_layers_pack_their_bf16_copies_and_compute_the_same(tiny, variant: str) -> None:
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod

    _, packed_model = _bf16_model(tiny.gguf[variant], packed=True)
    _, plain_model = _bf16_model(tiny.gguf[variant], packed=False)
    head = packed_model.quantized_tied_head
    if head is not None:  # a bf16 table is adopted as it is (a packed copy would double its memory)
        assert head.dense_weight is packed_model.embed_tokens.weight
    layers = [(name, m) for name, m in packed_model.named_modules()
              if isinstance(getattr(m, "method", None), GGUFQuantLinearMethod) and m.method.keep_dense
              and m is not head]
    assert layers
    plain = dict(plain_model.named_modules())
    g = torch.Generator().manual_seed(0)
    for name, layer in layers:
        assert is_packed(layer.dense_weight), name
        assert not is_packed(plain[name].dense_weight) and plain[name].dense_weight.dtype == torch.bfloat16
        x = torch.randn(24, layer.input_size, generator=g).to(torch.bfloat16)
        assert torch.equal(layer(x), plain[name](x)), name


@pytest.fixture
def bf16_copies_under_fp32(monkeypatch):
    """An fp32 model whose dense copies `kiln tune` keeps in bf16 (as on the AMD EPYC of the benchmarks)."""
    import kiln.layers.gguf_quant as gq

    monkeypatch.setattr(gq, "copy_dtype", lambda tuning, dtype: torch.bfloat16)


@needs_bf16_packing
def test_fp32_model_with_bf16_copies_packs_them_and_the_tied_head(tiny, bf16_copies_under_fp32) -> None:
    _, packed_model = _bf16_model(tiny.gguf["tied"], packed=True, dtype="float32")
    _, plain_model = _bf16_model(tiny.gguf["tied"], packed=False, dtype="float32")
    head, plain_head = packed_model.quantized_tied_head, plain_model.quantized_tied_head
    assert head is not None
    # the head packs a bf16 copy of the fp32 table (which still serves lookups); unpacked it adopts the table
    assert is_packed(head.dense_weight) and packed_model.embed_tokens.weight.dtype == torch.float32
    assert plain_head.dense_weight is plain_model.embed_tokens.weight
    hidden = torch.randn(24, head.input_size, generator=torch.Generator().manual_seed(1))
    want = F.linear(hidden.to(torch.bfloat16), packed_model.embed_tokens.weight.to(torch.bfloat16)).float()
    assert torch.equal(packed_model.compute_logits(hidden), want)
    plain = dict(plain_model.named_modules())
    for name, layer in packed_model.named_modules():
        if name.endswith("mlp.down_proj"):
            assert is_packed(layer.dense_weight) and plain[name].dense_weight.dtype == torch.bfloat16
            x = torch.randn(24, layer.input_size, generator=torch.Generator().manual_seed(2))
            assert torch.equal(layer(x), plain[name](x))


@needs_bf16_packing
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fused_step_on_packed_copies_equals_the_plain_path(tiny, variant: str) -> None:
    from kiln.kernels.native import load_native

    if not load_native():
        pytest.skip("the fused decode step is part of the native kernel library")
    from test_decode_step import _decode_steps

    _, model = _bf16_model(tiny.gguf[variant], packed=True)
    assert model.decode_plan() is not None, model.decode_plan_status
    prompt_lens = [2, 7, 4, 11, 5, 8]  # six rows per decode step: the packed dense path
    fused = _decode_steps(model, True, "auto", prompt_lens, steps=2)
    plain = _decode_steps(model, False, "auto", prompt_lens, steps=2)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)
    _, unpacked = _bf16_model(tiny.gguf[variant], packed=False)
    for f, u in zip(fused, _decode_steps(unpacked, True, "auto", prompt_lens, steps=2)):
        assert torch.equal(f, u)  # and the same as on plain bf16 copies


@pytest.fixture
def fp32_copies(monkeypatch):
    """An fp32 model whose dense copies stay fp32 (as `kiln tune` chose on the AVX2-only EPYC)."""
    import kiln.layers.gguf_quant as gq

    monkeypatch.setattr(gq, "copy_dtype", lambda tuning, dtype: dtype)


@needs_fp32_packing
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fp32_model_packs_its_fp32_copies_and_the_tied_head(tiny, fp32_copies, variant: str) -> None:
    from kiln.layers.gguf_quant import GGUFQuantLinearMethod

    _, packed_model = _bf16_model(tiny.gguf[variant], packed=True, dtype="float32")
    _, plain_model = _bf16_model(tiny.gguf[variant], packed=False, dtype="float32")
    head = packed_model.quantized_tied_head
    g = torch.Generator().manual_seed(4)
    if head is not None:
        # a packed fp32 copy of the fp32 table (which still serves lookups); unpacked the head adopts the table
        assert is_packed(head.dense_weight) and head.dense_weight.dtype == torch.float32
        assert plain_model.quantized_tied_head.dense_weight is plain_model.embed_tokens.weight
        hidden = torch.randn(24, head.input_size, generator=g)
        torch.testing.assert_close(packed_model.compute_logits(hidden), plain_model.compute_logits(hidden), **FP32_TOL)
    plain = dict(plain_model.named_modules())
    layers = [(name, m) for name, m in packed_model.named_modules()
              if isinstance(getattr(m, "method", None), GGUFQuantLinearMethod) and m.method.keep_dense
              and m is not head]
    assert layers
    for name, layer in layers:
        assert is_packed(layer.dense_weight) and layer.dense_weight.dtype == torch.float32, name
        assert not is_packed(plain[name].dense_weight) and plain[name].dense_weight.dtype == torch.float32
        x = torch.randn(24, layer.input_size, generator=g)
        torch.testing.assert_close(layer(x), plain[name](x), **FP32_TOL)


@needs_fp32_packing
@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_fused_step_on_packed_fp32_copies_equals_the_plain_path(tiny, fp32_copies, variant: str) -> None:
    from kiln.kernels.native import load_native

    if not load_native():
        pytest.skip("the fused decode step is part of the native kernel library")
    from test_decode_step import _decode_steps

    _, model = _bf16_model(tiny.gguf[variant], packed=True, dtype="float32")
    assert model.decode_plan() is not None, model.decode_plan_status
    prompt_lens = [2, 7, 4, 11, 5, 8]  # six rows per decode step: the packed dense path
    fused = _decode_steps(model, True, "float32", prompt_lens, steps=2)
    plain = _decode_steps(model, False, "float32", prompt_lens, steps=2)
    for f, p in zip(fused, plain):
        assert torch.equal(f, p)  # the same oneDNN op on the same packed copy
    _, unpacked = _bf16_model(tiny.gguf[variant], packed=False, dtype="float32")
    for f, u in zip(fused, _decode_steps(unpacked, True, "float32", prompt_lens, steps=2)):
        torch.testing.assert_close(f, u, rtol=1e-4, atol=1e-4)  # torch's GEMM on plain copies: fp32 rounding apart


@pytest.mark.skipif(not (packing_available("cpu", torch.bfloat16) or packing_available("cpu", torch.float32)),
                    reason="this torch build has no working oneDNN")
def test_memory_accounting_and_huge_pages_skip_the_opaque_copies(tiny, fp32_copies) -> None:
    from kiln.offload.huge_pages import weight_slots
    from kiln.offload.weight_offload import model_weight_tensors, unique_bytes

    # an fp32 model keeps fp32 copies here (the fixture); a bf16 one bf16 copies: whichever this CPU packs
    dtype = "bfloat16" if packing_available("cpu", torch.bfloat16) else "float32"
    _, model = _bf16_model(tiny.gguf["untied"], packed=True, dtype=dtype)
    tensors = model_weight_tensors(model)
    packed = [t for t in tensors if is_packed(t)]
    assert packed
    total = unique_bytes(tensors)
    plain = unique_bytes([t for t in tensors if not is_packed(t)])
    assert total == plain + sum(t.numel() * t.element_size() for t in packed)
    assert not any(is_packed(s[3]) for s in weight_slots(model))
