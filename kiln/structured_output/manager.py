"""Per-sequence grammar matchers and the batch's token bitmask, filled while the model runs.

The runner calls `begin` just before the forward with every sampling row that has a grammar;
the matchers catch up on the tokens their sequence gained since the last step and fill one
bitmask row per sampling position on a helper thread (llguidance releases the GIL while it
computes a mask, benchmarks/grammar_engine_choice.py checks that), so the mask costs nothing
unless it takes longer than the forward. `PendingMasks.wait` joins it before sampling and returns
a float [rows, vocab] additive mask (0 where the grammar allows the token, -inf where it forbids
it), unpacked from the bitmask on the helper thread too (numpy), so the engine thread only adds it
(an add of this size costs ~0.2 ms where a boolean masked_fill measured ~6 ms, at batch 32).

Speculative rows: a sequence with k drafts gets k + 1 rows, the mask before each draft; the
matcher walks the drafts to fill them and is rolled back afterwards, so its state stays at the
sequence's final tokens. A draft the grammar refuses stops the walk: verification rejects it
there (its probability is 0 under the mask) and never reads the rows after it.

Invariants: a matcher has consumed exactly `consumed` of its sequence's output tokens; the helper
thread makes no torch call (the engine's one-torch-thread rule): it writes through raw pointers
and a numpy view of a tensor the engine thread allocated.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from kiln.structured_output.backend import GrammarBackend
from kiln.structured_output.params import StructuredOutputsParams


@dataclass(slots=True)
class GrammarRow:
    """One sampling sequence with a grammar: its bitmask rows start at `row` (1 + len(drafts) of them)."""

    seq_id: str
    spec: StructuredOutputsParams
    output_token_ids: list[int]
    drafts: list[int]
    row: int


@dataclass(slots=True)
class _SeqState:
    matcher: object | None  # llguidance.LLMatcher, made on the helper thread at the sequence's first step
    consumed: int = 0


class PendingMasks:
    """A bitmask being filled (and unpacked) on the helper thread."""

    def __init__(self, future: Future) -> None:
        self._future = future

    def wait(self) -> torch.Tensor:
        """float32 [rows, vocab]: 0 where the grammar allows the token, -inf where it forbids it
        (rows without a grammar: all 0)."""
        return self._future.result()


# byte value → the additive mask of its 8 tokens (bit i set: token 8k + i allowed → 0, else -inf)
_BYTE_TO_BIAS = np.where((np.arange(256)[:, None] >> np.arange(8)) & 1, 0.0, -np.inf).astype(np.float32)


def grammar_bias(bitmask: np.ndarray, vocab_size: int) -> np.ndarray:
    """int32 [rows, words] (bit b of word w allows token 32w + b) → float32 [rows, vocab_size] of 0 /
    -inf. The words are little-endian, so token t is bit t % 8 of byte t // 8."""
    rows = bitmask.shape[0]
    return _BYTE_TO_BIAS[bitmask.view(np.uint8)].reshape(rows, -1)[:, :vocab_size]


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [rows, words] → bool [rows, vocab_size], True = allowed (for tests and callers)."""
    return torch.from_numpy(np.ascontiguousarray(grammar_bias(bitmask.numpy(), vocab_size)) == 0)


class StructuredOutputManager:
    def __init__(self, backend: GrammarBackend) -> None:
        self.backend = backend
        self._seqs: dict[str, _SeqState] = {}
        self._pool: ThreadPoolExecutor | None = None

    def begin(self, rows: list[GrammarRow], num_rows: int) -> PendingMasks | None:
        """Start filling a [num_rows, words] bitmask for `rows` (the rest stay all-allowed)."""
        if not rows:
            return None
        view = np.full((num_rows, self.backend.mask_words), -1, dtype=np.int32)
        jobs = []
        for r in rows:
            state = self._seqs.setdefault(r.seq_id, _SeqState(None))
            new = r.output_token_ids[state.consumed:]
            state.consumed = len(r.output_token_ids)
            jobs.append((state, r, new))
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="kiln-grammar")
        return PendingMasks(self._pool.submit(self._fill, jobs, view))

    def remove(self, seq_ids: list[str]) -> None:
        for seq_id in seq_ids:
            self._seqs.pop(seq_id, None)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    # ---- helper thread ----------------------------------------------------------------
    def _fill(self, jobs: list[tuple[_SeqState, GrammarRow, list[int]]], view: np.ndarray) -> torch.Tensor:
        row_bytes = view.shape[1] * 4
        base = view.ctypes.data
        for state, r, new in jobs:
            if state.matcher is None:
                state.matcher = self.backend.matcher(r.spec)
            m = state.matcher
            for token in new:
                m.consume_token(token)  # type: ignore[attr-defined]
            walked = 0
            for j in range(len(r.drafts) + 1):
                self._fill_row(m, view, r.row + j, base + (r.row + j) * row_bytes, row_bytes)
                if j == len(r.drafts):
                    break
                d = r.drafts[j]
                if not (int(view[r.row + j, d >> 5]) >> (d & 31)) & 1 or not m.consume_token(d):  # type: ignore[attr-defined]
                    break
                walked += 1
            if walked:
                m.rollback(walked)  # type: ignore[attr-defined]
        # from_numpy shares the memory: no torch kernel runs on this thread
        return torch.from_numpy(np.ascontiguousarray(grammar_bias(view, self.backend.vocab_size)))

    def _fill_row(self, m: object, view: np.ndarray, row: int, ptr: int, nbytes: int) -> None:
        if m.is_error() or m.is_stopped():  # type: ignore[attr-defined]
            # A matcher that failed (a token it refused was forced in) or already finished lets the
            # sequence end: only end-of-sequence tokens are allowed.
            words = view.view(np.uint32)
            words[row] = 0
            for t in self.backend.eos_token_ids:
                words[row, t >> 5] |= np.uint32(1 << (t & 31))
            return
        m.unsafe_compute_mask_ptr(ptr, nbytes)  # type: ignore[attr-defined]
