"""SamplingParams: how one request's tokens are chosen and when it stops (vLLM-compatible names).

Every field is validated at construction; a bad value raises ValueError naming the field
and its allowed range, so the server can turn it into a 400 without touching the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kiln.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5
# OpenAI's range for logit_bias values; -100 bans the token outright (its logit becomes -inf).
LOGIT_BIAS_RANGE = (-100.0, 100.0)


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    # Speculative decoding for this request: None = the engine's k, 0 = off, else at most this
    # many drafts per step (capped at the engine's --num-speculative-tokens).
    num_speculative_tokens: int | None = None
    # Constrain the output to a JSON schema / JSON object / regex / choice / grammar (a dict of
    # StructuredOutputsParams' fields is accepted too). Enforced by kiln.structured_output.
    structured_outputs: StructuredOutputsParams | dict[str, Any] | None = None
    # token id → value added to its logit before sampling, in [-100, 100]; -100 bans the token.
    logit_bias: dict[int, float] | None = None
    _stop_list: list[str] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        self._check("n", self.n, lambda v: isinstance(v, int) and 1 <= v <= 128, "an integer in [1, 128]")
        self._check("temperature", self.temperature, lambda v: 0.0 <= v <= 100.0, "in [0, 100] (0 = greedy)")
        self._check("top_p", self.top_p, lambda v: 0.0 < v <= 1.0, "in (0, 1]")
        self._check("top_k", self.top_k, lambda v: isinstance(v, int) and v >= -1, "-1, 0 (disabled) or a positive integer")
        self._check("min_p", self.min_p, lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        self._check("presence_penalty", self.presence_penalty, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        self._check("frequency_penalty", self.frequency_penalty, lambda v: -2.0 <= v <= 2.0, "in [-2, 2]")
        self._check("repetition_penalty", self.repetition_penalty, lambda v: 0.0 < v <= 10.0, "in (0, 10]")
        self._check("max_tokens", self.max_tokens, lambda v: v is None or (isinstance(v, int) and v >= 1), "a positive integer or None")
        self._check("min_tokens", self.min_tokens, lambda v: isinstance(v, int) and v >= 0, "a non-negative integer")
        self._check("num_speculative_tokens", self.num_speculative_tokens,
                    lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 16),
                    "None (the engine's setting) or an integer in [0, 16] (0 = no speculation)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            self._check(name, getattr(self, name), lambda v: v is None or (isinstance(v, int) and 0 <= v <= 20), "None or an integer in [0, 20]")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -(2**63) <= self.seed < 2**64):
            # torch.Generator.manual_seed takes any value that fits 64 bits (signed or unsigned)
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not isinstance(s, str) or s == "" for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        self._stop_list = stops
        if self.stop_token_ids is not None and any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be a list of non-negative integers")
        if self.top_k == -1:
            self.top_k = 0
        self._check_logit_bias()
        if isinstance(self.structured_outputs, dict):
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams or a dict of its fields")
            if self.ignore_eos:
                # the grammar ends a finished output with end-of-sequence; ignoring it would run on forever
                raise ValueError("ignore_eos cannot be combined with structured outputs; remove one of them")

    def _check_logit_bias(self) -> None:
        if self.logit_bias is None:
            return
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias must map token ids to numbers; got {type(self.logit_bias).__name__}")
        low, high = LOGIT_BIAS_RANGE
        for token, bias in self.logit_bias.items():
            if isinstance(token, bool) or not isinstance(token, int) or token < 0:
                raise ValueError(f"logit_bias keys must be non-negative token ids; got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not low <= bias <= high:
                raise ValueError(f"logit_bias values must be numbers in [{low:g}, {high:g}]; got {bias!r} for token {token}")

    @staticmethod
    def _check(name: str, value: object, ok, allowed: str) -> None:
        try:
            good = bool(ok(value))
        except TypeError:
            good = False
        if not good:
            raise ValueError(f"{name} must be {allowed}; got {value!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def stop_strings(self) -> list[str]:
        return self._stop_list

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
