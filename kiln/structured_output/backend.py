"""GrammarBackend: one tokenizer's grammar engine (llguidance), compiled grammars cached by spec hash.

Why llguidance: benchmarks/grammar_engine_choice.py measured both candidates on the default
model's 49,152-token vocabulary. Both fill a batch-32 mask in well under a millisecond (hidden
behind a ~100 ms forward); llguidance compiled a 20-field schema and filled its first mask in
about a third of xgrammar's time, and it installs as one 8 MB wheel where xgrammar pulls ~1.2 GB
(triton and transformers). See benchmarks/results/grammar_engine_choice.json.

Invariants: a compiled grammar is an LLMatcher that has consumed nothing; requests get deep copies
of it (cheap), so equal specs compile once. `check` raises ValueError with the engine's reason for
a spec that cannot be used (bad schema, unsupported keyword, a grammar that matches nothing), so
the server answers 400 before any token. Thread-safe: specs are checked at admission (the event
loop's thread) and matchers copied on the runner's helper thread.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from typing import Any, Protocol

import llguidance
from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

from kiln.structured_output.params import StructuredOutputsParams


class _HasBackend(Protocol):
    """kiln.loader.tokenizer.Tokenizer, named structurally: importing kiln.loader from here would close
    an import cycle (kiln.sampling_params imports this package's params)."""

    backend: Any  # a tokenizers.Tokenizer

# JSON is generated compactly with json.dumps's separators: no free whitespace, because a small
# model allowed whitespace between tokens can emit newlines forever and never close the object.
_JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Characters with a meaning in llguidance's (Rust) regex syntax; a choice's text is matched literally.
_REGEX_META = re.compile(r"([\\.+*?()|\[\]{}^$#&\-~])")
CACHE_SIZE = 256


def choice_regex(choices: tuple[str, ...]) -> str:
    return "(" + "|".join(_REGEX_META.sub(r"\\\1", c) for c in choices) + ")"


def grammar_text(spec: StructuredOutputsParams) -> str:
    """The spec as an llguidance grammar (its JSON form); ValueError for text that is not a grammar."""
    kind = spec.kind
    if kind == "json" or kind == "json_object":
        schema = spec.json if kind == "json" else {"type": "object"}
        return llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=_JSON_OPTIONS)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec.regex or "")
    if kind == "choice":
        return llguidance.LLMatcher.grammar_from_regex(choice_regex(tuple(spec.choice or ())))
    try:
        lark = any_to_lark(spec.grammar or "")
    except (GbnfToLarkError, Exception) as exc:  # the converter raises bare Exception for an undefined rule
        raise ValueError(f"the GBNF grammar does not parse: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(lark)


class GrammarBackend:
    """Compiles StructuredOutputsParams for one tokenizer and hands out fresh matchers."""

    def __init__(self, tokenizer: _HasBackend, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        """`vocab_size`: the model's (the width of its logits, which may exceed the tokenizer's)."""
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._source = tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None  # built at the first grammar (~0.3 s)
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self.compiles = 0  # grammars compiled so far (tests check that the cache works)

    @property
    def tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = llguidance.LLTokenizer(self._source.backend.to_str(), n_vocab=self.vocab_size,
                                                         eos_token=self.eos_token_ids or None)
            return self._tokenizer

    @property
    def mask_words(self) -> int:
        """int32 words per row of a token bitmask."""
        return (self.vocab_size + 31) // 32

    def check(self, spec: StructuredOutputsParams) -> None:
        """Compile (or find) the spec's grammar; ValueError with the reason when it is unusable."""
        self._compiled(spec)

    def matcher(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        """A matcher at the start of the spec's grammar, for one sequence."""
        return self._compiled(spec).deep_copy()

    def _compiled(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        key = spec.key
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        compiled = self._compile(spec)
        with self._lock:
            self._cache[key] = compiled
            self.compiles += 1
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def _compile(self, spec: StructuredOutputsParams) -> llguidance.LLMatcher:
        what = {"json": "JSON schema", "json_object": "JSON object", "regex": "regex", "choice": "choice",
                "grammar": "grammar"}[spec.kind]
        try:
            grammar = grammar_text(spec)
        except ValueError as exc:
            raise ValueError(f"invalid {what}: {exc}") from None
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"invalid {what}: {_short(matcher.get_error())}")
        # A grammar whose first mask allows no token at all (not even end-of-sequence) matches nothing.
        mask = matcher.compute_bitmask()
        if matcher.is_error() or not any(mask):
            reason = _short(matcher.get_error()) if matcher.is_error() else "no output can satisfy it"
            raise ValueError(f"invalid {what}: {reason}")
        return matcher


def _short(message: str) -> str:
    """llguidance's errors can carry a long grammar dump; the first lines say what is wrong."""
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return "; ".join(lines[:3])[:500]
