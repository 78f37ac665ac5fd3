"""IncrementalDetokenizer: streamed deltas add up to the full decode, never show a half character,
and each step decodes only a short window."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kiln.data import HUMANEVAL, WIKITEXT2_TEST, data_path
from kiln.detokenizer import IncrementalDetokenizer, token_bytes, token_pieces
from kiln.loader.tokenizer import Tokenizer

UNICODE_TEXTS = [
    "Emoji: 😀👍🏽 👨‍👩‍👧‍👦 and flags 🇫🇷🇯🇵.",
    "日本語のテキスト、中文文本，한국어 텍스트.",
    "Ünïcödé àccents, Ωμέγα, Привет мир, مرحبا بالعالم, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    "<|im_start|>assistant\nSure! 🙂<|im_end|>\n",
]


@pytest.fixture(scope="module")
def tok(default_gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(default_gguf_path)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    wiki = [ln for ln in data_path(WIKITEXT2_TEST).read_text(encoding="utf-8").splitlines() if ln.strip()]
    code = [json.loads(ln)["prompt"] for ln in data_path(HUMANEVAL).read_text(encoding="utf-8").splitlines()[:3]]
    return wiki[:20] + code + UNICODE_TEXTS


def stream(tok: Tokenizer, ids: list[int], chunks: list[int] | None = None, skip: bool = True, prompt: list[int] | None = None) -> tuple[list[str], IncrementalDetokenizer]:
    """Feed `ids` in chunks of the given sizes (cycled; default one at a time); deltas incl. flush."""
    detok = IncrementalDetokenizer(tok, prompt or [], skip_special_tokens=skip)
    sizes = chunks or [1]
    deltas, pos, step = [], 0, 0
    while pos < len(ids):
        size = max(1, sizes[step % len(sizes)])
        deltas.append(detok.add_tokens(ids[pos : pos + size]))
        pos, step = pos + size, step + 1
    deltas.append(detok.flush())
    return deltas, detok


@pytest.mark.real_model
def test_real_text_streams_exactly(tok: Tokenizer, texts: list[str]) -> None:
    for text in texts:
        ids = tok.encode(text)
        for skip in (True, False):
            for chunks in ([1], [3, 1, 7]):
                deltas, detok = stream(tok, ids, chunks, skip)
                assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=skip)
                assert not any("\ufffd" in d for d in deltas), (text, deltas)
        assert "".join(stream(tok, ids, skip=False)[0]) == text


@pytest.mark.real_model
def test_split_character_is_held_back(tok: Tokenizer) -> None:
    ids = tok.encode(" 😀")
    pieces = [token_bytes(tok, i) for i in ids]
    assert len(ids) == 2 and b"".join(pieces) == " 😀".encode()  # the emoji's 4 bytes span both tokens
    detok = IncrementalDetokenizer(tok, prompt_token_ids=tok.encode("Smile:"))
    assert detok.add_tokens(ids[:1]) == ""
    assert detok.add_tokens(ids[1:]) == " 😀"
    assert detok.flush() == "" and detok.output_text == " 😀"
    assert detok.all_token_ids == tok.encode("Smile:") + ids
    # A stream that ends mid-character gives up the remainder at flush, as decode does.
    cut = IncrementalDetokenizer(tok, [])
    assert cut.add_tokens(ids[:1]) == ""
    assert cut.flush() == tok.decode(ids[:1]) == " \ufffd"


@pytest.mark.real_model
def test_window_stays_small(tok: Tokenizer, texts: list[str]) -> None:
    """O(new tokens) per step: no decode sees more than a few tokens, however long the output."""
    seen: list[int] = []

    class Recording:
        def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
            seen.append(len(ids))
            return tok.decode(ids, skip_special_tokens)

    ids = tok.encode(" ".join(texts))
    assert len(ids) > 1000
    deltas, _ = stream(Recording(), ids)  # type: ignore[arg-type]
    assert "".join(deltas) == tok.decode(ids)
    assert max(seen) <= 8


@pytest.mark.real_model
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_token_streams(tok: Tokenizer, data: st.DataObject) -> None:
    """Any id sequence, valid UTF-8 or not, special tokens included, in any chunking."""
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    if data.draw(st.booleans()):  # bias towards split characters: bytes ≥ 0x80 are single tokens too
        ids += tok.encode(data.draw(st.text(max_size=8)))
    chunks = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    skip = data.draw(st.booleans())
    deltas, detok = stream(tok, ids, chunks, skip)
    assert "".join(deltas) == detok.output_text == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.real_model
def test_token_pieces(tok: Tokenizer) -> None:
    ids = tok.encode("Hi 😀 日本")
    pieces = token_pieces(tok, ids)
    assert b"".join(raw for raw, _ in pieces) == "Hi 😀 日本".encode()
    assert pieces[0] == (b"Hi", "Hi")
    assert any("\ufffd" in text for _, text in pieces)  # a token holding part of the emoji


# ---------------------------------------------------------------- SentencePiece (tiny GGUF)
@pytest.fixture(scope="module")
def spm(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    """<unk> <s> </s>, 256 byte tokens, a few scored pieces and the letters: enough for byte fallback."""
    pieces = ["▁t", "he", "▁the", "▁h", "ll", "llo", "▁hello", "▁w", "or", "ld", "▁world"]
    chars = list("▁abcdefghijklmnopqrstuvwxyz.")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, *chars]
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))] + [-100.0] * len(chars))
    writer.add_token_types([2, 3, 3, *[6] * 256, *[1] * (len(pieces) + len(chars))])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Tokenizer.from_gguf(path)


def test_spm_leading_space_matches_decode(spm: Tokenizer) -> None:
    """SentencePiece drops the space of the first token only; the stream must do the same."""
    ids = spm.encode("hello world", add_special_tokens=False)
    for chunks in ([1], [2]):
        deltas, _ = stream(spm, ids, chunks, prompt=spm.encode("the"))
        assert spm.convert_ids_to_tokens(ids[:1]) == ["▁"]
        assert "".join(deltas) == spm.decode(ids) == "hello world"  # no leading space, despite the prompt


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=30).filter(lambda t: "\ufffd" not in t), chunks=st.lists(st.integers(1, 4), min_size=1, max_size=3), bos=st.booleans())
def test_spm_streams_any_text(spm: Tokenizer, text: str, chunks: list[int], bos: bool) -> None:
    """Byte fallback splits every unknown character into 1-4 byte tokens; none may leak a U+FFFD.

    (Streams of *invalid* UTF-8 are out of scope here: SentencePiece's decoder turns a whole run of
    byte tokens into U+FFFDs when any byte in it is invalid, which no stream can take back.)
    """
    ids = spm.encode(text, add_special_tokens=bos)
    deltas, detok = stream(spm, ids, chunks)
    assert "".join(deltas) == detok.output_text == spm.decode(ids)
    assert not any("\ufffd" in d for d in deltas)
