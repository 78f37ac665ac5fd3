"""How many drafts each sequence verifies next: grown while drafts are accepted, cut where they miss.

Verifying k drafts is not free on a CPU: the block kernels' cost grows with the rows of a step (on
the default model, 9 rows cost ~3.7 decode steps: benchmarks/spec_decode.py, kiln's closing notes),
so a step whose drafts all miss costs several steps and yields one token. Acceptance comes in runs
(an n-gram draft copies a stretch of the prompt until the copy diverges), so each sequence keeps a
budget: after a step that accepted every draft it was given, the budget doubles (up to k); after a
rejection at draft a, it becomes max(1, a) — what the last step showed would have been accepted.
A replay of the code-editing trace with the measured step costs gave ~6 % more decode tokens per
second than always asking for k (benchmarks/spec_decode.py's workload, AMD EPYC, 2026-11-30).

Invariant: the budget only bounds how many drafts are verified; what is generated never depends on
it (verification is lossless).
"""

from __future__ import annotations


class DraftLengthPolicy:
    """Per-sequence draft budgets in [1, k]."""

    def __init__(self, k: int) -> None:
        if k < 1:
            raise ValueError(f"k must be at least 1, got {k}")
        self.k = k
        self._budget: dict[str, int] = {}

    def limit(self, request_id: str) -> int:
        """Drafts this sequence may verify next (a new sequence starts at half of k)."""
        return self._budget.get(request_id, max(1, self.k // 2))

    def update(self, request_id: str, proposed: int, accepted: int) -> None:
        """A step verified `proposed` drafts of this sequence and accepted `accepted` of them."""
        if proposed <= 0:
            return
        budget = self.limit(request_id)
        if accepted >= proposed:  # all accepted (the proposer may have offered fewer than the budget)
            self._budget[request_id] = min(self.k, max(budget, 2 * proposed))
        else:
            self._budget[request_id] = max(1, accepted)

    def free(self, request_id: str) -> None:
        self._budget.pop(request_id, None)
