"""`LoRARequest`: which adapter a request runs with (vLLM's names). Pure Python, no torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class LoRARequest:
    """An adapter by name, and where to load it from if the engine does not hold it yet.

    `lora_int_id` is accepted for vLLM compatibility and otherwise unused: kiln numbers every adapter
    it loads itself (a fresh id per load, so a reloaded adapter never shares prefix-cache blocks with
    the old weights). `lora_path` may be empty when `lora_name` is already loaded (`--lora`,
    `LLM.load_lora`, `POST /v1/load_lora_adapter`).
    """

    lora_name: str
    lora_int_id: int = 0
    lora_path: str = ""


def parse_lora_spec(spec: str) -> tuple[str, str]:
    """`NAME=PATH` (a `--lora` value) → (name, path); ValueError saying the expected form otherwise."""
    name, sep, path = spec.partition("=")
    if not sep or not name.strip() or not path.strip():
        raise ValueError(f"--lora {spec!r}: expected NAME=PATH (a PEFT adapter folder), e.g. --lora sql=./sql-lora")
    return name.strip(), path.strip()
