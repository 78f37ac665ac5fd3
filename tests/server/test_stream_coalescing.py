"""A streaming consumer that falls behind the engine merges what has queued up: every token
arrives exactly once, in order, cumulative fields come from the newest output, and a finished
output is always the last of its request."""

from __future__ import annotations

import asyncio

import pytest

from kiln.entrypoints.openai.serving_common import outputs
from kiln.outputs import CompletionOutput, RequestOutput, coalesce_outputs, merge_request_outputs


def step_output(rid: str, tokens: list[int], new: int, finish: str | None = None, n: int = 1) -> RequestOutput:
    """The output of one engine step: `tokens` so far, the last `new` of them new this step."""
    outs = [
        CompletionOutput(index=i, text="".join(f"<{t}>" for t in tokens), token_ids=list(tokens),
                         finish_reason=finish, delta_text="".join(f"<{t}>" for t in tokens[len(tokens) - new:]),
                         delta_token_ids=list(tokens[len(tokens) - new:]))
        for i in range(n)
    ]
    return RequestOutput(rid, "p", [1, 2], outs, finished=finish is not None)


def test_merge_concatenates_deltas_and_keeps_the_newest_cumulative_fields() -> None:
    a = step_output("r", [5], 1)
    b = step_output("r", [5, 6, 7], 2, finish="length", n=1)
    m = merge_request_outputs(a, b)
    o = m.outputs[0]
    assert o.delta_token_ids == [5, 6, 7] and o.delta_text == "<5><6><7>"
    assert o.token_ids == [5, 6, 7] and o.finish_reason == "length" and m.finished


def test_merging_after_a_finished_output_or_across_requests_is_refused() -> None:
    with pytest.raises(ValueError, match="consecutive"):
        merge_request_outputs(step_output("r", [5], 1, finish="stop"), step_output("r", [5, 6], 1))
    with pytest.raises(ValueError, match="consecutive"):
        merge_request_outputs(step_output("a", [5], 1), step_output("b", [6], 1))


def test_coalesce_merges_per_request_and_keeps_every_token() -> None:
    pending = [step_output("a", [1], 1, n=2), step_output("b", [9], 1), step_output("a", [1, 2], 1, n=2),
               step_output("b", [9, 8], 1, finish="stop"), step_output("a", [1, 2, 3], 1, n=2)]
    merged = coalesce_outputs(pending)
    assert [m.request_id for m in merged] == ["a", "b"]
    assert [o.delta_token_ids for o in merged[0].outputs] == [[1, 2, 3], [1, 2, 3]]
    assert merged[1].outputs[0].delta_token_ids == [9, 8] and merged[1].finished


class _RecordingEngine:
    def __init__(self) -> None:
        self.aborted: list[str] = []

    def abort(self, rid: str) -> None:
        self.aborted.append(rid)


class _Ctx:
    def __init__(self) -> None:
        self.engine = _RecordingEngine()


def test_a_lagging_consumer_gets_one_merged_output_per_request() -> None:
    async def run() -> tuple[list[RequestOutput], list[str]]:
        queue: asyncio.Queue = asyncio.Queue()
        for out in (step_output("a", [1], 1), step_output("a", [1, 2], 1), step_output("a", [1, 2, 3], 1, "stop")):
            queue.put_nowait(out)  # three engine steps queued before the consumer ran
        ctx = _Ctx()
        got = [out async for out in outputs(ctx, queue, ["a"])]
        return got, ctx.engine.aborted

    got, aborted = asyncio.run(run())
    assert len(got) == 1 and got[0].finished
    assert got[0].outputs[0].delta_token_ids == [1, 2, 3] and got[0].outputs[0].delta_text == "<1><2><3>"
    assert aborted == []  # finished normally: nothing to abort


def test_one_steps_outputs_stay_one_per_token_and_later_steps_merge() -> None:
    """A multi-step trip makes one output per token, all of one engine step: the consumer is not behind,
    so each stays its own chunk; outputs of different steps queued together are merged as before."""
    trip = [step_output("a", [1, 2, 3][:i], 1) for i in (1, 2, 3)]
    for out in trip:
        out.engine_step = 7
    assert coalesce_outputs(trip) == trip
    later = step_output("a", [1, 2, 3, 4], 1)
    later.engine_step = 8
    merged = coalesce_outputs(trip + [later])
    assert len(merged) == 1 and merged[0].outputs[0].delta_token_ids == [1, 2, 3, 4]
