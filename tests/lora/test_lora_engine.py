"""LoRA adapters on a tiny random Llama (fast): kiln against transformers + peft running the same adapter.

The adapters are made here with peft (a few seeded Adam steps on a small text) and saved in PEFT's
format; kiln loads those folders. Checked: logits and greedy tokens equal to peft's (fp32), on dense
and GGUF-block base weights; a batch mixing base and two adapters gives each request its solo tokens;
the prefix cache never shares blocks across adapters; LRU eviction with fewer slots than adapters;
bad adapters give one clear error and the engine keeps serving.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA reference tests need the test extras (peft)")

from loader.tiny_model import TinySpec, make_checkpoint, write_hf_folder

from kiln import LLM, LoRARequest, SamplingParams
from kiln.eval.forward import window_logits
from kiln.lora.adapter import LoRAError
from lora.conftest import Adapters
from lora.peft_adapters import reference_logits, train_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def llm(adapters: Adapters) -> LLM:
    return LLM(str(adapters.base), dtype="float32", kv_cache_memory="8MiB",
               loras=[f"a={adapters.a}", f"b={adapters.b}"], max_lora_rank=8)


def _tokens(outs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("name", ["a", "b"])
def test_logits_match_peft(adapters: Adapters, llm: LLM, name: str) -> None:
    model = llm.engine.loaded.model
    window = adapters.ids[:24]
    with llm.engine.lora.applied(name):
        ours = window_logits(model, window)
    ref = reference_logits(adapters.refs[name], window)
    base = reference_logits(adapters.refs["base"], window)
    assert (ref - base).abs().max() > 1.0  # the adapter really changes the model
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    # outside `applied` the model is the base model again
    torch.testing.assert_close(window_logits(model, window), base, atol=1e-4, rtol=1e-4)


def test_greedy_tokens_match_peft(adapters: Adapters, llm: LLM) -> None:
    for name in ("a", "b"):
        outs = llm.generate(adapters.prompts, GREEDY, lora_request=LoRARequest(name))
        assert _tokens(outs) == [adapters.expected(name, p) for p in adapters.prompts], name


def test_mixed_batch_gives_each_request_its_solo_tokens(adapters: Adapters, llm: LLM) -> None:
    prompts, loras = [], []
    for p in adapters.prompts:
        for name in (None, "a", "b"):
            prompts.append(p)
            loras.append(LoRARequest(name) if name else None)
    mixed = _tokens(llm.generate(prompts, GREEDY, lora_request=loras))
    alone = [_tokens(llm.generate([p], GREEDY, lora_request=lr))[0] for p, lr in zip(prompts, loras)]
    assert mixed == alone
    # and each equals its reference (the base rows untouched by the adapters' deltas)
    assert mixed[:3] == [adapters.expected(w, adapters.prompts[0]) for w in ("base", "a", "b")]


def test_prefix_cache_is_never_shared_across_adapters(adapters: Adapters, llm: LLM) -> None:
    prompt = adapters.ids[:40]  # two full 16-token blocks
    params = SamplingParams(temperature=0, max_tokens=2)
    first = llm.generate([prompt], params, lora_request=LoRARequest("a"))[0]
    again = llm.generate([prompt], params, lora_request=LoRARequest("a"))[0]
    other = llm.generate([prompt], params, lora_request=LoRARequest("b"))[0]
    base = llm.generate([prompt], params)[0]
    assert again.num_cached_tokens == 32  # same adapter: its blocks are reused
    assert other.num_cached_tokens == 0 and base.num_cached_tokens == 0
    assert first.outputs[0].token_ids == again.outputs[0].token_ids


def test_lru_eviction_with_one_slot(adapters: Adapters) -> None:
    llm = LLM(str(adapters.base), dtype="float32", kv_cache_memory="8MiB", loras=[f"a={adapters.a}", f"b={adapters.b}"],
              max_loras=1, max_lora_rank=8)
    lora = llm.engine.lora
    p = adapters.prompts[0]
    for name in ("a", "b", "a"):
        assert _tokens(llm.generate([p], GREEDY, lora_request=LoRARequest(name)))[0] == adapters.expected(name, p)
    assert lora.num_loads == 3  # each switch evicted the other adapter
    llm.generate([p], GREEDY, lora_request=LoRARequest("a"))
    assert lora.num_loads == 3  # resident: no reload
    # both adapters queued at once with one slot: B waits until A's requests finish, then evicts it
    outs = llm.generate([p, p, p], GREEDY, lora_request=[LoRARequest("a"), LoRARequest("b"), None])
    assert _tokens(outs) == [adapters.expected(w, p) for w in ("a", "b", "base")]
    assert not lora.holders and lora.num_loads == 4


def test_adapter_on_gguf_block_weights(adapters: Adapters) -> None:
    """The delta is added after the layer's own method, so base weights in GGUF blocks (run by kiln's
    block kernels) serve the adapter as well as dense ones: within the GGUF path's own distance."""
    llm = LLM(str(adapters.gguf), dtype="float32", kv_cache_memory="8MiB", loras=[f"a={adapters.a}"], max_lora_rank=8)
    model = llm.engine.loaded.model
    assert any(m.method.name != "dense" for m in model.modules() if hasattr(m, "method"))
    window = adapters.ids[:24]
    base_err = (window_logits(model, window) - reference_logits(adapters.refs["base"], window)).abs().max()
    with llm.engine.lora.applied("a"):
        lora_err = (window_logits(model, window) - reference_logits(adapters.refs["a"], window)).abs().max()
    assert lora_err <= 2 * base_err + 1e-3, (lora_err, base_err)


