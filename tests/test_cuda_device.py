"""The whole engine on a CUDA device, against the same engine on the CPU and against transformers.

These run only where torch sees a GPU (the CI machines have none; a GPU machine runs them with
`pytest tests/test_cuda_device.py`). They keep the device a parameter end to end: real tiny
models loaded onto `cuda`, paged KV caches allocated there, prefill through SDPA, decode through
the gather + SDPA path (the native kernels and the fused decode step are CPU-only and must stand
aside), chunked prefill, prefix caching, preemption, quantized KV caches and speculative decoding.
The CPU run of the same engine is the reference: teacher-forced next-token log-probabilities must
agree, and greedy continuations must agree wherever the CPU's top two tokens are not a near-tie.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Token ids of three prompts; the 150-token one is prefilled in 64-token chunks.
PROMPTS = [[1, 2, 3, 4, 5, 6, 7], [9, 40, 41, 42, 43, 9, 40, 41], [(7 * i) % 250 + 3 for i in range(150)]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):
    from loader.tiny_model import build_tiny_models

    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _llm(path: Path, device: str, dtype: str, kv_cache_dtype: str = "auto", **kw):
    from kiln import LLM

    kw.setdefault("kv_cache_memory", 1 << 22)
    return LLM(str(path), dtype=dtype, device=device, kv_cache_dtype=kv_cache_dtype, max_num_batched_tokens=64, **kw)


def _prompt_logprobs(llm) -> list[torch.Tensor]:
    """Teacher-forced log-probability of each prompt token after the first, per prompt."""
    from kiln import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=1))
    return [torch.tensor([lp[t] for lp, t in zip(o.prompt_logprobs[1:], p[1:])]) for o, p in zip(outs, PROMPTS)]


def _greedy(llm, max_tokens: int = 24) -> list[list[int]]:
    from kiln import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS],
                        SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("variant", ["tied", "untied"])
# float32 with a float32 cache: only summation order differs between the devices; a bf16 model and
# 1-byte caches round on both sides. (`auto` differs by device: float16 under fp32 on the CPU.)
@pytest.mark.parametrize("dtype, kv_cache_dtype, tol", [("float32", "float32", 1e-4), ("bfloat16", "auto", 0.1),
                                                        ("float32", "int8", 0.05), ("float32", "fp8_e4m3", 0.2)])
def test_cuda_engine_matches_cpu_engine(tiny, variant, dtype, kv_cache_dtype, tol) -> None:
    cpu = _llm(tiny.gguf[variant], "cpu", dtype, kv_cache_dtype)
    gpu = _llm(tiny.gguf[variant], "cuda", dtype, kv_cache_dtype)
    model = gpu.engine.loaded.model
    assert next(model.parameters()).device.type == "cuda"
    assert model.decode_plan() is None  # the CPU-only fused step stands aside on CUDA
    # teacher-forced: every position of every prompt (chunked prefill for the long one)
    for lc, lg in zip(_prompt_logprobs(cpu), _prompt_logprobs(gpu)):
        assert (lc - lg).abs().max().item() < tol
    # generation: decode steps through the paged cache on the GPU
    if kv_cache_dtype == "float32":
        assert _greedy(cpu) == _greedy(gpu)
    out = _greedy(gpu)
    assert all(len(t) == 24 for t in out)


def test_cuda_prefix_caching_preemption_and_speculation_keep_outputs(tiny) -> None:
    reference = _greedy(_llm(tiny.gguf["untied"], "cuda", "float32", "float32"))
    # a repeated prompt hits the prefix cache; the outputs must not change, and no block leaks
    llm = _llm(tiny.gguf["untied"], "cuda", "float32", "float32")
    assert _greedy(llm) == reference
    hits = llm.engine.kv_manager.prefix_cache_hits
    assert _greedy(llm) == reference
    assert llm.engine.kv_manager.prefix_cache_hits > hits
    assert llm.engine.kv_manager.get_num_free_blocks() == llm.engine.kv_budget.num_blocks
    # 14 blocks of 16 tokens: the long prompt alone needs 11 with its output, all three need 15
    kv_bytes = 14 * 16 * llm.engine.model_config.kv_bytes_per_token(4)
    small = _llm(tiny.gguf["untied"], "cuda", "float32", "float32", kv_cache_memory=kv_bytes)
    assert small.engine.kv_budget.num_blocks == 14
    assert _greedy(small) == reference
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.kv_manager.get_num_free_blocks() == 14
    # n-gram speculative decoding: lossless under greedy
    spec = _llm(tiny.gguf["untied"], "cuda", "float32", "float32", speculative_model="ngram", num_speculative_tokens=4,
                speculative_disable_by_batch_size=8, speculative_adaptive=False)
    assert _greedy(spec) == reference


def test_cuda_matches_transformers_on_the_same_safetensors(tiny) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny.hf["untied"]), dtype=torch.float32).cuda().eval()
    gpu = _llm(tiny.hf["untied"], "cuda", "float32", "float32")
    for p, lg in zip(PROMPTS, _prompt_logprobs(gpu)):
        with torch.inference_mode():
            ref = torch.log_softmax(hf(torch.tensor([p], device="cuda")).logits[0].float(), -1)
        ref_lp = ref[torch.arange(len(p) - 1), torch.tensor(p[1:])].cpu()
        assert (ref_lp - lg).abs().max().item() < 1e-4


def test_cuda_attention_runs_torch_sdpa_kernels(tiny) -> None:
    """Prefill and decode on CUDA go through torch's fused attention kernels, not a math fallback."""
    from torch.profiler import ProfilerActivity, profile

    gpu = _llm(tiny.gguf["untied"], "cuda", "bfloat16")
    _greedy(gpu, max_tokens=2)  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _greedy(gpu, max_tokens=4)
    events = {e.key: e.count for e in prof.key_averages()}
    sdpa = {n: c for n, c in events.items() if "scaled_dot_product" in n or "attention" in n.lower()
            or "fmha" in n.lower() or "flash" in n.lower()}
    print("\nattention ops and kernels on CUDA (name: calls):", sdpa)  # for the record; pytest -s shows it
    assert any("scaled_dot_product" in n for n in sdpa), sorted(events)[:40]
    fused = [n for n in sdpa if "flash" in n.lower() or "fmha" in n.lower() or "efficient_attention" in n.lower()]
    assert fused, sorted(events)[:60]
