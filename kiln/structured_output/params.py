"""StructuredOutputsParams: what output shape one request asks for (vLLM's name and fields).

Pure Python, no grammar engine here: SamplingParams holds one of these, and the grammar engine
turns it into a compiled grammar once per distinct spec (`key`), at request admission.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of the fields is set.

    json: a JSON schema (dict or its JSON text); json_object: any JSON object; regex: the whole
    output matches it; choice: the output is exactly one of these strings; grammar: a grammar in
    GBNF (llama.cpp's EBNF, with a `root ::= ...` rule) or Lark syntax (llguidance's, `start: ...`).
    """

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured output needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                parsed = json.loads(self.json)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the JSON schema is not valid JSON: {exc}") from None
            object.__setattr__(self, "json", parsed)
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"a JSON schema must be a JSON object, got {type(self.json).__name__}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> str:
        """A hash of the spec: equal specs share one compiled grammar."""
        value = getattr(self, self.kind)
        text = json.dumps(value if not isinstance(value, tuple) else list(value), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(f"{self.kind}:{text}".encode()).hexdigest()
