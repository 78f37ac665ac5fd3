"""`kiln bench latency --profile` files every native kernel's time under an op family."""

from __future__ import annotations

import re
from pathlib import Path

from kiln.bench.profile import OP_FAMILIES

CSRC = Path(__file__).resolve().parents[1] / "kiln" / "kernels" / "csrc"
# ops that answer a question about the build or set / read a process-wide setting, and take no tensor:
# no compute to attribute
QUERIES = {"quant_simd_level", "paged_prefill_supported", "set_activation_bits", "activation_bits"}


def test_every_native_kernel_has_an_op_family() -> None:
    defined = {name for src in CSRC.glob("*.cpp") for name in re.findall(r'm\.def\("(\w+)\(', src.read_text())}
    assert "paged_prefill_attention" in defined  # the parse found the schema strings
    missing = sorted(f"kiln::{name}" for name in defined - QUERIES if f"kiln::{name}" not in OP_FAMILIES)
    assert not missing, f"add these ops to kiln.bench.profile.OP_FAMILIES: {missing}"
