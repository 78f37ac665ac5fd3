"""Streaming token ids → text, one small decode per step.

Decoding the whole output after every token costs O(length) per step, O(length²) per request.
Decoding each token alone is wrong twice over: a character can be split across tokens (an emoji
is 4 UTF-8 bytes, often 2-4 byte-level tokens), and some decoders depend on neighbours
(SentencePiece strips the space of the *first* token only). So `IncrementalDetokenizer` keeps a
short window of ids: the tokens whose text was last emitted (context) plus those not yet emitted.
Each step decodes the window with and without the new tokens and emits the difference, then
slides the window forward. Text that ends in U+FFFD, an unfinished character, is held back until
a later token completes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kiln.loader.tokenizer import Tokenizer

_REPLACEMENT = "\ufffd"
# A UTF-8 character spans at most 4 bytes, so at most 4 tokens; a window that still ends in U+FFFD
# after this many unemitted tokens holds genuinely invalid bytes, and waiting longer would only
# make each step slower. (Only then can the stream differ from a full decode: in how U+FFFDs group.)
_MAX_HELD_TOKENS = 16


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas.

    Invariants: `output_text` is the concatenation of every delta returned so far; after
    `flush()`, it equals `tokenizer.decode(output_ids, skip_special_tokens)` (for valid UTF-8 and
    for any stream whose invalid bytes are followed within `_MAX_HELD_TOKENS` tokens by valid
    text); no delta ends in a character that a later token could still change. Text is relative to
    the output only: the prompt is kept for callers (`all_token_ids`) but is not decoded, so the
    first output token decodes exactly as `decode(output_ids)` decodes it.
    """

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: Sequence[int], skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.prompt_token_ids: list[int] = list(prompt_token_ids)
        self.skip_special_tokens = skip_special_tokens
        self.output_ids: list[int] = []
        # Window = output_ids[_prefix:]; output_ids[_prefix:_read] were already emitted (context).
        self._prefix = 0
        self._read = 0
        self._deltas: list[str] = []

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_ids

    @property
    def output_text(self) -> str:
        """All text emitted so far (joined lazily: streaming callers never read it)."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""

    def add_tokens(self, new_ids: Iterable[int]) -> str:
        """Append `new_ids` and return the text they finalized (possibly "", e.g. half an emoji)."""
        self.output_ids.extend(new_ids)
        window = self.output_ids[self._prefix :]
        held = len(self.output_ids) - self._read
        context_len = self._read - self._prefix
        context = self._decode(window[:context_len]) if context_len else ""
        text = self._decode(window)
        if len(text) <= len(context) or (text.endswith(_REPLACEMENT) and held < _MAX_HELD_TOKENS):
            return ""
        return self._emit(text[len(context) :])

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character becomes U+FFFD, as in `decode`)."""
        if self._read == len(self.output_ids):
            return ""
        window = self.output_ids[self._prefix :]
        context_len = self._read - self._prefix
        context = self._decode(window[:context_len]) if context_len else ""
        return self._emit(self._decode(window)[len(context) :])

    def _emit(self, delta: str) -> str:
        # The emitted tokens become the next window's context: a decoder that treats the first
        # token specially (SentencePiece's leading-space strip) then sees them as "not first".
        self._prefix, self._read = self._read, len(self.output_ids)
        if delta:
            self._deltas.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def token_pieces(tokenizer: Tokenizer, ids: Iterable[int]) -> list[tuple[bytes, str]]:
    """Each token's exact bytes and a printable text for it, for logprobs.

    The text is the bytes decoded with U+FFFD for an incomplete character, matching what the
    OpenAI API shows for a token that holds part of an emoji; `bytes` is what it returns in
    `logprobs.content[].bytes`.
    """
    out = []
    for token_id in ids:
        raw = tokenizer.token_bytes(token_id)
        out.append((raw, raw.decode("utf-8", errors="replace")))
    return out
