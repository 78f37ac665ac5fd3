"""The one interface every draft proposer implements.

A proposer guesses the next tokens of several sequences at once; the engine's SpecDecoder asks it
once per step for the sequences that may speculate, and tells it when a sequence leaves.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

# request id → (the sequence's final tokens so far, prompt included; the most drafts wanted)
ProposalRequests = Mapping[str, tuple[list[int], int]]


class Proposer(Protocol):
    """propose({request_id: (token_ids, k)}) → {request_id: drafts}; free(request_id) when a sequence ends.

    Invariants the SpecDecoder relies on:
    * each answer holds at most k tokens, and proposing never changes the token lists it is given;
    * a request id missing from the answer gets no drafts this step (e.g. the proposer ran out of
      its own memory) and keeps whatever drafts it already had; an empty list clears them;
    * drafts are a deterministic function of the tokens (the verifier treats the proposal
      distribution as one-hot, which is what keeps verification lossless);
    * `free` of an unknown id is a no-op, and after `free` nothing of that id is held.
    """

    def propose(self, requests: ProposalRequests) -> dict[str, list[int]]: ...

    def free(self, request_id: str) -> None: ...
