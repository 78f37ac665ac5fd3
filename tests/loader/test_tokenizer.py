"""kiln's Tokenizer against transformers (the reference) on the real SmolLM2 GGUF, plus tiny
hand-built GGUFs for the SentencePiece path and the pre-tokenizer table."""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import gguf
import pytest

from kiln.data import HUMANEVAL, WIKITEXT2_TEST, data_path
from kiln.detokenizer import token_bytes
from kiln.errors import ModelLoadError
from kiln.loader.tokenizer import Tokenizer

EDGE_CASES = [
    "", " ", "  ", "\n", "\n\n\t  \r\n", "Hello, world!", "  leading and trailing  ", "a\u00a0b",
    "2024-11-23 12:34:56.789", "1234567890 3.14159 -42 1e10 0x1F", "٣٤٥ ११२ ①②",
    "naïve café résumé Æsir ß ŁÓDŹ", "日本語のテキストと中文文本，还有한국어.", "emoji 😀👍🏽👨‍👩‍👧‍👦 🇫🇷!",
    "tabs\tand\vvertical\x0cfeeds", "I'm can't we'll they've SHE'D", "<|im_start|>user\nhi<|im_end|>\n",
    "x<|endoftext|>y<|im_end|>", "<|im_start", "def f(x):\n    return x ** 2  # square\n",
    "\u200b\u200d zero width", "ﬁ ligature Ω ohm K kelvin", "a" * 300, "🙂" * 20,
]


def _corpus() -> list[str]:
    lines = [ln for ln in data_path(WIKITEXT2_TEST).read_text(encoding="utf-8").splitlines() if ln.strip()]
    prompts = [json.loads(ln)["prompt"] for ln in data_path(HUMANEVAL).read_text(encoding="utf-8").splitlines()[:20]]
    return lines[:200] + prompts + EDGE_CASES


# Cached so test_chat_template (same package) reuses them: each load costs seconds.
@functools.cache
def load_kiln(gguf_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@functools.cache
def load_reference(gguf_path: Path):
    """transformers' tokenizer for the GGUF, with SmolLM2's published pre-tokenizer.

    transformers' GGUF converter knows no `tokenizer.ggml.pre = "smollm"` and falls back to plain
    GPT-2 splitting. The model's own tokenizer.json (and llama.cpp) cut every digit out first,
    which changes how whitespace before a digit is grouped ("\\n    0"); that pipeline is put back
    here so the reference is the tokenizer the model was trained with.
    """
    transformers = pytest.importorskip("transformers")
    from tokenizers import pre_tokenizers

    hf = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    return hf


@pytest.fixture(scope="module")
def kiln_tok(default_gguf_path: Path) -> Tokenizer:
    return load_kiln(default_gguf_path)


@pytest.fixture(scope="module")
def hf_tok(default_gguf_path: Path):
    return load_reference(default_gguf_path)


@pytest.mark.real_model
def test_digits_are_split_before_whitespace_grouping(kiln_tok: Tokenizer) -> None:
    """The one place where unpatched transformers differs (see load_reference): llama.cpp's
    'smollm' splitting keeps the whole run of spaces before a digit together."""
    assert kiln_tok.convert_ids_to_tokens(kiln_tok.encode("5\n    0")) == ["5", "ĊĠĠĠĠ", "0"]


@pytest.mark.real_model
def test_encode_matches_transformers(kiln_tok: Tokenizer, hf_tok) -> None:
    for text in _corpus():
        for special in (False, True):
            assert kiln_tok.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special), repr(text)


@pytest.mark.real_model
def test_decode_round_trip_and_matches_transformers(kiln_tok: Tokenizer, hf_tok) -> None:
    for text in _corpus():
        ids = kiln_tok.encode(text)
        assert kiln_tok.decode(ids, skip_special_tokens=False) == text
        assert kiln_tok.convert_ids_to_tokens(ids) == hf_tok.convert_ids_to_tokens(ids)
        for skip in (False, True):
            assert kiln_tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
        # Byte-level vocabulary: the tokens' bytes concatenate to the UTF-8 text exactly.
        assert b"".join(token_bytes(kiln_tok, i) for i in ids) == text.encode("utf-8")


