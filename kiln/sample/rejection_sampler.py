"""Rejection sampling: lossless verification of draft tokens against the target model's distributions.

For one sequence with k drafts the target forward gives k + 1 rows of logits: row j is the
distribution of the token after (context + drafts[:j]). Each row goes through exactly the
processing ordinary sampling applies (min_tokens, penalties with that row's context,
temperature, top-k/p, min-p), so the accepted tokens follow the target's distribution:

* greedy: accept drafts while they equal the row's argmax; the first mismatch is replaced by
  the argmax (or, all accepted, the last row's argmax is a bonus token);
* sampling: the proposer is deterministic (q = one-hot on the draft x), so x is accepted with
  probability min(1, p(x) / q(x)) = p(x); on rejection the token is drawn from
  normalize(max(0, p - q)) = p with x removed; all accepted, a bonus token is drawn from row k.
"""

from __future__ import annotations

import torch

from kiln.sample.sampler import SampleRow, draw, greedy_tokens, process_logits, truncate_probs


def verify_drafts(logits: torch.Tensor, rows: list[SampleRow], drafts: list[int], grammar: torch.Tensor | None = None
                  ) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]] | None]]:
    """logits [k+1, V] fp32 (modified in place), one SampleRow per position → accepted tokens
    (1 .. k+1 of them) and their logprobs (raw model distribution, like ordinary sampling).
    `grammar` (float [k+1, V] or None): 0 / -inf, the grammar's mask at each position; a draft it forbids
    has probability 0 there, so it is rejected and replaced by a token the grammar allows."""
    k = len(drafts)
    assert logits.shape[0] == k + 1 == len(rows), "one row of logits per draft plus one"
    params = rows[0].params
    n_logprobs = params.logprobs
    raw = torch.log_softmax(logits, dim=-1) if n_logprobs is not None else None
    logits = process_logits(logits, rows, grammar)
    accepted: list[int] = []
    if params.greedy:
        target = greedy_tokens(logits)
        for j in range(k):
            accepted.append(target[j])
            if target[j] != drafts[j]:
                break
        else:
            accepted.append(target[k])
    else:
        gen = rows[0].generator
        for j in range(k + 1):
            probs = truncate_probs(logits[j], params)
            if j == k:
                accepted.append(draw(probs, gen))  # bonus token
                break
            x = drafts[j]
            u = float(torch.rand((), generator=gen))
            if u < float(probs[x]):
                accepted.append(x)
                continue
            residual = probs.clone()
            residual[x] = 0.0
            total = float(residual.sum())
            # p(x) == 1 cannot be rejected (u < 1), so the residual has mass
            accepted.append(draw(residual / total, gen))
            break
    logprobs: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(accepted)
    if raw is not None:
        for j, token in enumerate(accepted):
            top = torch.topk(raw[j], n_logprobs) if n_logprobs > 0 else None
            top_list = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
            logprobs[j] = (float(raw[j, token]), top_list)
    return accepted, logprobs
