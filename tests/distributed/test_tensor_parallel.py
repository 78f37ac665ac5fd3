"""Tensor parallel (kiln.distributed) on gloo: TP=2 against TP=1 on tiny random models.

The reference is kiln's own one-process engine (itself held to transformers by
tests/models/test_reference_match.py): the same prompts through TP=1 and TP=2 must give the same
greedy tokens and the same seeded samples, and their teacher-forced logits (every prompt row of the
prompt + TP=1's output, recorded where the runner hands them to the sampler) must agree within 1e-4
relative, for GGUF models with dense, Q8_0 and Q4_0/Q4_1 block layers, a kiln INT4 folder and an int8
KV cache. Then the failure paths: a worker that dies fails the engine with one clear error (no hang),
closing the engine leaves no worker process, and a bad size is one error naming the valid ones.
Every engine runs 1 thread per rank (more threads than cores makes OpenMP spin against the other ranks).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from loader.tiny_model import TinyModels, build_tiny_models

from kiln import LLM, SamplingParams
from kiln.distributed.comm import TensorParallelError

COMMON = {"threads": 1, "kv_cache_memory": 1 << 20, "max_num_batched_tokens": 64, "max_num_seqs": 8}
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinyModels:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models")


def _prompts(vocab: int, n: int = 8) -> list[list[int]]:
    gen = torch.Generator().manual_seed(7)
    lengths = [3, 9, 17, 24, 33, 40, 12, 70][:n]  # 70 > the 64-token budget: a chunked prefill
    return [torch.randint(3, vocab, (k,), generator=gen).tolist() for k in lengths]


def _record_logits(llm: LLM) -> list[torch.Tensor]:
    """Every logits tensor the runner hands to sampling / prompt logprobs, in order."""
    runner = llm.engine.runner
    seen: list[torch.Tensor] = []
    inner = runner._compute_logits

    def recording(hidden: torch.Tensor, rows: list[int]) -> torch.Tensor:
        out = inner(hidden, rows)
        seen.append(out.clone())
        return out

    runner._compute_logits = recording  # type: ignore[method-assign]
    return seen


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], params)]


def _teacher_forced(llm: LLM, sequences: list[list[int]]) -> torch.Tensor:
    seen = _record_logits(llm)
    _tokens(llm, sequences, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0))
    return torch.cat(seen)


def _assert_close_relative(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> None:
    assert a.shape == b.shape and a.shape[0] > 0
    err = ((a - b).abs().amax(dim=-1) / a.abs().amax(dim=-1)).max().item()
    print(f"largest relative logit difference over {a.shape[0]} rows: {err:.2e}")  # shown with pytest -s
    assert err <= rel, f"largest relative logit difference {err:.2e} > {rel:.0e}"


@pytest.fixture()
def engines() -> Iterator[Callable[..., LLM]]:
    """Build LLMs; every tensor-parallel one is closed (and its workers checked gone) after the test."""
    made: list[LLM] = []

    def make(path: Path | str, tp: int = 1, **kwargs) -> LLM:
        llm = LLM(str(path), tensor_parallel_size=tp, **{**COMMON, **kwargs})
        made.append(llm)
        return llm

    yield make
    for llm in made:
        processes = getattr(llm.engine.runner, "processes", None)
        llm.engine.close()
        if processes is not None:
            assert all(not p.is_alive() for p in processes.processes), "a worker outlived its engine"


def _compare(tp1: LLM, tp2: LLM, prompts: list[list[int]]) -> None:
    greedy1 = _tokens(tp1, prompts, GREEDY)
    assert _tokens(tp2, prompts, GREEDY) == greedy1
    forced = [p + g for p, g in zip(prompts, greedy1)]
    _assert_close_relative(_teacher_forced(tp1, forced), _teacher_forced(tp2, forced))


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_gguf_tp2_matches_tp1(tiny: TinyModels, engines, variant: str) -> None:
    # tied: F16 attention (dense), Q8_0 MLP and embedding (native blocks; the tied LM head reads them);
    # untied: Q4_0/Q4_1 attention in blocks, Q5_1 down_proj (dense), a BF16 LM head split by vocabulary.
    path = tiny.gguf[variant]
    tp1, tp2 = engines(path), engines(path, tp=2)
    assert "gguf" in tp2.engine.loaded.model.layers[0].mlp.gate_up_proj.method.name  # still in blocks
    _compare(tp1, tp2, _prompts(tp1.engine.model_config.vocab_size))


def test_seeded_sampling_and_int8_kv_cache(tiny: TinyModels, engines) -> None:
    path = tiny.gguf["tied"]
    tp1, tp2 = engines(path, kv_cache_dtype="int8"), engines(path, tp=2, kv_cache_dtype="int8")
    prompts = _prompts(tp1.engine.model_config.vocab_size)
    _compare(tp1, tp2, prompts)
    seeded = [SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, seed=100 + i, ignore_eos=True)
              for i in range(len(prompts))]
    assert _tokens(tp2, prompts, seeded) == _tokens(tp1, prompts, seeded)


def test_kiln_int4_folder_tp2_matches_tp1(tiny: TinyModels, engines, tmp_path: Path) -> None:
    from kiln.entrypoints.cli import main as kiln_main

    calib = tmp_path / "calib.txt"
    calib.write_text("the cat sat on the mat and the hat " * 200)
    out = tmp_path / "int4"
    assert kiln_main(["quantize", str(tiny.hf["untied"]), "--method", "rtn", "--bits", "4", "--group-size", "32",
                      "--calib-file", str(calib), "--calib-samples", "2", "--calib-seqlen", "64", "-o", str(out)]) == 0
    tp1, tp2 = engines(out), engines(out, tp=2)
    assert "int4" in tp2.engine.loaded.model.layers[0].mlp.down_proj.method.name
    _compare(tp1, tp2, _prompts(tp1.engine.model_config.vocab_size))


def test_dead_worker_fails_the_engine_with_one_clear_error(tiny: TinyModels, engines) -> None:
    llm = engines(tiny.gguf["tied"], tp=2)
    engine = llm.engine
    engine.add_request({"prompt_token_ids": [5, 6, 7, 8]}, SamplingParams(max_tokens=200, ignore_eos=True))
    engine.step()
    worker = engine.runner.processes.processes[0]
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(10)
    start = time.monotonic()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(exit code -9\).*restart"):
        for _ in range(5):
            engine.step()
    assert time.monotonic() - start < 30, "the engine waited on the dead rank"
    with pytest.raises(TensorParallelError, match="rank 1"):
        engine.step()  # and every later step fails at once


def test_size_that_splits_no_head_evenly_names_the_valid_sizes(tiny: TinyModels) -> None:
    with pytest.raises(ValueError, match=r"tensor_parallel_size 3 .*valid sizes: 1, 2, 4"):
        LLM(str(tiny.gguf["tied"]), tensor_parallel_size=3, **COMMON)
