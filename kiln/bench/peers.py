"""Peers measured in the same run as kiln: Hugging Face transformers and llama.cpp.

Each runner takes token-id prompts (already chat-templated by kiln's tokenizer, so every
system sees exactly the same tokens), greedy decoding, a fixed number of new tokens
(EOS suppressed), and returns a result dict. They are only imported when installed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any


def transformers_available() -> bool:
    try:
        import accelerate  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_server_available() -> bool:
    """llama-cpp-python with its [server] extra (sse-starlette, starlette-context, pydantic-settings)."""
    try:
        import llama_cpp.server.app  # noqa: F401
    except ImportError:
        return False
    return True


def load_transformers(gguf_path: Path, dtype: str = "float32"):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=getattr(torch, dtype))
    model.eval()
    return model


def transformers_decode_tok_s(model, prompt: list[int], max_tokens: int) -> float:
    """Greedy decode tok/s of `generate` after `prompt`: a `max_tokens` generation minus a 1-token one
    (the prefill and the first token), in inference mode."""
    import torch

    ids = torch.tensor([prompt])
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(input_ids=ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
        first = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
        total = time.perf_counter() - start
    return (out.shape[1] - len(prompt) - 1) / max(total - first, 1e-9)


def transformers_generate_static(
    gguf_path: Path, prompts: list[list[int]], max_tokens: int, batch_size: int, pad_id: int
) -> dict[str, Any]:
    """HF `generate` with static batches (left-padded), greedy, exactly max_tokens new tokens each."""
    import torch

    model = load_transformers(gguf_path)
    generated = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i:i + batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=pad_id)
            generated += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return {"system": f"transformers generate (fp32, static batch {batch_size})", "elapsed_s": elapsed,
            "output_tokens": generated}


def transformers_latency(gguf_path: Path, prompt: list[int], long_prompt: list[int], max_tokens: int) -> dict[str, Any]:
    import torch

    model = load_transformers(gguf_path)
    with torch.inference_mode():
        model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=4, do_sample=False)
        start = time.perf_counter()
        model(torch.tensor([long_prompt]))
        prefill = len(long_prompt) / (time.perf_counter() - start)
    return {"system": "transformers (fp32)", "prefill_tok_s": prefill,
            "decode_tok_s": transformers_decode_tok_s(model, prompt, max_tokens)}


def _llama(gguf_path: Path, threads: int, n_ctx: int = 4096):
    from llama_cpp import Llama

    return Llama(model_path=str(gguf_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                 n_batch=512, verbose=False, logits_all=False)


def llama_cpp_sequential(
    gguf_path: Path, prompts: list[list[int]], max_tokens: int, threads: int, eos_ids: list[int]
) -> dict[str, Any]:
    """llama-cpp-python serves one request at a time: run the prompts back to back."""
    llm = _llama(gguf_path, threads)
    bias = {int(e): -1e9 for e in eos_ids}
    generated = 0
    start = time.perf_counter()
    for p in prompts:
        llm.reset()
        out = llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, logit_bias=bias)
        generated += out["usage"]["completion_tokens"]
    elapsed = time.perf_counter() - start
    return {"system": f"llama.cpp via llama-cpp-python (sequential, {threads} threads)", "elapsed_s": elapsed,
            "output_tokens": generated}


def llama_cpp_latency(gguf_path: Path, prompt: list[int], long_prompt: list[int], max_tokens: int, threads: int,
                      eos_ids: list[int]) -> dict[str, Any]:
    llm = _llama(gguf_path, threads)
    bias = {int(e): -1e9 for e in eos_ids}
    llm.create_completion(prompt, max_tokens=4, temperature=0.0)
    llm.reset()
    start = time.perf_counter()
    llm.eval(long_prompt)
    prefill = len(long_prompt) / (time.perf_counter() - start)
    llm.reset()
    start = time.perf_counter()
    llm.create_completion(prompt, max_tokens=1, temperature=0.0, logit_bias=bias)
    first = time.perf_counter() - start
    llm.reset()
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, logit_bias=bias)
    total = time.perf_counter() - start
    n = out["usage"]["completion_tokens"]
    return {"system": f"llama.cpp via llama-cpp-python ({threads} threads)", "prefill_tok_s": prefill,
            "decode_tok_s": (n - 1) / max(total - first, 1e-9)}
