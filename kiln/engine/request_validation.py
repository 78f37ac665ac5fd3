"""What every request goes through before it reaches a scheduler: tokenizing and validating the
prompt, and the sampling checks that need the model (vocabulary, grammar).

`RequestValidation` is a mixin: `LLMEngine` uses it on its own loaded model, and the ingress of
`kiln serve --replicas` (kiln.entrypoints.replicas.remote_engine.FrontEngine) uses the same code on facts a
replica reports, so a bad request is refused the same way, with the same message, before it is routed.
The class using it provides `tokenizer`, `model_config.vocab_size`, `kv_budget.num_tokens`,
`max_model_len` and `grammar` (a GrammarBackend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kiln.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt tokenized and validated once, by `LLMEngine.process_prompt`.

    Invariant: `token_ids` passed that engine's checks (non-empty, inside the vocabulary, shorter
    than the context, fits the KV cache), so `add_request` takes it as it is. Build one only
    through `process_prompt` (`dataclasses.replace` of `text` keeps it valid).
    """

    text: str | None
    token_ids: list[int]


PromptInput = str | list[int] | dict[str, Any] | TokenizedPrompt


class RequestValidation:
    """Prompt and sampling checks shared by the engine and the replicas' ingress (see the module docstring)."""

    def process_prompt(self, prompt: PromptInput) -> TokenizedPrompt:
        """Tokenize (unless ids are given) and validate a prompt; ValueError says what is wrong.

        A TokenizedPrompt comes back as it is: it was processed already. A string is encoded with
        the tokenizer's special tokens (BOS); ids, or a dict with `prompt_token_ids`, are taken as
        they are (a chat template has put the BOS in already).
        """
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        text, token_ids = self._tokenize(prompt)
        self.validate_prompt(token_ids)
        return TokenizedPrompt(text, token_ids)

    def _tokenize(self, prompt: PromptInput) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            return prompt, self.tokenizer.encode(prompt, add_special_tokens=True)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self._tokenize(prompt["prompt"])
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("prompt must be a string, a list of token ids, or {'prompt_token_ids': [...]}")

    def validate_prompt(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in token_ids):
            raise ValueError(f"prompt contains token ids outside the vocabulary [0, {vocab})")
        if len(token_ids) + 1 > self.kv_budget.num_tokens:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens but the KV cache holds only {self.kv_budget.num_tokens}; "
                f"raise --kv-cache-memory"
            )
        if len(token_ids) >= self.max_model_len:
            raise ValueError(
                f"prompt is {len(token_ids)} tokens, but the context length is {self.max_model_len} tokens "
                f"(prompt + output must fit); shorten the prompt"
            )

    def validate_params(self, params: SamplingParams) -> None:
        """Checks that need the model: logit_bias ids inside the vocabulary, and the structured
        output's grammar compiled (cached by its hash). ValueError says what is wrong."""
        vocab = self.model_config.vocab_size
        if params.logit_bias and any(t >= vocab for t in params.logit_bias):
            bad = sorted(t for t in params.logit_bias if t >= vocab)[:5]
            raise ValueError(f"logit_bias names token ids outside the vocabulary [0, {vocab}): {bad}")
        if params.structured_outputs is not None:
            self.grammar.check(params.structured_outputs)  # type: ignore[arg-type]
