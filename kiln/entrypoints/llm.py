"""`LLM`: the offline Python API (vLLM-compatible names), driving an LLMEngine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from kiln.engine.arg_utils import EngineArgs
from kiln.engine.llm_engine import LLMEngine, PromptInput
from kiln.lora.request import LoRARequest
from kiln.outputs import RequestOutput
from kiln.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    >>> llm = LLM("smollm2-135m")
    >>> llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    """

    def __init__(self, model: str = "smollm2-135m", **engine_options: Any) -> None:
        """Load `model` (a registered name, a .gguf file or a Hugging Face folder) into an engine.

        `engine_options` are kiln.engine.arg_utils.EngineArgs fields (the same options as the CLI
        flags: `dtype`, `kv_cache_memory`, `kv_cache_dtype`, `max_num_seqs`, `speculative_model`,
        `fused_decode_step`, ...); an unknown one is a TypeError that lists them. The model is loaded
        and run on the calling thread: drive this object from that thread (see LLMEngine.from_config).
        """
        self.engine_args = EngineArgs.from_kwargs(model=model, **engine_options)
        self.engine = LLMEngine.from_config(self.engine_args.create_engine_config())
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`.

        `lora_request`: one LoRARequest for every prompt, or one (or None: the base model) per prompt; an
        adapter named with a path the engine does not hold yet is loaded first (needs `loras=` or
        `max_loras=` when the LLM was built)."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        loras = list(lora_request) if isinstance(lora_request, (list, tuple)) else [lora_request] * len(prompts)
        if len(loras) != len(prompts):
            raise ValueError("lora_request must be one LoRARequest or one per prompt")
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                ids.append(self.engine.add_request(prompt, params, priority=priority[i] if priority else 0,
                                                   lora_request=loras[i]))
        except Exception:
            self.engine.abort_request(ids)
            raise
        results: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generate", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        results[out.request_id] = out
                        bar.update(1)
        return [results[i] for i in ids]

    def load_lora(self, name: str, path: str) -> None:
        """Load the PEFT adapter folder `path` as `name` (then `LoRARequest(name)` picks it)."""
        self.engine.add_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.engine.remove_lora(name)

    def list_loras(self) -> list[str]:
        return self.engine.list_loras()

    def generate_stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None,
                        lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time this request progresses (see `.outputs[i].delta_text`)."""
        rid = self.engine.add_request(prompt, sampling_params, lora_request=lora_request)
        try:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id == rid:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(rid)

    def apply_chat_template(self, messages: list[Message]) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One conversation (a list of messages) or many; the chat template is applied to each."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self._chat_prompt(conv) for conv in conversations]  # type: ignore[arg-type]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _chat_prompt(self, conversation: list[Message]) -> dict[str, Any]:
        text = self.apply_chat_template(conversation)
        # The template already contains any BOS the model wants; don't add another.
        return {"prompt": text, "prompt_token_ids": self.tokenizer.encode(text, add_special_tokens=False)}
