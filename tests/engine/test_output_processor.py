"""OutputProcessor without a model: every stop decision, what is kept of a multi-token step, text.

A toy tokenizer spells each id as a fixed piece, so stop strings can be placed across token
boundaries exactly.
"""

from __future__ import annotations

import pytest

from kiln.engine.output_processor import OutputProcessor
from kiln.request import Request, RequestStatus
from kiln.sampling_params import SamplingParams
from kiln.worker.model_runner import RunnerOutput

PIECES = ["<eos>", "a", "b", "c", "ST", "OP", " ", "x"]
EOS, A, B, C, ST, OP, SPACE, X = range(len(PIECES))


class Pieces:
    """decode(ids) = the pieces joined; <eos> is special."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(PIECES[i] for i in ids if not (skip_special_tokens and i == EOS))


def start(params: SamplingParams, rid: str = "r", prompt: tuple[int, ...] = (A, B), max_model_len: int = 64
          ) -> tuple[OutputProcessor, list[Request]]:
    proc = OutputProcessor(Pieces())
    n = params.n
    seqs = [Request(rid if n == 1 else f"{rid}#{i}", list(prompt), params, frozenset({EOS}),
                    max_model_len=max_model_len) for i in range(n)]
    proc.add_request(rid, None, list(prompt), seqs)
    return proc, seqs


def step(proc: OutputProcessor, tokens: dict[str, list[int]], logprobs=None):
    result = RunnerOutput(sampled=tokens, logprobs=logprobs or {})
    processed = proc.process(list(tokens), tokens, result)
    outputs, released = proc.make_outputs(processed)
    last = {o.request_id: o for o in outputs}  # a multi-token step streams one output per token: keep the last
    return processed, list(last.values()), released


@pytest.mark.parametrize("params, tokens, kept, status, reason", [
    (SamplingParams(max_tokens=10), [A, EOS, B], [A, EOS], RequestStatus.FINISHED_STOPPED, None),
    (SamplingParams(max_tokens=10, ignore_eos=True), [A, EOS, B], [A, EOS, B], None, None),
    (SamplingParams(max_tokens=10, min_tokens=3), [EOS, EOS, EOS, A], [EOS, EOS, EOS], RequestStatus.FINISHED_STOPPED, None),
    (SamplingParams(max_tokens=10, stop_token_ids=[C]), [A, C, B], [A, C], RequestStatus.FINISHED_STOPPED, C),
    (SamplingParams(max_tokens=2), [A, B, C], [A, B], RequestStatus.FINISHED_LENGTH, None),
])
def test_token_stops_cut_a_run_of_accepted_drafts_after_the_stopping_token(params, tokens, kept, status, reason) -> None:
    proc, (req,) = start(params)
    processed, (out,), released = step(proc, {"r": tokens})
    assert processed.kept == {"r": kept} and req.output_token_ids == kept
    assert processed.finished == ({"r": status} if status else {})
    assert out.outputs[0].token_ids == kept and out.finished == (status is not None)
    assert out.outputs[0].finish_reason == (status.finish_reason if status else None)
    assert out.outputs[0].stop_reason == reason
    assert released == (["r"] if status else []) and proc.has_unfinished() == (status is None)


def test_the_context_length_ends_a_sequence() -> None:
    proc, (req,) = start(SamplingParams(), max_model_len=5)
    processed, _, _ = step(proc, {"r": [A, B, C, A]})
    assert processed.kept == {"r": [A, B, C]} and processed.finished == {"r": RequestStatus.FINISHED_LENGTH}


def test_a_stop_string_across_tokens_cuts_the_text_and_drops_later_tokens() -> None:
    proc, _ = start(SamplingParams(max_tokens=10, stop=["TO"]))
    step(proc, {"r": [A, ST]})  # "aST": "T" could begin the stop string, so it is held back
    processed, (out,), _ = step(proc, {"r": [OP, B]})  # "aSTOPb": the stop string spans ST|OP
    o = out.outputs[0]
    assert processed.finished == {"r": RequestStatus.FINISHED_STOPPED}
    # B came in the same step (an accepted draft, a multi-step trip) after the token that completed the
    # stop string: single steps would never have produced it, so it is dropped
    assert o.text == "aS" and o.token_ids == [A, ST, OP] and processed.kept == {"r": [OP]}
    assert (o.finish_reason, o.stop_reason) == ("stop", "TO")


def test_include_stop_str_in_output_and_holdback_of_deltas() -> None:
    proc, _ = start(SamplingParams(max_tokens=10, stop=["TO"], include_stop_str_in_output=True))
    _, (first,), _ = step(proc, {"r": [A, ST]})
    assert first.outputs[0].delta_text == "aS"  # len("TO") - 1 = 1 character held back
    _, (out,), _ = step(proc, {"r": [OP, B]})
    assert out.outputs[0].text == "aSTO" and out.outputs[0].delta_text == "TO"


def test_a_stop_string_wins_over_a_token_stop_of_the_same_step() -> None:
    proc, _ = start(SamplingParams(max_tokens=2, stop=["b"]))
    processed, (out,), _ = step(proc, {"r": [A, B]})  # max_tokens and the stop string together
    assert processed.finished == {"r": RequestStatus.FINISHED_STOPPED}
    assert (out.outputs[0].finish_reason, out.outputs[0].stop_reason, out.outputs[0].text) == ("stop", "b", "a")


def test_n_sequences_finish_together_and_release_once() -> None:
    proc, seqs = start(SamplingParams(n=2, max_tokens=3))
    processed, (out,), released = step(proc, {"r#0": [A, EOS], "r#1": [A]})
    assert processed.finished == {"r#0": RequestStatus.FINISHED_STOPPED} and released == []
    assert [o.finish_reason for o in out.outputs] == ["stop", None] and not out.finished
    processed, (out,), released = step(proc, {"r#1": [B, C]})
    assert processed.finished == {"r#1": RequestStatus.FINISHED_LENGTH} and out.finished
    assert released == ["r#0", "r#1"] and not proc.has_unfinished() and not proc.seq_to_request


def test_logprobs_follow_the_kept_tokens() -> None:
    proc, _ = start(SamplingParams(max_tokens=2, logprobs=1))
    lps = {"r": [(-0.5, [(A, -0.5)]), (-1.0, [(A, -0.2)]), (-2.0, [])]}
    _, (out,), _ = step(proc, {"r": [A, B, C]}, lps)
    o = out.outputs[0]
    assert o.token_ids == [A, B] and o.logprobs == [{A: -0.5}, {A: -0.2, B: -1.0}]
    assert o.cumulative_logprob == pytest.approx(-1.5)


def test_a_failing_detokenizer_ends_only_its_sequence_with_an_error() -> None:
    class Broken(Pieces):
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            raise RuntimeError("boom")

    proc, _ = start(SamplingParams(max_tokens=5))
    proc.states["r"].sequences[0].detokenizer.tokenizer = Broken()
    good = Request("g", [A], SamplingParams(max_tokens=5), frozenset({EOS}))
    proc.add_request("g", None, [A], [good])
    processed, outs, _ = step(proc, {"r": [A], "g": [B]})
    assert processed.finished == {"r": RequestStatus.FINISHED_ERROR}
    by_id = {o.request_id: o for o in outs}
    assert by_id["r"].error == "RuntimeError: boom" and by_id["r"].outputs[0].finish_reason == "error"
    assert by_id["g"].outputs[0].text == "b" and not by_id["g"].finished


def test_unknown_and_aborted_sequences_are_skipped() -> None:
    proc, _ = start(SamplingParams(max_tokens=5))
    assert proc.abort_request("r") == ["r"] and proc.abort_request("r") == []
    processed, outs, _ = step(proc, {"r": [A], "other": [B]})
    assert processed.kept == {} and outs == []


def test_a_multi_token_step_streams_one_token_per_output() -> None:
    """A trip or accepted drafts bring several tokens in one step; streams still get them one at a time,
    exactly as single steps would have streamed them (the reference: the same tokens, one step each),
    with the stop-string holdback applied to each and the finish only on the last."""
    params = SamplingParams(max_tokens=10, stop=["TO"], logprobs=0)
    tokens, lps = [A, SPACE, ST, OP, B], [(-0.1, []), (-0.2, []), (-0.3, []), (-0.4, []), (-0.5, [])]

    def view(o):
        c = o.outputs[0]
        return c.delta_token_ids, c.delta_text, c.finish_reason, len(c.logprobs), o.finished

    proc, _ = start(params)
    processed = proc.process(["r"], {"r": tokens}, RunnerOutput(sampled={"r": tokens}, logprobs={"r": lps}))
    outputs, released = proc.make_outputs(processed)
    single, _ = start(params)
    reference = []
    for token, lp in zip(tokens, lps):
        if not single.has_unfinished():
            break
        done = single.process(["r"], {"r": [token]}, RunnerOutput(sampled={"r": [token]}, logprobs={"r": [lp]}))
        reference += [view(o) for o in single.make_outputs(done)[0]]  # viewed now: logprobs lists grow
    assert [view(o) for o in outputs] == reference
    assert len(outputs) == 4 and released == ["r"]  # "OP" completes "TO": B is dropped
    assert "".join(o.outputs[0].delta_text for o in outputs) == outputs[-1].outputs[0].text == "a S"
