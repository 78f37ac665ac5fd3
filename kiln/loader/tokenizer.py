"""Tokenizers from a GGUF file's metadata or a Hugging Face folder, behind one small class.

A GGUF carries no `tokenizer.json`: it stores the vocabulary, merges, scores and token types under
llama.cpp's key names. `Tokenizer.from_gguf` rebuilds an equivalent `tokenizers.Tokenizer` from
them, following llama.cpp's rules (it is the reference implementation for GGUF files):

* `gpt2` model: byte-level BPE. The text is split by the regex that `tokenizer.ggml.pre` names
  (the merges were learned on pieces cut that way), then mapped to the byte alphabet.
* `llama` model: SentencePiece BPE. Merges are recovered from the piece scores (llama.cpp merges
  the adjacent pair whose result has the highest score), spaces become `▁`, a `▁` is prepended to
  each run of text when `add_space_prefix` is set, and characters outside the vocabulary fall
  back to `<0xXX>` byte tokens.

Control tokens (type 3) and user-defined tokens (type 4) become added tokens, so they are matched
whole in the text and never split; control tokens are also *special* (skipped by
`decode(skip_special_tokens=True)`), user-defined ones (like `<think>`) are kept in the text.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as Backend

from kiln.errors import ModelLoadError
from kiln.loader.chat_template import render_chat_template

logger = logging.getLogger(__name__)

# llama.cpp's token types, as stored in `tokenizer.ggml.token_type`.
_UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 2, 3, 4, 6

# Tokens that end an assistant turn in common chat formats; generation must stop on them even
# where the file names another token as EOS (SmolLM2 base: `<|endoftext|>`, chat: `<|im_end|>`).
END_OF_TURN_TOKENS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<end_of_turn>", "<|end|>",
    "<|endoftext|>", "<|end_of_text|>", "<EOT>", "<|return|>",
)

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Same as Llama 3 but one digit per piece.
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")

# `tokenizer.ggml.pre` → how text is cut before BPE. None means GPT-2's own regex (built into
# ByteLevel); "digits" means GPT-2's regex after cutting every digit into its own piece, which is
# what llama.cpp does for the StarCoder family, SmolLM included.
_PRE_SPLITS: dict[str, str | None] = {
    "default": None, "gpt2": None, "gpt-2": None, "phi-2": None,
    "llama-bpe": _LLAMA3_SPLIT, "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT, "falcon3": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT, "megrez": _QWEN2_SPLIT,
    "smollm": "digits", "starcoder": "digits", "refact": "digits", "codeshell": "digits",
    "command-r": "digits", "exaone": "digits", "minerva-7b": "digits",
}
# llama.cpp (like Llama 3's own tokenizer.json) takes a pre-token that is itself in the vocabulary
# as one token, without merging, for these.
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


def _byte_pre_tokenizer(pre: str, path: object) -> pre_tokenizers.PreTokenizer:
    if pre not in _PRE_SPLITS:
        logger.warning("%s: unknown tokenizer.ggml.pre %r; splitting text like GPT-2, which may differ", path, pre)
    split = _PRE_SPLITS.get(pre)
    if split is None:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if split == "digits":
        return pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
        )
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges equivalent to llama.cpp's SentencePiece merging.

    llama.cpp repeatedly joins the adjacent pair whose concatenation is a piece with the highest
    score. A BPE merge list ranked by the merged piece's score (best first) does the same.
    """
    index = {tok: i for i, tok in enumerate(tokens)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for i, tok in enumerate(tokens):
        if types[i] in (_CONTROL, _BYTE, _UNKNOWN) or len(tok) < 2:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _byte_level_bpe(reader: gguf.GGUFReader, path: object, tokens: list[str]) -> Backend:
    """GPT-2 style BPE over the byte alphabet, split first by the regex `tokenizer.ggml.pre` names."""
    merges = _field(reader, "tokenizer.ggml.merges")
    if not merges:
        raise ModelLoadError(path, "byte-level BPE tokenizer has no tokenizer.ggml.merges")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    vocab = {t: i for i, t in enumerate(tokens)}
    backend = Backend(models.BPE(vocab, [tuple(m.split(" ", 1)) for m in merges], ignore_merges=pre in _IGNORE_MERGES))
    backend.pre_tokenizer = _byte_pre_tokenizer(pre, path)
    backend.decoder = decoders.ByteLevel()
    return backend


def _sentencepiece_bpe(reader: gguf.GGUFReader, tokens: list[str], types: list[int], unk: int | None) -> Backend:
    """SentencePiece BPE as llama.cpp runs it: merges by score, ▁ for spaces, <0xXX> byte fallback."""
    merges = _field(reader, "tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        pairs = _merges_from_scores(tokens, _field(reader, "tokenizer.ggml.scores") or [0.0] * len(tokens), types)
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_token = tokens[unk] if unk is not None else None
    backend = Backend(models.BPE(vocab, pairs, byte_fallback=True, fuse_unk=True, unk_token=unk_token))
    # llama.cpp prepends the space to every run of text, including one after a special token,
    # and keeps leading spaces ("  hi" → "▁▁▁hi"); a normalizer (run per segment) does both.
    space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))
    prepend = [normalizers.Prepend("▁")] if space_prefix else []
    backend.normalizer = normalizers.Sequence([*prepend, normalizers.Replace(" ", "▁")])
    strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []
    backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), *strip])
    return backend


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _post_processor(bos: str | None, eos: str | None, ids: dict[str, int], add_bos: bool, add_eos: bool) -> processors.PostProcessor | None:
    """A template that adds BOS/EOS on `encode(..., add_special_tokens=True)` only."""
    parts_before = [bos] if add_bos and bos is not None else []
    parts_after = [eos] if add_eos and eos is not None else []
    if not parts_before and not parts_after:
        return None
    single = " ".join([*parts_before, "$A", *parts_after])
    pair = " ".join([single, *parts_before, "$B:1", *parts_after])
    specials = [(tok, ids[tok]) for tok in {*parts_before, *parts_after}]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


