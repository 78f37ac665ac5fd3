"""Two LoRA adapters trained here with peft on the default model's own weights (SmolLM2-135M, loaded
by transformers from kiln's GGUF, fp32): kiln's greedy outputs for 5 prompts equal transformers +
peft's for each adapter, one at a time and with base and both adapters mixed in one batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("peft", reason="LoRA reference tests need the test extras (peft)")

from kiln import LLM, LoRARequest, SamplingParams
from kiln.data import data_path
from lora.peft_adapters import ALL_TARGETS, train_adapter

pytestmark = pytest.mark.real_model

NEW_TOKENS = 24
PROMPTS = ["The capital of France is", "Once upon a time, in a small village,", "def fibonacci(n):",
           "The three primary colors are", "It is a truth universally acknowledged that"]


@pytest.fixture(scope="module")
def setup(default_gguf_path: Path, hf_reference, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("lora-real")
    folder = str(default_gguf_path.parent)
    base = hf_reference[0]  # transformers' fp32 model of the same GGUF (one load for the session)
    llm = LLM(str(default_gguf_path), dtype="float32", quantized_weights="dequantize", kv_cache_memory="64MiB",
              max_loras=2, max_lora_rank=16)
    tok = llm.tokenizer
    austen = data_path("longdocs/pride_and_prejudice_pg1342.txt").read_text(encoding="utf-8")[20000:21500]
    shakespeare = data_path("longdocs/tinyshakespeare_input.txt").read_text(encoding="utf-8")[:1500]
    # A: all seven projections, rank 8; B: attention only, rank 16, rsLoRA
    a = train_adapter(folder, root / "austen", seed=0, targets=ALL_TARGETS, rank=8, alpha=16, steps=4, lr=5e-3,
                      token_ids=tok.encode(austen, add_special_tokens=False)[:128], base_model=base)
    b = train_adapter(folder, root / "shakespeare", seed=1, targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                      rank=16, alpha=16, rslora=True, steps=4, lr=5e-3,
                      token_ids=tok.encode(shakespeare, add_special_tokens=False)[:128], base_model=base)
    llm.load_lora("austen", str(a))
    llm.load_lora("shakespeare", str(b))
    prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]
    return llm, base, {"austen": a, "shakespeare": b}, prompts


@torch.no_grad()
def _hf_greedy(model: torch.nn.Module, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                             min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
        outs.append(gen[0, len(p):].tolist())
    return outs


def test_greedy_outputs_equal_transformers_peft_for_two_adapters(setup) -> None:
    from peft import PeftModel

    llm, base, adapters, prompts = setup
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    expected = {"base": _hf_greedy(base, prompts)}
    for adapter, path in adapters.items():
        ref = PeftModel.from_pretrained(base, str(path)).eval()
        expected[adapter] = _hf_greedy(ref, prompts)
        ref.unload()  # the shared reference model back to the base
        assert expected[adapter] != expected["base"], f"{adapter} should change some greedy output"
        ours = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, lora_request=LoRARequest(adapter))]
        assert ours == expected[adapter], adapter
    # all three in one batch: each request gets what it gets alone
    mixed_loras = [None, LoRARequest("austen"), LoRARequest("shakespeare")] * len(prompts)
    mixed_prompts = [p for p in prompts for _ in range(3)]
    mixed = [list(o.outputs[0].token_ids) for o in llm.generate(mixed_prompts, params, lora_request=mixed_loras)]
    want = [expected[w][i] for i in range(len(prompts)) for w in ("base", "austen", "shakespeare")]
    assert mixed == want