def test_bad_adapters_are_refused_and_the_engine_keeps_serving(adapters: Adapters, tmp_path: Path) -> None:
    llm = LLM(str(adapters.base), dtype="float32", kv_cache_memory="8MiB", max_loras=2, max_lora_rank=4)
    with pytest.raises(LoRAError, match="rank 8 exceeds --max-lora-rank 4"):
        llm.load_lora("big", str(adapters.a))
    with pytest.raises(LoRAError, match="missing adapter_model.safetensors"):
        missing = tmp_path / "missing"
        missing.mkdir()
        shutil.copy(adapters.b / "adapter_config.json", missing)
        llm.load_lora("missing", str(missing))
    with pytest.raises(LoRAError, match="no such adapter folder"):
        llm.load_lora("nowhere", str(tmp_path / "nowhere"))
    # an adapter on the LM head: not a module kiln adapts
    head = train_adapter(adapters.base, tmp_path / "head", seed=2, targets=["lm_head"], rank=2, alpha=2,
                         token_ids=adapters.ids[:20], steps=1)
    with pytest.raises(LoRAError, match="kiln adapts q_proj, k_proj"):
        llm.load_lora("head", str(head))
    # an adapter trained on another base model (hidden size 32 instead of 64)
    other_base = write_hf_folder(make_checkpoint(TinySpec(hidden=32, ffn=64, heads=2, kv_heads=1)), tmp_path / "other")
    other = train_adapter(other_base, tmp_path / "other-lora", seed=3, targets=["q_proj"], rank=2, alpha=2,
                          token_ids=adapters.ids[:20], steps=1)
    with pytest.raises(LoRAError, match="trained for another base model"):
        llm.load_lora("other", str(other))
    with pytest.raises(ValueError, match="no LoRA adapter named 'nope'"):
        llm.generate([adapters.prompts[0]], GREEDY, lora_request=LoRARequest("nope"))
    assert llm.list_loras() == []
    # still serving, and an adapter that fits loads after all that
    llm.load_lora("b", str(adapters.b))
    p = adapters.prompts[1]
    outs = llm.generate([p, p], GREEDY, lora_request=[None, LoRARequest("b")])
    assert _tokens(outs) == [adapters.expected("base", p), adapters.expected("b", p)]
    llm.unload_lora("b")
    assert llm.list_loras() == []


def test_lora_off_says_how_to_turn_it_on(adapters: Adapters) -> None:
    llm = LLM(str(adapters.base), dtype="float32", kv_cache_memory="4MiB")
    assert llm.engine.lora is None
    with pytest.raises(ValueError, match="--lora NAME=PATH"):
        llm.generate([adapters.prompts[0]], GREEDY, lora_request=LoRARequest("a", 1, str(adapters.a)))


def test_lora_request_with_a_path_loads_on_first_use(adapters: Adapters) -> None:
    llm = LLM(str(adapters.base), dtype="float32", kv_cache_memory="4MiB", max_loras=1, max_lora_rank=8)
    p = adapters.prompts[2]
    out = llm.generate([p], GREEDY, lora_request=LoRARequest("a", 7, str(adapters.a)))
    assert _tokens(out)[0] == adapters.expected("a", p)
    assert llm.list_loras() == ["a"]


def test_adapter_config_with_unsupported_options_is_refused(adapters: Adapters, tmp_path: Path) -> None:
    dora = shutil.copytree(adapters.b, tmp_path / "dora")
    cfg = json.loads((dora / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    llm = LLM(str(adapters.base), dtype="float32", kv_cache_memory="4MiB", max_loras=1)
    with pytest.raises(LoRAError, match="use_dora not supported"):
        llm.load_lora("dora", str(dora))