@pytest.mark.real_model
def test_special_tokens_and_ids(kiln_tok: Tokenizer) -> None:
    assert kiln_tok.encode("<|im_start|>") == [1]
    assert kiln_tok.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert kiln_tok.encode("<|im_start|>user\nhi<|im_end|>")[-1] == 2
    assert (kiln_tok.bos_token_id, kiln_tok.eos_token_id, kiln_tok.pad_token_id) == (1, 2, 2)
    assert kiln_tok.bos_token == "<|im_start|>" and kiln_tok.eos_token == "<|im_end|>"
    assert kiln_tok.add_bos_token is False
    assert kiln_tok.eos_token_ids == frozenset({2, 0})  # <|im_end|> and <|endoftext|>
    assert kiln_tok.vocab_size == 49152
    assert kiln_tok.all_special_ids == list(range(17))
    assert kiln_tok.token_to_id("<|im_end|>") == 2 and kiln_tok.token_to_id("no such token") is None
    assert kiln_tok.decode([1, 19556, 2]) == "Hello" and kiln_tok.decode([1, 19556, 2], skip_special_tokens=False) == "<|im_start|>Hello<|im_end|>"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        kiln_tok.convert_ids_to_tokens([10**6])
    assert kiln_tok.chat_template is not None and "<|im_start|>" in kiln_tok.chat_template


