"""Structured outputs on the default model: validity and cost, in one run.

(a) Validity: 50 chat prompts x 5 JSON schemas (nested objects, arrays, enums, required/optional
    fields, numbers with bounds), greedy and sampled (temperature 0.8, top_p 0.95, seeded), each
    prompt alone (single) and all 50 prompts of a schema at once (batched). Every output is parsed
    with `json` and validated with `jsonschema` (the reference validator); the target is 100 %.
(b) Cost: decode tokens/s with and without a schema at batch 1 and 32, same prompts, same run,
    alternating rounds (the machine is shared: each figure is the best of the rounds).

Writes benchmarks/results/structured_output.json.
Usage: python benchmarks/structured_output.py [--prompts N] [--rounds R] [--threads T] [--part validity|throughput]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

import jsonschema
import torch

from kiln import LLM, SamplingParams
from kiln.planner.calibration import cpu_name

OUT = Path(__file__).parent / "results" / "structured_output.json"

SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "nested_objects": ("Describe {s} as a JSON object with an `info` object (its name and a one-word category) and a "
                       "`location` object (country and city).", {
        "type": "object", "properties": {
            "info": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 40},
                                                      "category": {"type": "string", "maxLength": 20}},
                     "required": ["name", "category"], "additionalProperties": False},
            "location": {"type": "object", "properties": {"country": {"type": "string", "maxLength": 30},
                                                          "city": {"type": "string", "maxLength": 30}},
                         "required": ["country", "city"], "additionalProperties": False}},
        "required": ["info", "location"], "additionalProperties": False}),
    "arrays": ("List three facts about {s} and three related words, as JSON.", {
        "type": "object", "properties": {
            "facts": {"type": "array", "items": {"type": "string", "maxLength": 80}, "minItems": 1, "maxItems": 3},
            "words": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3}},
        "required": ["facts", "words"], "additionalProperties": False}),
    "enums": ("Classify {s}: its kind and whether people usually like it, as JSON.", {
        "type": "object", "properties": {
            "kind": {"enum": ["person", "place", "thing", "animal", "food", "idea"]},
            "sentiment": {"enum": ["positive", "neutral", "negative"]},
            "confidence": {"enum": ["low", "medium", "high"]}},
        "required": ["kind", "sentiment", "confidence"], "additionalProperties": False}),
    "required_fields": ("Give the name of {s}, a short description, and optionally a website, as JSON.", {
        "type": "object", "properties": {
            "name": {"type": "string", "maxLength": 40}, "description": {"type": "string", "maxLength": 120},
            "website": {"type": "string", "maxLength": 60}, "verified": {"type": "boolean"}},
        "required": ["name", "description", "verified"], "additionalProperties": False}),
    "bounded_numbers": ("Rate {s} from 0 to 10, give a popularity percentage and a year, as JSON.", {
        "type": "object", "properties": {
            "rating": {"type": "number", "minimum": 0, "maximum": 10},
            "popularity": {"type": "integer", "minimum": 0, "maximum": 100},
            "year": {"type": "integer", "minimum": 1000, "maximum": 2100}},
        "required": ["rating", "popularity", "year"], "additionalProperties": False}),
}
SUBJECTS = [
    "Paris", "the Eiffel Tower", "a golden retriever", "pizza", "Albert Einstein", "the Moon", "a bicycle", "Tokyo",
    "chocolate", "the Amazon river", "a laptop", "Marie Curie", "jazz music", "the Sahara desert", "an elephant",
    "coffee", "Mount Everest", "a violin", "London", "the internet", "a penguin", "sushi", "Leonardo da Vinci",
    "the Pacific Ocean", "a smartphone", "New York", "tea", "a dolphin", "the Great Wall of China", "a guitar",
    "democracy", "Rome", "an apple", "William Shakespeare", "the Sun", "a train", "Berlin", "ice cream", "a tiger",
    "football", "the Nile", "a camera", "Cleopatra", "chess", "Sydney", "a rose", "the piano", "bread", "Mars",
    "a lighthouse",
]
SAMPLED = {"temperature": 0.8, "top_p": 0.95}


def chat_prompts(llm: LLM, instruction: str, n: int) -> list[dict[str, Any]]:
    out = []
    for s in SUBJECTS[:n]:
        text = llm.apply_chat_template([{"role": "user", "content": instruction.format(s=s)}])
        out.append({"prompt": text, "prompt_token_ids": llm.tokenizer.encode(text, add_special_tokens=False)})
    return out


def validity(llm: LLM, n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, (instruction, schema) in SCHEMAS.items():
        prompts = chat_prompts(llm, instruction, n)
        for mode, sampling in (("greedy", {"temperature": 0.0}), ("sampled", SAMPLED)):
            def params(i: int) -> SamplingParams:
                return SamplingParams(max_tokens=256, seed=i, structured_outputs={"json": schema}, **sampling)

            for layout in ("single", "batched"):
                t0 = time.perf_counter()
                if layout == "single":
                    outs = [llm.generate([p], params(i))[0] for i, p in enumerate(prompts)]
                else:
                    outs = llm.generate(prompts, [params(i) for i in range(len(prompts))])
                seconds = time.perf_counter() - t0
                ok, failures, tokens = 0, [], 0
                for out in outs:
                    o = out.outputs[0]
                    tokens += len(o.token_ids)
                    try:
                        jsonschema.validate(json.loads(o.text), schema)
                        ok += 1
                    except (json.JSONDecodeError, jsonschema.ValidationError) as exc:
                        failures.append({"text": o.text, "finish_reason": o.finish_reason, "error": str(exc)[:200]})
                results[f"{name}/{mode}/{layout}"] = {"valid": ok, "total": len(outs), "tokens": tokens,
                                                     "seconds": round(seconds, 2), "failures": failures[:3],
                                                     "example": outs[0].outputs[0].text}
                print(name, mode, layout, f"{ok}/{len(outs)} valid, {tokens} tokens in {seconds:.1f} s", flush=True)
    return results


def throughput(llm: LLM, rounds: int) -> dict[str, Any]:
    """Greedy decode tokens/s with the nested-objects schema and without, at batch 1 and 32."""
    instruction, schema = SCHEMAS["nested_objects"]
    prompts = chat_prompts(llm, instruction, 32)
    best: dict[str, dict[str, float]] = {}
    # warm-up: first-use kernel builds, the grammar's tokenizer and compile, allocator growth
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8, structured_outputs={"json": schema}))
    llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=8))
    for _ in range(rounds):
        for batch in (1, 32):
            for label, spec in (("no_schema", None), ("schema", {"json": schema})):
                # without a schema the output may run longer: cap both at the same max_tokens and count tokens
                params = SamplingParams(temperature=0.0, max_tokens=48, structured_outputs=spec)
                chosen = prompts[:batch]
                t0 = time.perf_counter()
                outs = llm.generate(chosen, params)
                seconds = time.perf_counter() - t0
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                key = f"batch{batch}/{label}"
                rate = tokens / seconds
                if key not in best or rate > best[key]["tokens_per_s"]:
                    best[key] = {"tokens_per_s": round(rate, 1), "tokens": tokens, "seconds": round(seconds, 2)}
                print(key, f"{rate:.1f} tok/s", flush=True)
    for batch in (1, 32):
        a, b = best[f"batch{batch}/no_schema"]["tokens_per_s"], best[f"batch{batch}/schema"]["tokens_per_s"]
        best[f"batch{batch}/overhead_percent"] = {"value": round(100 * (a - b) / a, 1)}
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)  # 1: the 2 shared cores are oversubscribed
    ap.add_argument("--part", choices=["all", "validity", "throughput"], default="all",
                    help="run one part; its results replace that part in the existing result file")
    args = ap.parse_args()
    llm = LLM("smollm2-135m", threads=args.threads)
    result: dict[str, Any] = json.loads(OUT.read_text()) if args.part != "all" and OUT.exists() else {}
    result.update({"benchmark": "structured_output", "model": "smollm2-135m (default dtype)", "grammar_engine": "llguidance"})
    machine = {"cpu": cpu_name(), "cores": os.cpu_count(), "threads": args.threads, "torch": torch.__version__,
               "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "load_average_at_start": os.getloadavg()}
    if args.part in ("all", "throughput"):
        result["throughput"] = throughput(llm, args.rounds)
        result["throughput_machine"] = {**machine, "load_average_at_end": os.getloadavg()}
    if args.part in ("all", "validity"):
        v = validity(llm, args.prompts)
        result["validity"] = v
        result["validity_summary"] = {"prompts": args.prompts, "valid": sum(r["valid"] for r in v.values()),
                                      "total": sum(r["total"] for r in v.values())}
        result["validity_machine"] = {**machine, "load_average_at_end": os.getloadavg()}
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("throughput", "validity_summary") if k in result}, indent=1))


if __name__ == "__main__":
    main()
