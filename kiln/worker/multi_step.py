"""Multi-step decode: several decode steps of one all-decode batch per engine step.

A single-stream decode step of the default model costs ~7 ms, of which ~0.9 ms is Python around the
native decoder stack: scheduling, building the flat batch and its attention metadata, the sampler's
generality, output processing (tools: `kiln bench latency --profile`, benchmarks/results). When every
sequence of a batch decodes and nothing waits, none of that changes from one step to the next except
each sequence's position and last token, so this module runs up to k steps in one tight loop: the
model's trip step (`trip_stepper`: embedding → its fused native decoder stack, kiln.kernels.decode_step
or Gemma 3's) → LM head → sample, with the block tables (one per KV group of a hybrid sliding-window
cache), the KV cache lists and the per-row sampling state built once per trip. A hybrid cache frees
no sliding-window block during a trip (the next allocation does): its tables stay valid throughout.

Invariant (tested token for token): a trip of k steps produces exactly the tokens k single engine
steps produce, seeded sampling included. It calls the same ops in the same order on the same rows:
the model's own embedding, the runner's `_compute_logits`, the same plan, the sampler's own `greedy_tokens`,
`truncate_probs` and `draw` with each request's generator (unseeded rows draw from torch's global
generator in row order, as single steps do). The caller (kiln.engine.multi_step) only sends batches
this holds for: one decode token each, no drafts, no logprobs, penalties, logit_bias, grammar or
pending min_tokens, and block tables that already cover the trip's k tokens (lookahead slots).

A trip ends early after a step in which some row sampled a stop token (EOS unless ignored,
`stop_token_ids`): the batch would change; and after any step once the engine's `interrupt` says a
request arrived or was aborted (the async engine's command queue), so neither waits more than a step. Stop strings are found afterwards by the output processor,
which drops whatever follows them, as it does for accepted speculative drafts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from kiln.core.scheduler import ScheduledRequest
from kiln.sample.sampler import draw, greedy_tokens, truncate_probs

if TYPE_CHECKING:
    from kiln.worker.model_runner import ModelRunner, RunnerOutput

def _stop_tokens(item: ScheduledRequest) -> frozenset[int]:
    params = item.request.sampling_params
    stops = set(params.stop_token_ids or ())
    if not params.ignore_eos:
        stops |= item.request.eos_token_ids
    return frozenset(stops)


def run_trip(runner: "ModelRunner", items: list[ScheduledRequest], num_steps: int,
             interrupt: Callable[[], bool] | None = None) -> "RunnerOutput":
    """Up to `num_steps` decode steps of `items` (each decoding its last known token at `item.start`,
    with block ids covering start + num_steps tokens) → each request's sampled tokens, in order, all
    rows the same count. The trip stops early after a step where a row sampled a stop token, or where
    `interrupt()` says the engine has news (a new request, an abort): those wait one step at most."""
    from kiln.worker.model_runner import RunnerOutput

    step = runner.trip_step()  # the cache lists and the plan's layout, taken once
    if step is None:
        raise RuntimeError("multi-step decode needs the model's fused trip step (kiln.engine.multi_step checks this)")
    device, bs = runner.device, runner.block_size
    T = len(items)
    # per item, per KV group (a plain cache is one group); every group's table has the same length
    tables = [item.block_ids if runner.layer_group is not None else [item.block_ids] for item in items]
    num_groups = len(tables[0])
    block_tables = []
    for g in range(num_groups):
        width = max(len(t[g]) for t in tables)
        block_tables.append(torch.tensor([t[g] + [0] * (width - len(t[g])) for t in tables], dtype=torch.int32,
                                         device=device))
    positions = [item.start for item in items]
    tokens = [item.request.all_token_ids[item.start] for item in items]
    rows = [(item.request.sampling_params, runner._generator(item)) for item in items]
    all_greedy = all(params.greedy for params, _ in rows)
    stops = [_stop_tokens(item) for item in items]
    sampled: list[list[int]] = [[] for _ in items]
    all_rows = list(range(T))
    for _ in range(num_steps):
        pos = torch.tensor(positions, dtype=torch.long, device=device)
        slots = [torch.tensor([t[g][p // bs] * bs + p % bs for t, p in zip(tables, positions)], dtype=torch.long,
                              device=device) for g in range(num_groups)]
        seq_lens = torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device)
        hidden = step(torch.tensor(tokens, dtype=torch.long, device=device), pos, slots, block_tables, seq_lens)
        logits = runner._compute_logits(hidden, all_rows)  # the single step's own logits path
        if all_greedy:
            tokens = greedy_tokens(logits)
        else:
            greedy_idx = [i for i, (params, _) in enumerate(rows) if params.greedy]
            tokens = [0] * T
            if greedy_idx:
                for i, t in zip(greedy_idx, greedy_tokens(logits[greedy_idx] if len(greedy_idx) < T else logits)):
                    tokens[i] = t
            for i, (params, generator) in enumerate(rows):
                if not params.greedy:
                    tokens[i] = draw(truncate_probs(logits[i], params), generator)
        stop = False
        for i, t in enumerate(tokens):
            sampled[i].append(t)
            stop = stop or t in stops[i]
        if stop or (interrupt is not None and interrupt()):
            break
        positions = [p + 1 for p in positions]
    out = RunnerOutput()
    for item, toks in zip(items, sampled):
        out.sampled[item.request.request_id] = toks
    return out
