"""Rendering chat templates: a list of messages → the prompt string a model was trained on.

Chat templates are Jinja programs shipped with a model (GGUF key `tokenizer.chat_template`, or
`tokenizer_config.json` / `chat_template.jinja` in a Hugging Face folder). They are untrusted
code, so they run in Jinja's immutable sandbox. The environment mirrors the one Hugging Face
transformers sets up (trim_blocks, lstrip_blocks, loop controls, a `tojson` that does not escape
HTML, `raise_exception`, `strftime_now`), because templates are written and tested against it and
a different whitespace rule changes the prompt, and with it the model's output.

A model that ships no template gets `CHATML_FALLBACK_TEMPLATE` (ChatML, the format of SmolLM2,
Qwen and many fine-tunes). That is a guess: a model trained on another format will still answer,
but worse. Pass an explicit template when you know better.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used only when a model has no template of its own (see the module docstring).
CHATML_FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation they cannot format (e.g. roles out of order)."""
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own `tojson` HTML-escapes `<`, `>`, `&` and `'`; tool schemas rendered into a
    # prompt must stay byte-identical to what the model saw in training, so no escaping.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    """Templates (Llama 3.x) print today's date in the system prompt."""
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    """Compile once per distinct template; compiling costs milliseconds, rendering microseconds."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def validate_messages(messages: object) -> list[dict[str, Any]]:
    """Check the shape of a conversation and return it as a list of plain dicts.

    Invariant on return: every message is a dict with a str 'role' and a str 'content'. The one
    exception is an assistant message that carries 'tool_calls', whose 'content' may be None
    (the OpenAI API sends those). Anything else raises ValueError naming the bad message.
    """
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise ValueError(f"messages must be a list of dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages must contain at least one message")
    checked: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{index}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise ValueError(f"messages[{index}]['role'] must be a non-empty string, got {role!r}")
        if "content" not in message:
            raise ValueError(f"messages[{index}] has no 'content'")
        content = message["content"]
        if not isinstance(content, str) and not (content is None and message.get("tool_calls")):
            raise ValueError(
                f"messages[{index}]['content'] must be a string, got {type(content).__name__}; "
                "join multi-part content into one string first"
            )
        checked.append(dict(message))
    return checked


def render_chat_template(
    template: str | None,
    messages: object,
    *,
    add_generation_prompt: bool = True,
    bos_token: str | None = None,
    eos_token: str | None = None,
    **kwargs: Any,
) -> str:
    """Render `messages` with `template` (or the ChatML fallback when it is None).

    `bos_token`/`eos_token` are the token strings templates splice in (e.g. `{{ bos_token }}`);
    extra keyword arguments (tools, documents, enable_thinking, ...) are visible to the template
    and override the special tokens, as in transformers. Raises ValueError for a malformed
    conversation and jinja2.TemplateError when the template itself rejects it.
    """
    checked = validate_messages(messages)
    context: dict[str, Any] = {"bos_token": bos_token, "eos_token": eos_token}
    context.update(kwargs)
    context["messages"] = checked
    context["add_generation_prompt"] = add_generation_prompt
    return _compile(template if template is not None else CHATML_FALLBACK_TEMPLATE).render(**context)
