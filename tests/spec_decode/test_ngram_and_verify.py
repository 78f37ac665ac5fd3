"""n-gram proposer and lossless draft verification, checked against their definitions."""

from __future__ import annotations

import pytest
import torch

from kiln.config import SpeculativeConfig
from kiln.sample.sampler import SampleRow, truncate_probs
from kiln.sampling_params import SamplingParams
from kiln.spec_decode.ngram_proposer import NgramProposer
from kiln.sample.rejection_sampler import verify_drafts


def test_ngram_prefers_the_longest_most_recent_match() -> None:
    p = NgramProposer(1, 3)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 1, 2, 9, 6, 7, 8, 4, 6, 7]
    # suffix [6, 7] (n=2) occurs at 1 and 6; the most recent (6) continues with 8, 4
    assert p.lookup(tokens, 2) == [8, 4]
    assert p.lookup(tokens, 10) == [8, 4, 6, 7]  # stops at the end of the sequence
    assert p.lookup([1, 2, 3], 4) == []  # nothing repeats
    assert p.lookup(tokens, 0) == []
    assert NgramProposer(3, 3).lookup([1, 2, 3, 9, 2, 3], 2) == []  # n=3 required, only n=2 repeats


def test_ngram_answers_every_request_of_a_batch() -> None:
    """The batched Proposer interface: one answer per request id, [] where nothing repeats."""
    p = NgramProposer(1, 3)
    tokens = [5, 6, 7, 1, 2, 9, 6, 7, 8, 4, 6, 7]
    assert p.propose({"a": (tokens, 2), "b": ([1, 2, 3], 4), "c": (tokens, 0)}) == {"a": [8, 4], "b": [], "c": []}
    p.free("a")  # holds nothing per request: a no-op, unknown ids included
    p.free("never-seen")


@pytest.mark.parametrize("kwargs", [{"method": "eagle"}, {"num_speculative_tokens": 0}, {"ngram_min": 3, "ngram_max": 2}])
def test_bad_speculative_config_names_the_field(kwargs) -> None:
    with pytest.raises(ValueError):
        SpeculativeConfig(**kwargs)


def rows_for(params: SamplingParams, n: int, gen: torch.Generator | None = None) -> list[SampleRow]:
    return [SampleRow(params, [1], [], gen, frozenset()) for _ in range(n)]


def test_greedy_accepts_the_agreeing_prefix_then_corrects() -> None:
    logits = torch.full((4, 10), -5.0)
    for row, best in enumerate([3, 4, 7, 2]):
        logits[row, best] = 5.0
    params = SamplingParams(temperature=0)
    assert verify_drafts(logits.clone(), rows_for(params, 4), [3, 4, 5])[0] == [3, 4, 7]  # third draft wrong
    assert verify_drafts(logits.clone(), rows_for(params, 4), [3, 4, 7])[0] == [3, 4, 7, 2]  # all + bonus
    assert verify_drafts(logits.clone(), rows_for(params, 4), [0, 4, 7])[0] == [3]


@pytest.mark.parametrize("draft", [0, 2, 4, 5])
def test_sampled_verification_keeps_the_target_distribution(draft: int) -> None:
    """Empirical distribution of the first emitted token == the target's processed p (top-k
    included), whatever the (deterministic) draft was — including drafts the target rarely or
    never picks: the rejection rule is lossless. 20,000 draws, chi-square at p = 0.01."""
    torch.manual_seed(0)
    base = torch.tensor([[1.0, 0.2, -0.5, 0.7, 0.1, -3.0], [0.0] * 6])
    params = SamplingParams(temperature=0.8, top_k=5)
    p = truncate_probs(base[0].clone(), params)
    gen = torch.Generator().manual_seed(1234)
    trials = 20000
    counts = torch.zeros(6)
    for _ in range(trials):
        tokens, _ = verify_drafts(base.clone(), rows_for(params, 2, gen), [draft])
        counts[tokens[0]] += 1
    assert counts[5] == 0  # cut by top_k
    # Pearson chi-square over the 5 kept tokens (4 degrees of freedom): the 1% critical value
    # is 13.277, so the test fails when the distribution is off with p < 0.01.
    expected = p[:5] * trials
    chi2 = float(((counts[:5] - expected) ** 2 / expected).sum())
    assert chi2 < 13.277, (chi2, counts / trials, p)


def test_logprobs_cover_every_accepted_token() -> None:
    logits = torch.randn(3, 8)
    params = SamplingParams(temperature=0, logprobs=2)
    target = logits.argmax(-1).tolist()
    tokens, lps = verify_drafts(logits.clone(), rows_for(params, 3), target[:2])
    assert tokens == target and len(lps) == 3
    raw = torch.log_softmax(logits, -1)
    for j, (lp, top) in enumerate(lps):
        assert lp == pytest.approx(float(raw[j, tokens[j]])) and len(top) == 2
