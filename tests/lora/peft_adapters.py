"""PEFT adapters made in the tests: a few seeded optimizer steps of `peft` LoRA on a base model that
`transformers` loads, saved in PEFT's own format (adapter_config.json + adapter_model.safetensors).
Nothing here imports kiln: the adapters and the reference outputs come from peft and transformers."""

from __future__ import annotations

from pathlib import Path

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("The cat sat on the mat. The cat is on the mat and the hat is on the cat. "
        "Hello world, hello cat, hello mat. ") * 4


def load_hf(base: Path | str, gguf_file: str | None = None) -> torch.nn.Module:
    import transformers

    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    model = transformers.AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32, **kwargs)
    return model.eval()


def train_adapter(base: Path | str, out: Path, *, seed: int, targets: list[str], rank: int, alpha: float,
                  token_ids: list[int], steps: int = 4, lr: float = 2e-2, rslora: bool = False,
                  gguf_file: str | None = None, base_model: torch.nn.Module | None = None) -> Path:
    """Train a LoRA adapter for `steps` Adam steps on `token_ids` (next-token loss) and save it in `out`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = base_model if base_model is not None else load_hf(base, gguf_file)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_rslora=rslora,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    peft_model.train()
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    ids = torch.tensor([token_ids])
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(str(out), safe_serialization=True)
    peft_model.unload()  # the base model's modules back as they were (a shared base_model is reused)
    return out


def peft_model(base: Path | str, adapter: Path, gguf_file: str | None = None) -> torch.nn.Module:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_hf(base, gguf_file), str(adapter)).eval()


@torch.no_grad()
def reference_logits(model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([token_ids])).logits[0].float()


@torch.no_grad()
def reference_greedy(model: torch.nn.Module, token_ids: list[int], max_new: int) -> list[int]:
    """Greedy continuation with the full sequence re-run each step (no cache: the plainest reference)."""
    ids = list(token_ids)
    for _ in range(max_new):
        ids.append(int(reference_logits(model, ids)[-1].argmax()))
    return ids[len(token_ids):]