class Tokenizer:
    """Text ↔ token ids for one model, plus its chat template and stop tokens.

    Invariants: `eos_token_ids` contains `eos_token_id` (when there is one) and is never empty for
    a model that has any end token; `encode(text, add_special_tokens=True)` starts with
    `bos_token_id` iff `add_bos_token`; special tokens written in the text (e.g. `<|im_start|>`)
    always encode to their single id.
    """

    def __init__(
        self,
        backend: Backend,
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        pad_token_id: int | None = None,
        extra_eos_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template
        added = backend.get_added_tokens_decoder()
        # Added tokens (special or user-defined) are matched whole and spelled literally.
        self.added_token_ids: frozenset[int] = frozenset(added)
        named = {i for i in (bos_token_id, eos_token_id, pad_token_id) if i is not None}
        self.all_special_ids: list[int] = sorted(named | {i for i, tok in added.items() if tok.special})
        special = set(self.all_special_ids)
        # Only special tokens count as end-of-turn: a plain word "<EOT>" in some vocabulary must not stop generation.
        turn_ends = {i for name in END_OF_TURN_TOKENS if (i := backend.token_to_id(name)) is not None and i in special}
        self.eos_token_ids: frozenset[int] = frozenset({i for i in (eos_token_id,) if i is not None} | turn_ends | set(extra_eos_ids))
        probe = backend.encode("a", add_special_tokens=True).ids
        self.add_bos_token: bool = bos_token_id is not None and probe[:1] == [bos_token_id]
        # Whether vocabulary strings are spelled in GPT-2's byte alphabet (vs SentencePiece's ▁ and <0xXX>).
        self.byte_level: bool = b'"ByteLevel"' in backend.decoder.__getstate__() if backend.decoder else False

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_gguf(cls, path_or_reader: "str | Path | gguf.GGUFReader | LeanGGUFReader") -> Tokenizer:  # noqa: F821
        """Build the tokenizer a GGUF file describes; ModelLoadError if it describes none we support."""
        if not isinstance(path_or_reader, (str, Path)):  # a GGUFReader or kiln's LeanGGUFReader
            reader, path = path_or_reader, getattr(path_or_reader.data, "filename", "<gguf>")
        else:
            path = Path(path_or_reader)
            try:
                reader = gguf.GGUFReader(path)
            except (OSError, ValueError) as exc:
                raise ModelLoadError(path, f"cannot read GGUF file ({exc})") from exc
        kind = _field(reader, "tokenizer.ggml.model")
        tokens: list[str] | None = _field(reader, "tokenizer.ggml.tokens")
        if kind is None or not tokens:
            raise ModelLoadError(path, "GGUF file has no tokenizer (tokenizer.ggml.model / tokens missing)")
        types: list[int] = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
        special_id = {k: _field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding", "eot", "eom")}
        if kind == "gpt2":
            backend = _byte_level_bpe(reader, path, tokens)
        elif kind == "llama":
            backend = _sentencepiece_bpe(reader, tokens, types, special_id["unknown"])
        else:
            raise ModelLoadError(path, f"unsupported tokenizer.ggml.model {kind!r}; kiln supports 'gpt2' and 'llama'")
        backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED])
        backend.add_special_tokens(
            [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in (_CONTROL, _UNKNOWN)]
        )
        bos, eos = special_id["bos"], special_id["eos"]
        name = {k: tokens[v] for k, v in (("bos", bos), ("eos", eos)) if v is not None}
        backend.post_processor = _post_processor(
            name.get("bos"), name.get("eos"), {tokens[i]: i for i in (bos, eos) if i is not None},
            # SentencePiece models get BOS unless the file says otherwise (llama.cpp's default).
            bool(_field(reader, "tokenizer.ggml.add_bos_token", kind == "llama")),
            bool(_field(reader, "tokenizer.ggml.add_eos_token", False)),
        )
        return cls(
            backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=special_id["padding"],
            extra_eos_ids=[i for i in (special_id["eot"], special_id["eom"]) if i is not None],
            chat_template=_field(reader, "tokenizer.chat_template"),
        )

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face folder: tokenizer.json (+ tokenizer_config.json, chat_template.jinja,
        generation_config.json, config.json when present)."""
        path = Path(path)
        if not (path / "tokenizer.json").is_file():
            raise ModelLoadError(path, "no tokenizer.json in this folder (kiln needs the fast-tokenizer file)")
        try:
            backend = Backend.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # tokenizers raises bare Exception on a malformed file
            raise ModelLoadError(path / "tokenizer.json", f"cannot parse ({exc})") from exc
        config = _read_json(path / "tokenizer_config.json")
        for key, value in _read_json(path / "special_tokens_map.json").items():
            config.setdefault(key, value)

        def token_id(key: str) -> int | None:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            return backend.token_to_id(value) if isinstance(value, str) else None

        bos, eos, pad = token_id("bos_token"), token_id("eos_token"), token_id("pad_token")
        # transformers rewrites the post-processor when the config states add_bos/add_eos
        # explicitly; do the same so kiln adds exactly the tokens transformers adds.
        if "add_bos_token" in config or "add_eos_token" in config:
            by_id = {i: backend.id_to_token(i) for i in (bos, eos) if i is not None}
            backend.post_processor = _post_processor(
                by_id.get(bos), by_id.get(eos), {v: k for k, v in by_id.items()},
                bool(config.get("add_bos_token")), bool(config.get("add_eos_token")),
            )
        extra: set[int] = set()
        for name in ("generation_config.json", "config.json"):
            ids = _read_json(path / name).get("eos_token_id")
            extra.update(ids if isinstance(ids, list) else [ids] if isinstance(ids, int) else [])
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        if (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text(encoding="utf-8")
        return cls(backend, bos_token_id=bos, eos_token_id=eos, pad_token_id=pad, extra_eos_ids=extra, chat_template=template)

    # ----------------------------------------------------------------- encode / decode
    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; with `add_special_tokens`, BOS/EOS as the model wants them."""
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; invalid UTF-8 (a character cut by the end of `ids`) becomes U+FFFD."""
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """Vocabulary strings of `ids` (byte-alphabet or `▁` spelling); ValueError on an unknown id."""
        out = []
        for i in ids:
            token = self.backend.id_to_token(i)
            if token is None:
                raise ValueError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            out.append(token)
        return out

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return None if self.bos_token_id is None else self.backend.id_to_token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return None if self.eos_token_id is None else self.backend.id_to_token(self.eos_token_id)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation (see kiln.loader.chat_template); encode it to get ids.

        The rendered text may already start with the BOS token (Llama 3 templates write it), so
        callers that encode it should not add another one.
        """
        return render_chat_template(
            self.chat_template, messages, add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token, eos_token=self.eos_token, **kwargs,
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(path, f"cannot parse JSON ({exc})") from exc
    return data if isinstance(data, dict) else {}

