"""Chat templates render exactly what transformers renders, and bad input fails clearly."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest

from kiln.loader.chat_template import CHATML_FALLBACK_TEMPLATE, render_chat_template, validate_messages
from kiln.loader.tokenizer import Tokenizer

# Reuse the cached loads (seconds each) from the tokenizer tests in this package.
from .test_tokenizer import load_kiln, load_reference

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another one, in 日本語 please 🙂"},
    ],
    [
        {"role": "system", "content": "Answer in JSON."},
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": '{"x": 1}'},
        {"role": "user", "content": "  spaces\n\nand newlines  "},
    ],
]


@pytest.fixture(scope="module")
def kiln_tok(default_gguf_path: Path) -> Tokenizer:
    return load_kiln(default_gguf_path)


@pytest.mark.real_model
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(kiln_tok: Tokenizer, default_gguf_path: Path, add_generation_prompt: bool) -> None:
    hf = load_reference(default_gguf_path)
    for messages in CONVERSATIONS:
        ours = kiln_tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        theirs = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
        assert ours == theirs
        # The markers in the rendered prompt encode to single special tokens, as in transformers.
        assert kiln_tok.encode(ours) == hf.encode(ours)
        assert kiln_tok.encode(ours).count(kiln_tok.token_to_id("<|im_start|>")) == ours.count("<|im_start|>")


@pytest.mark.real_model
def test_smollm_default_system_prompt(kiln_tok: Tokenizer) -> None:
    text = kiln_tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_fallback_is_chatml() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    assert render_chat_template(None, messages) == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert render_chat_template(None, messages, add_generation_prompt=False).endswith("U<|im_end|>\n")
    assert render_chat_template(CHATML_FALLBACK_TEMPLATE, messages) == render_chat_template(None, messages)


def test_environment_matches_hf_conventions() -> None:
    # trim_blocks/lstrip_blocks: block tags leave no stray newlines or indentation.
    template = "{% for m in messages %}\n    {% if m %}{{ m['content'] }}|{% endif %}\n{% endfor %}"
    assert render_chat_template(template, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a|b|"
    # bos/eos and extra kwargs are visible; tojson does not HTML-escape.
    template = "{{ bos_token }}{{ tools | tojson }}{{ messages[0]['content'] }}{{ eos_token }}{{ flag }}"
    tools = [{"name": "f", "description": "<b>&'x'"}]
    out = render_chat_template(template, [{"role": "user", "content": "q"}], bos_token="<s>", eos_token="</s>", tools=tools, flag=1)
    assert out == "<s>" + json.dumps(tools) + "q</s>1"
    assert render_chat_template("{{ strftime_now('%Y') }}", [{"role": "user", "content": ""}]).isdigit()
    loop = "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
    assert render_chat_template(loop, [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]) == "a"


def test_template_errors_and_sandbox() -> None:
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('must start with user') }}{% endif %}ok"
    with pytest.raises(jinja2.TemplateError, match="must start with user"):
        render_chat_template(strict, [{"role": "assistant", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render_chat_template("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    with pytest.raises(jinja2.exceptions.SecurityError):  # immutable: templates cannot edit the messages
        render_chat_template("{{ messages.append(1) }}", [{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ("hello", "list of dicts"),
        ([], "at least one"),
        (["hello"], r"messages\[0\] must be a dict"),
        ([{"content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user"}], "has no 'content'"),
        ([{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "text"}]}], r"messages\[1\]\['content'\] must be a string"),
        ([{"role": "assistant", "content": None}], "must be a string"),
    ],
)
def test_validation(messages: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_messages(messages)


def test_validation_accepts_tool_call_messages() -> None:
    messages = [{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}, {"role": "tool", "content": "42"}]
    assert validate_messages(messages) == messages
