"""Request fields → structured-output constraints and logit_bias, with a 400 naming the field.

`response_format` (OpenAI) and the guided_* extras (vLLM's names) become one
StructuredOutputsParams; at most one of them may be given. The grammar itself is compiled and
checked when the request is queued (LLMEngine.validate_params), whose ValueError this module's
callers turn into a 400 on the field that asked for it.
"""

from __future__ import annotations

from typing import Any

from kiln.entrypoints.openai.errors import APIError
from kiln.entrypoints.openai.protocol import SamplingFields
from kiln.structured_output.params import StructuredOutputsParams


def structured_field(req: SamplingFields) -> str | None:
    """The request field that asks for structured output (None: plain text)."""
    given = [name for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
             if getattr(req, name) is not None]
    fmt = (req.response_format or {}).get("type", "text")
    if fmt != "text":
        given.insert(0, "response_format")
    if len(given) > 1:
        raise APIError(400, f"give at most one of response_format, guided_json, guided_regex, guided_choice, "
                            f"guided_grammar; got {', '.join(given)}", param=given[1])
    return given[0] if given else None


def structured_spec(req: SamplingFields) -> StructuredOutputsParams | None:
    field = structured_field(req)
    if field is None:
        return None
    try:
        if field == "response_format":
            return _response_format(req.response_format or {})
        kind = field.removeprefix("guided_")
        return StructuredOutputsParams(**{kind: getattr(req, field)})
    except ValueError as exc:
        raise APIError(400, f"{field}: {exc}", param=field) from None


def _response_format(fmt: dict[str, Any]) -> StructuredOutputsParams:
    kind = fmt.get("type")
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind != "json_schema":
        raise ValueError(f"type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise ValueError('json_schema needs {"name": ..., "schema": {...}}; the schema is missing or not an object')
    # strict or not, kiln enforces the schema: the grammar is what makes the output parse
    return StructuredOutputsParams(json=spec["schema"])


def logit_bias(req: SamplingFields) -> dict[int, float] | None:
    """OpenAI sends token ids as JSON object keys (strings); SamplingParams range-checks the values."""
    if not req.logit_bias:
        return None
    out: dict[int, float] = {}
    for key, value in req.logit_bias.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(400, f"logit_bias keys must be token ids (integers as strings); got {key!r}",
                           param="logit_bias") from None
        out[token] = value
    return out
