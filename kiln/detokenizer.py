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
# In valid UTF-8 a held tail is at most one unfinished character (≤ 4 tokens, plus any skipped
# special tokens). A window still ending in U+FFFD after this many unemitted tokens holds
# genuinely invalid bytes; waiting longer would only make every step slower.
_MAX_HELD_TOKENS = 16


class IncrementalDetokenizer:
    """Turns a growing list of output ids into text deltas.

    Invariants:
    * `output_text` is the concatenation of every delta returned so far.
    * No delta ends in an unfinished character: valid UTF-8 never shows a U+FFFD mid-stream.
    * After `flush()`, `output_text == tokenizer.decode(output_ids, skip_special_tokens)` for any
      byte-level (GPT-2 style) stream, and for any SentencePiece stream of valid UTF-8. (The
      SentencePiece byte-fallback decoder turns a whole run of byte tokens into U+FFFDs when one
      byte in it is invalid, so a later bad byte can retroactively change text already streamed;
      then the stream keeps the text it showed.)
    * Text is relative to the output only: the prompt is kept for callers (`all_token_ids`) but
      not decoded, so the first output token decodes exactly as `decode(output_ids)` has it.
    * Each call decodes O(new tokens + a few) ids, never the whole output.
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
        if self._read == len(self.output_ids):
            return ""
        context, text = self._window_texts(len(self.output_ids))
        held = len(self.output_ids) - self._read
        if not text.endswith(_REPLACEMENT) or held >= _MAX_HELD_TOKENS:
            return self._emit(context, text, len(self.output_ids))
        # The window ends inside a character. Emit up to the latest token boundary that does not,
        # so a stream whose every chunk ends mid-character (possible with multi-token steps)
        # still makes progress. A character spans at most 4 tokens, so look back no further.
        for end in range(len(self.output_ids) - 1, max(self._read, len(self.output_ids) - 4), -1):
            partial = self._decode(self.output_ids[self._prefix : end])
            if not partial.endswith(_REPLACEMENT):
                return self._emit(context, partial, end)
        return ""

    def flush(self) -> str:
        """Emit whatever is held back (an unfinished character becomes U+FFFD, as in `decode`)."""
        if self._read == len(self.output_ids):
            return ""
        context, text = self._window_texts(len(self.output_ids))
        return self._emit(context, text, len(self.output_ids))

    def _window_texts(self, end: int) -> tuple[str, str]:
        """Text of the context (already emitted) and of the whole window up to `end`."""
        context_ids = self.output_ids[self._prefix : self._read]
        context = self._decode(context_ids) if context_ids else ""
        return context, self._decode(self.output_ids[self._prefix : end])

    def _emit(self, context: str, text: str, end: int) -> str:
        """Emit `text` past `context`, marking output_ids[:end] as done.

        The emitted tokens become the next window's context: a decoder that treats the first
        token specially (SentencePiece's leading-space strip) then sees them as "not first".
        Tokens that added no text (skipped special tokens) are not emitted yet, only carried.
        """
        if len(text) <= len(context):
            return ""
        self._prefix, self._read = self._read, end
        delta = text[len(context) :]
        self._deltas.append(delta)
        return delta

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)


def token_bytes(tokenizer: Tokenizer, token_id: int) -> bytes:
    """The exact bytes one token stands for (logprobs' `bytes`, byte-level stop strings).

    Added tokens are spelled literally; byte-level vocabularies spell each byte as one printable
    character (GPT-2's table); SentencePiece ones use `▁` for a space and `<0xXX>` for a raw byte.
    """
    token = tokenizer.convert_ids_to_tokens([token_id])[0]
    if token_id in tokenizer.added_token_ids:
        return token.encode("utf-8")
    if tokenizer.byte_level:
        return bytes(_CHAR_TO_BYTE.get(ch, 0x3F) for ch in token)
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
        return bytes([int(token[3:5], 16)])
    return token.replace("\u2581", " ").encode("utf-8")


def token_pieces(tokenizer: Tokenizer, ids: Iterable[int]) -> list[tuple[bytes, str]]:
    """Each token's exact bytes and a printable text for it, for logprobs.

    The text is the bytes decoded with U+FFFD for an incomplete character, which is what the
    OpenAI API shows for a token that holds part of an emoji.
    """
    out = []
    for token_id in ids:
        raw = token_bytes(tokenizer, token_id)
        out.append((raw, raw.decode("utf-8", errors="replace")))
    return out


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte → printable-character table, inverted (character → byte).

    Printable Latin-1 bytes stand for themselves; the other 68 (controls, space, ...) move, in
    order, to the characters from U+0100 up, so that every vocabulary entry is printable text.
    """
    kept = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    moved = [b for b in range(256) if b not in kept]
    table = {chr(b): b for b in kept}
    table.update({chr(256 + n): b for n, b in enumerate(moved)})
    return table


_CHAR_TO_BYTE = _byte_alphabet()