@pytest.mark.real_model
def test_from_hf_dir_matches_gguf(kiln_tok: Tokenizer, hf_tok, tmp_path: Path) -> None:
    hf_tok.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    for text in _corpus()[::5]:
        assert from_dir.encode(text) == kiln_tok.encode(text) == hf_tok.encode(text), repr(text)
    assert from_dir.chat_template == kiln_tok.chat_template == hf_tok.chat_template
    assert (from_dir.bos_token_id, from_dir.eos_token_id, from_dir.add_bos_token) == (1, 2, False)
    assert {2, 0} <= from_dir.eos_token_ids
    messages = [{"role": "user", "content": "Hi"}]
    assert from_dir.apply_chat_template(messages) == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_from_hf_dir_extra_eos_and_add_bos(tmp_path: Path) -> None:
    """generation_config eos ids are stop tokens; an explicit add_bos_token adds BOS on encode."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "<eot>": 2, "hi": 3, "[UNK]": 4}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(tmp_path / "tokenizer.json"))
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>", "add_bos_token": True, "chat_template": [{"name": "default", "template": "T"}]}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 2]}))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("hi") == [0, 3] and tok.encode("hi", add_special_tokens=False) == [3]
    assert tok.add_bos_token and tok.eos_token_ids == frozenset({1, 2}) and tok.chat_template == "T"


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf(tmp_path / "bad.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "notok.gguf"), "llama")
    _finish(writer)
    with pytest.raises(ModelLoadError, match="no tokenizer"):
        Tokenizer.from_gguf(tmp_path / "notok.gguf")
    writer = gguf.GGUFWriter(str(tmp_path / "t5.gguf"), "t5")
    writer.add_tokenizer_model("t5")
    writer.add_token_list(["<pad>", "a"])
    _finish(writer)
    with pytest.raises(ModelLoadError, match="unsupported tokenizer.ggml.model 't5'"):
        Tokenizer.from_gguf(tmp_path / "t5.gguf")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot parse"):
        Tokenizer.from_hf_dir(tmp_path)


# ---------------------------------------------------------------- tiny hand-built GGUFs
def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


SPM_PIECES = ["▁t", "he", "▁the", "in", "▁a", "an", "▁an", "er", "▁h", "ll", "▁he", "llo", "▁hello", "or", "ld", "▁w",
              "▁wor", "▁world", "ing", "▁th", "is", "▁is", "▁this", "▁T", "▁Th", "▁This", "▁▁", "▁▁▁", "at", "▁c", "▁cat"]


def write_tiny_llama_gguf(path: Path, add_space_prefix: bool | None = None) -> None:
    """A SentencePiece-style vocabulary: <unk> <s> </s>, 256 byte tokens, scored pieces, letters, <tool>."""
    chars = list("▁abcdefghijklmnopqrstuvwxyzTH.,!?'")
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES, *chars, "<tool>"]
    types = [2, 3, 3, *[6] * 256, *[1] * (len(SPM_PIECES) + len(chars)), 4]
    scores = [0.0] * 259 + [-float(i) for i in range(len(SPM_PIECES))] + [-1000.0 - i for i in range(len(chars))] + [0.0]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    if add_space_prefix is not None:
        writer.add_add_space_prefix(add_space_prefix)
    _finish(writer)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("spm") / "tiny.gguf"
    write_tiny_llama_gguf(path)
    return path


SPM_TEXTS = ["hello world", "This is the cat.", "the big cat, an ant!", "héllo wörld 😀", "a  b   c", "Zebra? Ω", "hello\nworld"]


def test_spm_matches_transformers(tiny_llama: Path) -> None:
    """On text that neither starts with a space nor has special tokens mid-text, kiln and
    transformers agree (there they differ on purpose: kiln follows llama.cpp, see below)."""
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tiny_llama.parent), gguf_file=tiny_llama.name)
    tok = Tokenizer.from_gguf(tiny_llama)
    for text in SPM_TEXTS:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True) == text


def test_spm_round_trip_and_byte_fallback(tiny_llama: Path) -> None:
    tok = Tokenizer.from_gguf(tiny_llama)
    assert tok.add_bos_token and tok.bos_token_id == 1 and tok.eos_token_ids == frozenset({2})
    assert tok.convert_ids_to_tokens(tok.encode("hello world")) == ["<s>", "▁hello", "▁world"]
    # é is not in the vocabulary: it falls back to its two UTF-8 bytes.
    assert tok.convert_ids_to_tokens(tok.encode("é", add_special_tokens=False)) == ["▁", "<0xC3>", "<0xA9>"]
    assert [token_bytes(tok, i) for i in tok.encode("é", add_special_tokens=False)] == [b" ", b"\xc3", b"\xa9"]
    for text in [*SPM_TEXTS, "  two leading spaces", "日本語 🙂"]:
        assert tok.decode(tok.encode(text)) == text
    # llama.cpp keeps leading spaces and adds one more: "  hi" → ▁▁▁hi.
    assert tok.convert_ids_to_tokens(tok.encode("  hi", add_special_tokens=False)) == ["▁▁", "▁h", "i"]
    # User-defined tokens stay whole and survive skip_special_tokens; after a special token,
    # llama.cpp starts a new run of text with a space.
    ids = tok.encode("<tool>hello</s>the")
    assert tok.convert_ids_to_tokens(ids) == ["<s>", "<tool>", "▁hello", "</s>", "▁the"]
    assert tok.decode(ids) == "<tool> hello the"
    # No template in the file: the documented ChatML fallback.
    assert tok.chat_template is None
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_spm_without_space_prefix(tmp_path: Path) -> None:
    write_tiny_llama_gguf(tmp_path / "nospace.gguf", add_space_prefix=False)
    tok = Tokenizer.from_gguf(tmp_path / "nospace.gguf")
    assert tok.convert_ids_to_tokens(tok.encode("hello world", add_special_tokens=False)) == ["he", "llo", "▁world"]
    assert tok.decode(tok.encode(" hello world")) == " hello world"


def _tiny_gpt2(path: Path, pre: str) -> Tokenizer:
    alphabet = [chr(c) for c in range(ord("!"), ord("~") + 1)] + ["Ġ", "Ċ"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["<|endoftext|>", *alphabet, "Ġh", "12", "34", "123"])
    writer.add_token_types([3] + [1] * (len(alphabet) + 4))
    # "3 4" outranks "12 3": only a split that cuts digits into groups of three can make "123".
    writer.add_token_merges(["Ġ h", "1 2", "3 4", "12 3"])
    writer.add_eos_token_id(0)
    _finish(writer)
    return Tokenizer.from_gguf(path)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("llama-bpe", ["h", "i", "Ġ", "123", "4", "5"]),
        ("qwen2", ["h", "i", "Ġ", "1", "2", "3", "4", "5"]),
        ("smollm", ["h", "i", "Ġ", "1", "2", "3", "4", "5"]),
        ("gpt2", ["h", "i", "Ġ", "12", "34", "5"]),
    ],
)
def test_pre_tokenizer_table(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    tok = _tiny_gpt2(tmp_path / "t.gguf", pre)
    assert tok.convert_ids_to_tokens(tok.encode("hi 12345")) == pieces
    assert tok.decode(tok.encode("hi 12345<|endoftext|>")) == "hi 12345"
    assert tok.eos_token_ids == frozenset({0}) and not tok.add_bos_token


def test_unknown_pre_warns_and_falls_back(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kiln.loader.tokenizer"):
        tok = _tiny_gpt2(tmp_path / "t.gguf", "some-future-model")
    assert "unknown tokenizer.ggml.pre" in caplog.text
    assert tok.decode(tok.encode("hi 12345")) == "hi 12345"
