"""The runner's mask machinery against llguidance itself: masks filled on the helper thread equal a
reference matcher's `compute_bitmask` at the same tokens, drafts leave the matcher where it was,
and `begin` returns before the masks are filled (they overlap the forward)."""

from __future__ import annotations

import threading
from pathlib import Path

import llguidance
import pytest
import torch

from kiln.loader.tokenizer import Tokenizer
from kiln.structured_output.backend import GrammarBackend
from kiln.structured_output.manager import GrammarRow, StructuredOutputManager, unpack_bitmask
from kiln.structured_output.params import StructuredOutputsParams

from loader.tiny_model import build_tiny_models

SPEC = StructuredOutputsParams(regex=r"(ab|a)c[0-9]{2,3}")


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory) -> GrammarBackend:
    tiny = build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")
    tok = Tokenizer.from_hf_dir(tiny.hf["tied"])
    return GrammarBackend(tok, tok.vocab_size, tok.eos_token_ids)


def reference_mask(backend: GrammarBackend, tokens: list[int]) -> torch.Tensor:
    m = llguidance.LLMatcher(backend.tokenizer, llguidance.LLMatcher.grammar_from_regex(SPEC.regex or ""), log_level=0)
    assert m.consume_tokens(tokens)
    words = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.int32)
    return unpack_bitmask(words.view(1, -1), backend.vocab_size)[0]


def ids(backend: GrammarBackend, text: str) -> list[int]:
    return [backend.tokenizer.tokenize_str(ch)[0] for ch in text]


def test_masks_match_the_reference_and_drafts_roll_back(backend: GrammarBackend) -> None:
    mgr = StructuredOutputManager(backend)
    out: list[int] = []
    a, b, c, one, two, x = ids(backend, "abc12x")
    # step 1: nothing generated yet, two drafts (a, b) → 3 rows: before a, before b, after ab
    allowed = mgr.begin([GrammarRow("s", SPEC, out, [a, b], 0)], 3).wait() == 0  # type: ignore[union-attr]
    assert torch.equal(allowed[0], reference_mask(backend, []))
    assert torch.equal(allowed[1], reference_mask(backend, [a]))
    assert torch.equal(allowed[2], reference_mask(backend, [a, b]))
    # the sequence kept only "a": the matcher was rolled back, so it catches up from the start
    out = [a]
    allowed = mgr.begin([GrammarRow("s", SPEC, out, [x, c], 1)], 3).wait() == 0  # type: ignore[union-attr]
    assert allowed[0].all()  # a row without a grammar allows everything
    assert torch.equal(allowed[1], reference_mask(backend, [a]))
    assert not allowed[1, x]  # x is refused: the walk stops there, the row after it is never read
    out = [a, c, one, two]
    allowed = mgr.begin([GrammarRow("s", SPEC, out, [], 0)], 1).wait() == 0  # type: ignore[union-attr]
    assert torch.equal(allowed[0], reference_mask(backend, [a, c, one, two]))
    assert set(allowed[0].nonzero().flatten().tolist()) >= set(backend.eos_token_ids)  # the grammar may end here
    mgr.close()


def test_begin_returns_before_the_masks_are_filled(backend: GrammarBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    mgr = StructuredOutputManager(backend)
    release, seen = threading.Event(), []
    make = backend.matcher

    def slow_matcher(spec):
        seen.append(threading.current_thread().name)
        release.wait(5)
        return make(spec)

    monkeypatch.setattr(backend, "matcher", slow_matcher)
    pending = mgr.begin([GrammarRow("t", SPEC, [], [], 0)], 1)
    assert pending is not None and not pending._future.done()  # the engine thread is free to run the forward
    release.set()
    assert torch.equal(pending.wait()[0] == 0, reference_mask(backend, []))
    assert seen and seen[0].startswith("kiln-grammar")
    mgr.close()
