"""Loading the default model under a budget of a third of its file keeps the load's memory peak near the budget.

Measured in fresh processes (kiln.loader.load_peak: VmHWM after the load minus the resident set after
imports, with the peak reset in between). The bound the streamed load must meet, and why each term:
- the vocabulary's share, measured here in its own process: the header reader's metadata and the tokenizer
  built from it (the same for any load path and any budget);
- the budget: the fixed part and the resident layers, which the load keeps by design;
- the largest decoder layer: one layer is materialized in RAM before it moves into the spill file;
- 16 MiB: the RoPE tables with their fp64 intermediates (~8 MiB at 8,192 positions) and one pack chunk's
  copies (4,096 rows of the 49,152-row head, ~7 MiB).
The negative control is the eager path (load fully, then move the layers): the same measurement must break
the bound, so the bound is one that catches the old behaviour.
"""

from __future__ import annotations

import pytest

from kiln.hub import pull
from kiln.loader.load_peak import measure_load_peak

pytestmark = pytest.mark.real_model

MIB = 1 << 20
SLACK = 16 * MIB


def test_streamed_load_peak_stays_near_the_budget(tmp_path) -> None:
    path = pull("smollm2-135m")
    budget = path.stat().st_size // 3
    vocabulary = measure_load_peak(path, tokenizer_only=True)["load_peak_bytes"]
    streamed = measure_load_peak(path, budget, streamed=True, directory=tmp_path)
    eager = measure_load_peak(path, budget, streamed=False, directory=tmp_path)
    resident_model = measure_load_peak(path, 0, quantized_weights="native")  # no budget: blocks + dense table
    weights = streamed["weights_resident_bytes"] + streamed["weights_mapped_bytes"]  # every weight, kiln's layout
    bound = vocabulary + budget + streamed["largest_layer_bytes"] + SLACK
    print(f"\nload peak (VmHWM - baseline): streamed {streamed['load_peak_bytes'] / MIB:.1f} MiB, eager "
          f"{eager['load_peak_bytes'] / MIB:.1f} MiB, no budget (native) {resident_model['load_peak_bytes'] / MIB:.1f} "
          f"MiB; bound {bound / MIB:.1f} MiB = vocabulary {vocabulary / MIB:.1f} + budget {budget / MIB:.1f} + layer "
          f"{streamed['largest_layer_bytes'] / MIB:.1f} + {SLACK // MIB}; weights resident+mapped {weights / MIB:.1f} "
          f"MiB (no budget: {resident_model['weights_resident_bytes'] / MIB:.1f} MiB resident)")
    assert streamed["load_peak_bytes"] <= bound
    assert streamed["load_peak_bytes"] < weights  # never as much as one whole copy of the weights in RAM
    assert eager["load_peak_bytes"] > bound  # negative control: the old path breaks the bound
    assert resident_model["load_peak_bytes"] > bound
    # both paths decided the same split
    for key in ("weights_resident_bytes", "weights_mapped_bytes", "spilled_layers"):
        assert streamed[key] == eager[key], key
    assert streamed["spilled_layers"] >= 29


def test_lean_reader_reads_the_default_model_as_the_gguf_library_does() -> None:
    from offload.test_streamed_load import check_lean_reader

    check_lean_reader(pull("smollm2-135m"))
