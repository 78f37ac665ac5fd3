"""`LLM`: the offline Python API (vLLM-compatible names), driving an LLMEngine."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from tqdm import tqdm

from kiln.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from kiln.engine.kv_budget import parse_memory
from kiln.engine.llm_engine import LLMEngine, PromptInput
from kiln.outputs import RequestOutput
from kiln.sampling_params import SamplingParams

Message = dict[str, Any]


class LLM:
    """Load a model once, then generate for many prompts with continuous batching.

    >>> llm = LLM("smollm2-135m")
    >>> llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=16))[0].outputs[0].text
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        dtype: str = "auto",
        device: str = "cpu",
        kv_cache_memory: str | int | None = None,
        block_size: int = 16,
        enable_prefix_caching: bool = True,
        max_num_seqs: int = 64,
        max_num_batched_tokens: int = 512,
        max_model_len: int | None = None,
        enable_chunked_prefill: bool = True,
        quantized_weights: str = "auto",
        speculative_model: str | None = None,
        num_speculative_tokens: int = 4,
        ngram_min: int = 1,
        ngram_max: int = 4,
        kv_cache_dtype: str = "auto",
        speculative_disable_by_batch_size: int = 2,
        speculative_adaptive: bool = True,
        fused_decode_step: bool = True,
    ) -> None:
        """`quantized_weights`: 'auto' runs GGUF Q4_0/Q4_1/Q8_0 matrices in their blocks with kiln's
        native kernels (CPU), 'dequantize' expands them to `dtype` (see kiln.loader.model_loader).
        `speculative_model='ngram'` turns on prompt-lookup speculative decoding with up to
        `num_speculative_tokens` drafts per step; 'self:int4' / 'self:int8' draft with a quantized
        copy of the model, any other name/path with that draft model (same tokenizer). Lossless:
        outputs follow the model's distribution; a step with more than `speculative_disable_by_batch_size`
        running sequences does not speculate, nor (with `speculative_adaptive`) one at a batch size where
        speculating steps have been measured to be slower than plain ones.
        `kv_cache_dtype`: 'auto' keeps K/V in the model dtype (float16 under a float32 model on the
        CPU, as llama.cpp does); 'float32' / 'bfloat16' / 'float16' pick a float cache;
        'int8' or 'fp8_e4m3' store them in 1 byte per value plus a scale per token and head, so the same
        `kv_cache_memory` holds ~1.9x the tokens of a bf16 cache (~3.8x of fp32), at a small quality cost.
        `fused_decode_step`: run a pure decode step's whole decoder stack in one native call where the
        model allows it (kiln.kernels.decode_step; bit-identical to the plain op-by-op path)."""
        cache = CacheConfig(
            block_size=block_size, kv_cache_memory=parse_memory(kv_cache_memory), enable_prefix_caching=enable_prefix_caching,
            kv_cache_dtype=kv_cache_dtype,
        )
        sched = SchedulerConfig(
            max_num_batched_tokens=max_num_batched_tokens,
            max_num_seqs=max_num_seqs,
            enable_chunked_prefill=enable_chunked_prefill,
            max_model_len=max_model_len,
        )
        spec = None
        if speculative_model is not None:
            spec = SpeculativeConfig.from_name(speculative_model, num_speculative_tokens, ngram_min, ngram_max,
                                               speculative_disable_by_batch_size, speculative_adaptive)
        self.engine = LLMEngine.from_model(model, dtype, device, cache, sched, quantized_weights=quantized_weights,
                                           speculative_config=spec)
        self.engine.loaded.model.fused_decode_step = fused_decode_step
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: PromptInput | Sequence[PromptInput],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of `prompts`."""
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError("sampling_params must be one SamplingParams or one per prompt")
        ids = []
        try:
            for i, (prompt, params) in enumerate(zip(prompts, params_list)):
                ids.append(self.engine.add_request(prompt, params, priority=priority[i] if priority else 0))
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

    def generate_stream(self, prompt: PromptInput, sampling_params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield a RequestOutput each time this request progresses (see `.outputs[i].delta_text`)."""
        rid = self.engine.add_request(prompt, sampling_params)
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
