"""Request bodies of the OpenAI API that kiln serves (pydantic), plus kiln's sampling extras.

Types are checked here (a string where a number belongs is a 400 naming the field); value ranges
are checked once, by SamplingParams, whose ValueError names the field too. Unknown fields are
ignored, as OpenAI-compatible servers do, so clients that send newer fields keep working; fields
kiln knows but cannot honour (suffix, ...) are rejected by the serving code with a message that
says so, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # A string, or OpenAI's list of content parts (only {"type": "text"} parts are supported).
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class SamplingFields(OpenAIModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = Field(default=None, description="Served model name; omitted means the served model.")
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # kiln extras (vLLM names)
    top_k: int | None = Field(default=None, description="kiln extra: keep the k most likely tokens (0 or -1: off).")
    min_p: float | None = Field(default=None, description="kiln extra: drop tokens below min_p x the top probability.")
    repetition_penalty: float | None = Field(default=None, description="kiln extra: >1 discourages repeats.")
    ignore_eos: bool = Field(default=False, description="kiln extra: keep generating past the end-of-sequence token.")
    min_tokens: int = Field(default=0, description="kiln extra: tokens to generate before EOS/stop may end it.")
    stop_token_ids: list[int] | None = Field(default=None, description="kiln extra: token ids that end generation.")
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    num_speculative_tokens: int | None = Field(
        default=None, description="kiln extra: drafts per step for this request when the server speculates "
                                  "(0: off; capped at the server's --num-speculative-tokens).")
    # structured output: OpenAI's response_format, or one of kiln's (vLLM's) guided_* extras
    response_format: dict[str, Any] | None = Field(
        default=None, description='{"type": "text" | "json_object"} or {"type": "json_schema", "json_schema": '
                                  '{"name": ..., "schema": {...}, "strict": true}}.')
    guided_json: dict[str, Any] | str | None = Field(default=None, description="kiln extra: a JSON schema the output follows.")
    guided_regex: str | None = Field(default=None, description="kiln extra: a regex the whole output matches.")
    guided_choice: list[str] | None = Field(default=None, description="kiln extra: the output is one of these strings.")
    guided_grammar: str | None = Field(
        default=None, description="kiln extra: a grammar the output follows, GBNF (`root ::= ...`) or Lark (`start: ...`).")


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, description="Deprecated by OpenAI in favour of max_completion_tokens.")
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None


class TokenizeRequest(OpenAIModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    tools: list[dict[str, Any]] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]
