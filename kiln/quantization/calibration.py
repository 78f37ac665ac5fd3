"""Calibration text → token windows → per-layer input statistics.

Each quantization method needs something different from the activations entering a Linear:
GPTQ the Hessian Σ x xᵀ, AWQ the mean |x| per channel and a sample of rows, SmoothQuant the
max |x| per channel. One pass of the full-precision model over the calibration windows gathers
whatever was asked, through forward pre-hooks (inputs are never modified).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from kiln.data import CALIBRATION_TEXT, data_path
from kiln.errors import KilnError
from kiln.eval.forward import window_hidden
from kiln.layers.linear import Linear

AWQ_SAMPLE_ROWS = 512


def read_calibration_text(path: Path | str | None) -> str:
    """The text to calibrate on: `path`, or by default the Pride and Prejudice shipped in kiln.data
    (never the evaluation text, so held-out figures stay held out)."""
    if path is None:
        path = data_path(CALIBRATION_TEXT)
    p = Path(path)
    if not p.is_file():
        raise KilnError(f"calibration file {p} not found; pass --calib-file with a plain-text file")
    text = gutenberg_body(p.read_text(encoding="utf-8", errors="replace"))
    if len(text) < 1000:
        raise KilnError(f"calibration file {p} is too short ({len(text)} characters); give a longer text")
    return text


def gutenberg_body(text: str) -> str:
    """The book between Project Gutenberg's START/END markers (the licence text is not prose to calibrate on)."""
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start != -1 and end > start:
        return text[text.index("\n", start) + 1:end]
    return text


def token_windows(token_ids: list[int], count: int, seqlen: int, start: int = 0, stop: int | None = None) -> list[list[int]]:
    """`count` windows of `seqlen` tokens spread evenly over token_ids[start:stop] (deterministic)."""
    ids = token_ids[start:stop]
    if count <= 0 or seqlen <= 1:
        raise ValueError("calibration needs at least one window of at least 2 tokens")
    if len(ids) < seqlen:
        raise KilnError(f"calibration text has {len(ids)} tokens, fewer than one window of {seqlen}")
    span = len(ids) - seqlen
    starts = [round(i * span / max(count - 1, 1)) for i in range(count)] if count > 1 else [0]
    return [ids[s:s + seqlen] for s in starts]


@dataclass
class LayerStats:
    """Accumulated statistics of one Linear's inputs (fp32)."""

    rows: int = 0
    hessian: torch.Tensor | None = None  # Σ x xᵀ (divide by rows for the mean)
    abs_sum: torch.Tensor | None = None  # Σ |x| per channel
    abs_max: torch.Tensor | None = None  # max |x| per channel
    sample: list[torch.Tensor] = field(default_factory=list)  # rows kept for AWQ's search

    def absmean(self) -> torch.Tensor:
        assert self.abs_sum is not None
        return self.abs_sum / max(self.rows, 1)

    def mean_hessian(self) -> torch.Tensor:
        assert self.hessian is not None
        return 2.0 * self.hessian / max(self.rows, 1)

    def sample_rows(self) -> torch.Tensor:
        return torch.cat(self.sample)[:AWQ_SAMPLE_ROWS]


def target_linears(model: nn.Module) -> dict[str, Linear]:
    """The Linears inside decoder layers (attention and MLP): what every method quantizes.
    Embeddings, norms and the LM head keep full precision."""
    return {name: m for name, m in model.named_modules() if isinstance(m, Linear) and name.startswith("layers.")}


def accumulate(st: LayerStats, x: torch.Tensor, hessian: bool, absmean: bool, absmax: bool, sample_rows: int,
               generator: torch.Generator, first_token_weight: float = 1.0) -> None:
    """Add one window's inputs of a Linear, `x` [T, K] in position order, to `st` (only the statistics
    asked for); `sample_rows` random rows of it join AWQ's sample.

    `first_token_weight` counts position 0 that many times in the Hessian. Why: the first token is the
    attention sink, whose keys and values every later token reads with a large share of its attention,
    so an error there reaches the whole window; as one row in T, plain GPTQ trades its accuracy away
    (measured on SmolLM2, layer 15 qkv_proj: 3.7x RTN's relative error on position 0 at weight 1,
    50x below RTN's at weight 64, the other positions' error unchanged)."""
    x = x.detach().float().reshape(-1, x.shape[-1])
    st.rows += x.shape[0]
    if hessian:
        st.hessian = x.t() @ x if st.hessian is None else st.hessian.addmm_(x.t(), x)
        if first_token_weight != 1.0:
            st.hessian.addr_(x[0], x[0], alpha=first_token_weight - 1.0)
    if absmean:
        a = x.abs().sum(0)
        st.abs_sum = a if st.abs_sum is None else st.abs_sum + a
        # Position 0 (the attention sink, where SmolLM2's massive activations live) is always in the
        # sample: AWQ's searches otherwise almost never see it and clip the weights it depends on.
        idx = torch.randperm(x.shape[0], generator=generator)[:sample_rows]
        idx = torch.cat([idx.new_zeros(1), idx[idx != 0]])[:sample_rows]
        st.sample.append(x[idx].clone())
    if absmax:
        m = x.abs().amax(0)
        st.abs_max = m if st.abs_max is None else torch.maximum(st.abs_max, m)


def collect_stats(
    model: nn.Module, windows: list[list[int]], hessian: bool = False, absmean: bool = False, absmax: bool = False,
    progress: bool = True, first_token_weight: float = 1.0,
) -> dict[str, LayerStats]:
    """Run the model over `windows` and accumulate the requested statistics for every target Linear."""
    layers = target_linears(model)
    stats = {name: LayerStats() for name in layers}
    per_window = max(AWQ_SAMPLE_ROWS // max(len(windows), 1), 1)
    generator = torch.Generator().manual_seed(0)

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            accumulate(stats[name], args[0], hessian, absmean, absmax, per_window, generator, first_token_weight)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        iterator = _progress(windows, "calibrating", progress)
        for window in iterator:
            window_hidden(model, window)
    finally:
        for h in handles:
            h.remove()
    return stats


def _progress(items: list, desc: str, enabled: bool, unit: str = "window"):
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit=unit, leave=False)
