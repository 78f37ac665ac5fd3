"""Sampling: unit tests on the sampler (tiny logits) and end-to-end on the real model."""

from __future__ import annotations

import math

import pytest
import torch

from kiln import LLM, SamplingParams
from kiln.sample.sampler import SampleRow, Sampler, apply_penalties, truncate_probs


def row(params: SamplingParams, prompt=(1,), output=(), seed_gen=None) -> SampleRow:
    return SampleRow(params, list(prompt), list(output), seed_gen, frozenset({0}))


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
     ({"top_k": -5}, "top_k"), ({"min_p": 2}, "min_p"), ({"presence_penalty": 3}, "presence_penalty"),
     ({"frequency_penalty": -3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
     ({"max_tokens": 0}, "max_tokens"), ({"min_tokens": -1}, "min_tokens"), ({"n": 0}, "n"),
     ({"logprobs": 50}, "logprobs"), ({"stop": [""]}, "stop"), ({"seed": 2**64}, "seed"), ({"seed": "7"}, "seed"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens")],
)
def test_invalid_params_name_the_field(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


def test_top_k_top_p_min_p_truncate() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    assert (truncate_probs(logits, SamplingParams(top_k=2)) > 0).sum() == 2
    probs = logits.softmax(-1)
    p = truncate_probs(logits, SamplingParams(top_p=float(probs[0] + 0.01)))
    assert (p > 0).sum() == 2  # the token crossing the threshold is kept
    p = truncate_probs(logits, SamplingParams(min_p=0.3))
    assert ((p > 0) == (probs >= 0.3 * probs.max())).all()
    assert math.isclose(float(p.sum()), 1.0, rel_tol=1e-6)


def test_penalties_follow_their_definitions() -> None:
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    out = apply_penalties(logits.clone(), [row(SamplingParams(repetition_penalty=2.0), prompt=[0, 1])])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5]]
    out = apply_penalties(logits.clone(), [row(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
                                               output=[2, 2, 3])])
    assert out.tolist() == [[2.0, -2.0, 1.0 - 1.0 - 0.25, 0.5 - 0.5 - 0.25]]


def test_seeded_sampling_is_independent_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 100)
    params = SamplingParams(temperature=1.0, seed=42)
    alone = Sampler()(logits[2:3].clone(), [row(params, seed_gen=torch.Generator().manual_seed(42))]).token_ids
    rows = [row(SamplingParams(temperature=1.0)) for _ in range(4)]
    rows[2] = row(params, seed_gen=torch.Generator().manual_seed(42))
    batched = Sampler()(logits.clone(), rows).token_ids
    assert batched[2] == alone[0]


def test_min_tokens_blocks_eos() -> None:
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    out = Sampler()(logits.clone(), [row(SamplingParams(temperature=0, min_tokens=2), output=[1])])
    assert out.token_ids != [0]


# ---- end to end on the real model ---------------------------------------------------------

@pytest.mark.real_model
def test_same_seed_same_text_whatever_the_batch(llm_fp32: LLM) -> None:
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24)
    prompt = "Write a short poem about the sea."
    alone = llm_fp32.generate([prompt], params)[0].outputs[0].text
    others = [f"Tell me fact number {i} about cats." for i in range(5)]
    batch = llm_fp32.generate(others[:2] + [prompt] + others[2:], SamplingParams(temperature=1.0, max_tokens=24))
    mixed = llm_fp32.generate(others[:2] + [prompt] + others[2:],
                              [SamplingParams(temperature=1.0, max_tokens=24)] * 2 + [params] + [SamplingParams(temperature=1.0, max_tokens=24)] * 3)
    assert mixed[2].outputs[0].text == alone
    assert len(batch) == 6


@pytest.mark.real_model
def test_top_k_1_equals_greedy(llm_fp32: LLM) -> None:
    prompts = ["The three primary colors are", "import numpy as np\n"]
    greedy = llm_fp32.generate(prompts, SamplingParams(temperature=0, max_tokens=20))
    topk1 = llm_fp32.generate(prompts, SamplingParams(temperature=1.3, top_k=1, max_tokens=20, seed=3))
    assert [o.outputs[0].token_ids for o in greedy] == [o.outputs[0].token_ids for o in topk1]


@pytest.mark.real_model
def test_stop_string_split_across_tokens_is_caught_and_cut(llm_fp32: LLM) -> None:
    prompt = "Count from one to ten in words: one, two, three,"
    full = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
    text = full.text
    # pick a stop string that starts inside one token and ends inside a later one
    pieces = [llm_fp32.tokenizer.decode([t]) for t in full.token_ids]
    boundary = len(pieces[0]) + len(pieces[1])
    stop = text[boundary - 2: boundary + 2]
    assert len(stop) == 4 and stop in text
    out = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = llm_fp32.generate([prompt], SamplingParams(temperature=0, max_tokens=30, stop=[stop],
                                                      include_stop_str_in_output=True))[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]


@pytest.mark.real_model
def test_streamed_deltas_never_show_a_stop_string(llm_fp32: LLM) -> None:
    prompt = "Count from one to ten in words: one, two, three,"
    params = SamplingParams(temperature=0, max_tokens=30, stop=["six"])
    deltas = [o.outputs[0].delta_text for o in llm_fp32.generate_stream(prompt, params)]
    final = llm_fp32.generate([prompt], params)[0].outputs[0].text
    assert "".join(deltas) == final and "six" not in final


@pytest.mark.real_model
def test_logprobs_are_sane(llm_fp32: LLM) -> None:
    out = llm_fp32.generate(["The sky is"], SamplingParams(temperature=0, max_tokens=8, logprobs=3,
                                                           prompt_logprobs=2))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == len(comp.token_ids)
    for token, entry in zip(comp.token_ids, comp.logprobs):
        assert all(v <= 0 for v in entry.values())
        top_token = max(entry, key=entry.get)
        assert top_token == token  # greedy: the sampled token is the top-1
        assert sum(math.exp(v) for v in entry.values()) <= 1.0 + 1e-5  # top-n mass of one distribution
    assert comp.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(comp.token_ids, comp.logprobs)))
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(out.prompt_token_ids)
    assert all(v <= 0 for entry in out.prompt_logprobs[1:] for v in entry.values())


@pytest.mark.real_model
def test_stop_token_ids_and_max_tokens(llm_fp32: LLM) -> None:
    out = llm_fp32.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0].outputs[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 5
    stop_tok = out.token_ids[2]
    out2 = llm_fp32.generate(["Hello"], SamplingParams(temperature=0, max_tokens=5, stop_token_ids=[stop_tok]))[0]
    first = out2.outputs[0].token_ids
    assert first[-1] == stop_tok and out2.outputs[0].finish_reason == "stop" and out2.outputs[0].stop_reason == stop_tok


def test_greedy_tokens_equal_argmax_with_ties_and_nan() -> None:
    from kiln.sample.sampler import greedy_tokens

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 49152, generator=g)
    logits[3, [7, 9000, 40000]] = 50.0  # a three-way tie: the first index wins
    logits[5] = 0.0  # all equal
    logits[8, 123] = float("nan")  # NaN counts as the largest, as in argmax
    logits[9, 17] = float("inf")
    assert greedy_tokens(logits) == logits.argmax(-1).tolist()
    assert greedy_tokens(logits)[3] == 7 and greedy_tokens(logits)[5] == 0 and greedy_tokens(logits)[8] == 123
