"""The tiny base model and two peft-made adapters every LoRA test shares (made once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest
from loader.tiny_model import build_tiny_models

from kiln import LLM
from lora.peft_adapters import (
    ALL_TARGETS,
    TEXT,
    load_hf,
    peft_model,
    reference_greedy,
    train_adapter,
)


class Adapters:
    def __init__(self, root: Path) -> None:
        models = build_tiny_models(root / "models")
        self.base = models.hf["tied"]
        self.gguf = models.gguf["tied"]
        tok = LLM(str(self.base), dtype="float32", kv_cache_memory="4MiB").tokenizer
        self.ids = tok.encode(TEXT, add_special_tokens=False)[:60]
        base_model = load_hf(self.base)
        # A: every target, rank 8; B: q/v/down only, rank 4, rsLoRA scaling (a different scale rule)
        self.a = train_adapter(self.base, root / "a", seed=0, targets=ALL_TARGETS, rank=8, alpha=16,
                               token_ids=self.ids, base_model=base_model)
        self.b = train_adapter(self.base, root / "b", seed=1, targets=["q_proj", "v_proj", "down_proj"], rank=4,
                               alpha=8, rslora=True, token_ids=self.ids[10:50], lr=5e-2, base_model=base_model)
        self.prompts = [self.ids[:9], self.ids[20:31], self.ids[5:12]]
        self.refs = {"base": base_model, "a": peft_model(self.base, self.a), "b": peft_model(self.base, self.b)}

    def expected(self, which: str, prompt: list[int], n: int = 12) -> list[int]:
        return reference_greedy(self.refs[which], prompt, n)


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    return Adapters(tmp_path_factory.mktemp("lora"))


