"""Prompt-lookup (n-gram) proposer: continue the text the way it continued last time.

The last n tokens of a sequence (n from `ngram_max` down to `ngram_min`) are looked up in the
sequence's own earlier tokens (prompt and output); the tokens that followed the most recent
earlier match become the draft. Costs no model forward, so it pays whenever text repeats
(code edits, summaries quoting their source, structured output).
"""

from __future__ import annotations

from kiln.spec_decode.proposer import ProposalRequests


class NgramProposer:
    """A `Proposer` that holds no per-sequence state: every request id gets an answer (maybe [])."""

    def __init__(self, ngram_min: int = 1, ngram_max: int = 4) -> None:
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: ProposalRequests) -> dict[str, list[int]]:
        return {rid: self.lookup(tokens, k) for rid, (tokens, k) in requests.items()}

    def free(self, request_id: str) -> None:
        """Nothing is kept per sequence."""

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the most recent earlier occurrence of the longest suffix."""
        length = len(tokens)
        if k <= 0:
            return []
        for n in range(min(self.ngram_max, length - 1), self.ngram_min - 1, -1):
            pattern = tokens[length - n:]
            first = pattern[0]
            # most recent earlier occurrence whose continuation is not the pattern itself
            for start in range(length - n - 1, -1, -1):
                if tokens[start] == first and tokens[start:start + n] == pattern:
                    return tokens[start + n:start + n + k]
        return []
