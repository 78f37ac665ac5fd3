"""Which grammar engine kiln uses for structured output: xgrammar vs llguidance, measured side by side.

On the default model's tokenizer (SmolLM2-135M, 49,152 tokens), for each engine:
* tokenizer setup: building the engine's vocabulary object from kiln's Tokenizer;
* compile: a 20-field JSON schema compiled cold (no cache) plus the first token mask;
* mask time per token, batch 1: one matcher walks a schema-valid JSON document token by token
  (the document is the kiln tokenization of a real instance), filling the next-token bitmask
  before each token;
* mask time per step, batch 32: 32 matchers (32 different documents) each filled once per step,
  one after another on one thread (what kiln does: the mask work runs on one helper thread
  beside the forward) and with the library's own parallel batch API (2 threads);
* GIL: a pure-Python counter on the main thread while a helper thread loops over mask fills. A
  fill that holds the GIL lets the helper keep it for whole switch intervals (5 ms of back-to-back
  fills), so the counter slows to ~0.5x; a fill that releases it hands it back to the waiting main
  thread, so the counter stays near 1x (llguidance documents that its mask fill drops the GIL);
* install size: the package's files plus those of every dependency it pulls that kiln's runtime
  dependencies do not already have (from the installed distributions' RECORD files).

Both engines fill the same int32 bitmask layout. Writes benchmarks/results/grammar_engine_choice.json.
Usage: python benchmarks/grammar_engine_choice.py
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import statistics
import threading
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from packaging.requirements import Requirement

from kiln.detokenizer import token_bytes
from kiln.hub import resolve_model
from kiln.loader.tokenizer import Tokenizer
from kiln.planner.calibration import cpu_name

OUT = Path(__file__).parent / "results" / "grammar_engine_choice.json"
BATCH = 32


# ---------------------------------------------------------------- workload
def twenty_field_schema() -> dict[str, Any]:
    props: dict[str, Any] = {}
    kinds = [
        {"type": "string"}, {"type": "integer", "minimum": 0, "maximum": 1000}, {"type": "number"},
        {"type": "boolean"}, {"type": "string", "enum": ["red", "green", "blue"]},
        {"type": "array", "items": {"type": "string"}, "maxItems": 4},
        {"type": "object", "properties": {"x": {"type": "integer"}, "y": {"type": "string"}}, "required": ["x", "y"],
         "additionalProperties": False},
    ]
    for i in range(20):
        props[f"field_{i:02d}"] = kinds[i % len(kinds)]
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def instance(schema: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sub in schema["properties"].items():
        t = sub["type"]
        if "enum" in sub:
            out[name] = rng.choice(sub["enum"])
        elif t == "string":
            out[name] = " ".join(rng.choice(["alpha", "beta", "kiln", "token", "mask", "Paris"]) for _ in range(rng.randint(1, 4)))
        elif t == "integer":
            out[name] = rng.randint(0, 1000)
        elif t == "number":
            out[name] = round(rng.uniform(-100, 100), 3)
        elif t == "boolean":
            out[name] = rng.random() < 0.5
        elif t == "array":
            out[name] = [rng.choice(["a", "bb", "ccc"]) for _ in range(rng.randint(0, 4))]
        else:
            out[name] = {"x": rng.randint(-50, 50), "y": rng.choice(["north", "south"])}
    return out


# ---------------------------------------------------------------- engines
class Engine:
    """The few calls the benchmark needs, over one library."""

    name: str
    setup_s: float

    def compile(self, schema: dict[str, Any]) -> Any: ...
    def matcher(self, compiled: Any) -> Any: ...
    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None: ...
    def accept(self, matcher: Any, token: int) -> bool: ...
    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None: ...


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tok: Tokenizer) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        t0 = time.perf_counter()
        special = set(tok.all_special_ids) - set(tok.eos_token_ids)
        # xgrammar treats an empty entry as a special token (never matched by grammar text)
        vocab = [b"" if i in special else token_bytes(tok, i) for i in range(tok.vocab_size)]
        self.info = xgr.TokenizerInfo(vocab, xgr.VocabType.RAW, vocab_size=tok.vocab_size,
                                      stop_token_ids=sorted(tok.eos_token_ids))
        self.setup_s = time.perf_counter() - t0
        self.batch = xgr.BatchGrammarMatcher(2)

    def compile(self, schema: dict[str, Any]) -> Any:
        compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.accept_token(token)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tok: Tokenizer) -> None:
        import llguidance
        import llguidance.torch as lltorch

        self.llg, self.lltorch = llguidance, lltorch
        t0 = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=tok.vocab_size,
                                          eos_token=sorted(tok.eos_token_ids))
        self.setup_s = time.perf_counter() - t0
        self.executor = llguidance.LLExecutor(num_threads=2)

    def compile(self, schema: dict[str, Any]) -> Any:
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "})
        m = self.llg.LLMatcher(self.tok, grammar)  # llguidance compiles while building the matcher
        assert not m.is_error(), m.get_error()
        return grammar

    def matcher(self, compiled: Any) -> Any:
        m = self.llg.LLMatcher(self.tok, compiled)
        assert not m.is_error(), m.get_error()
        return m

    def fill(self, matcher: Any, bitmask: torch.Tensor, row: int) -> None:
        self.lltorch.fill_next_token_bitmask(matcher, bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return matcher.consume_token(token)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.lltorch.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)


# ---------------------------------------------------------------- measurements
def bitmask(rows: int, vocab: int) -> torch.Tensor:
    return torch.full((rows, (vocab + 31) // 32), -1, dtype=torch.int32)


def allowed(mask_row: torch.Tensor, token: int) -> bool:
    return bool((int(mask_row[token // 32]) >> (token % 32)) & 1)


def compile_time(engine: Engine, schema: dict[str, Any], vocab: int, repeats: int = 3) -> dict[str, float]:
    comp, first = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        compiled = engine.compile(schema)
        t1 = time.perf_counter()
        m = engine.matcher(compiled)
        engine.fill(m, bitmask(1, vocab), 0)
        t2 = time.perf_counter()
        comp.append(t1 - t0)
        first.append(t2 - t1)
    return {"compile_ms_median": 1e3 * statistics.median(comp), "matcher_and_first_mask_ms_median": 1e3 * statistics.median(first),
            "compile_plus_first_mask_ms_median": 1e3 * statistics.median(c + f for c, f in zip(comp, first))}


def walk_batch1(engine: Engine, compiled: Any, docs: list[list[int]], vocab: int) -> dict[str, float]:
    times: list[float] = []
    mask = bitmask(1, vocab)
    for doc in docs:
        m = engine.matcher(compiled)
        for token in doc:
            t0 = time.perf_counter()
            engine.fill(m, mask, 0)
            times.append(time.perf_counter() - t0)
            assert allowed(mask[0], token), f"{engine.name}: the grammar refused a token of a valid document"
            assert engine.accept(m, token)
    return {"tokens": len(times), "mask_us_per_token_median": 1e6 * statistics.median(times),
            "mask_us_per_token_mean": 1e6 * statistics.mean(times),
            "mask_us_per_token_p95": 1e6 * sorted(times)[int(0.95 * len(times))]}


def walk_batch32(engine: Engine, compiled: Any, docs: list[list[int]], vocab: int, parallel: bool) -> dict[str, float]:
    matchers = [engine.matcher(compiled) for _ in docs]
    mask = bitmask(len(docs), vocab)
    steps = min(len(d) for d in docs)
    times = []
    for s in range(steps):
        t0 = time.perf_counter()
        if parallel:
            engine.fill_batch(matchers, mask)
        else:
            for i, m in enumerate(matchers):
                engine.fill(m, mask, i)
        times.append(time.perf_counter() - t0)
        for i, (m, d) in enumerate(zip(matchers, docs)):
            assert allowed(mask[i], d[s])
            assert engine.accept(m, d[s])
    med = statistics.median(times)
    return {"steps": steps, "batch_ms_per_step_median": 1e3 * med, "us_per_row_token_median": 1e6 * med / len(docs),
            "batch_ms_per_step_mean": 1e3 * statistics.mean(times)}


def gil_ratio(engine: Engine, compiled: Any, doc: list[int], vocab: int, seconds: float = 1.0) -> dict[str, float]:
    """Pure-Python work done per second on the main thread while a helper fills masks, over alone."""
    def count(until: float) -> int:
        n = 0
        while time.perf_counter() < until:
            n += 1
        return n

    alone = count(time.perf_counter() + seconds) / seconds
    stop = threading.Event()
    fills = [0]

    def helper() -> None:
        mask = bitmask(1, vocab)
        while not stop.is_set():
            m = engine.matcher(compiled)
            for token in doc:
                engine.fill(m, mask, 0)
                engine.accept(m, token)
                fills[0] += 1
                if stop.is_set():
                    return

    th = threading.Thread(target=helper)
    th.start()
    busy = count(time.perf_counter() + seconds) / seconds
    stop.set()
    th.join()
    return {"python_rate_ratio_with_fills": busy / alone, "helper_fills_per_s": fills[0] / seconds,
            "releases_gil": busy / alone > 0.8}


# ---------------------------------------------------------------- install size
def _dist_size(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        p = Path(dist.locate_file(f))
        if p.is_file():
            total += p.stat().st_size
    return total


def _closure(names: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def install_size(package: str) -> dict[str, Any]:
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())
    kiln_runtime = {Requirement(r).name for r in pyproject["project"]["dependencies"]} - {"xgrammar", "llguidance"}
    base = _closure(sorted(kiln_runtime))
    extra = sorted(_closure([package]) - base)
    sizes = {n: _dist_size(n) for n in extra}
    return {"package_mb": _dist_size(package) / 1e6, "extra_dependencies": {n: round(s / 1e6, 1) for n, s in sizes.items()},
            "total_added_mb": sum(sizes.values()) / 1e6}


# ---------------------------------------------------------------- decision
# The mask is computed on a helper thread while the model's forward runs, so mask time only costs
# anything once it is longer than the forward. kiln's batch-32 decode step on these 2-core machines
# takes ~100 ms (GUIDE: 306 tok/s at 32 clients); an engine whose batch-32 mask work per step on one
# thread stays under 2 % of that (2 ms) is hidden entirely. Among engines that are, the one with the
# shorter cold compile + first mask wins (a new schema's compile is on the request's time to first
# token); a tie within 20 % goes to the smaller install (the engine is a runtime dependency).
HIDDEN_MASK_MS = 2.0


def decide(engines: dict[str, dict[str, Any]]) -> dict[str, Any]:
    hidden = {n: e["batch32_one_thread"]["batch_ms_per_step_median"] < HIDDEN_MASK_MS for n, e in engines.items()}
    pool = [n for n in engines if hidden[n]] or list(engines)
    compile_ms = {n: engines[n]["compile_20_fields"]["compile_plus_first_mask_ms_median"] for n in pool}
    best = min(compile_ms.values())
    close = [n for n in pool if compile_ms[n] <= 1.2 * best]
    winner = min(close, key=lambda n: engines[n]["install"]["total_added_mb"])
    return {"rule": f"batch-32 mask per step on one thread < {HIDDEN_MASK_MS} ms (hidden behind the forward), then the "
                    "shortest compile + first mask, ties within 20 % by install size",
            "mask_hidden": hidden, "compile_plus_first_mask_ms": compile_ms, "winner": winner}


# ---------------------------------------------------------------- main
def machine() -> dict[str, Any]:
    flags = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1]
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return {"cpu": cpu_name(), "flags": [f for f in wanted if f in flags.split()], "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "load_average_at_start": os.getloadavg()}


def main() -> None:
    tok = Tokenizer.from_gguf(resolve_model("smollm2-135m"))
    vocab = tok.vocab_size
    schema = twenty_field_schema()
    rng = random.Random(0)
    texts = [json.dumps(instance(schema, rng)) for _ in range(BATCH)]
    docs = [tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    result: dict[str, Any] = {"benchmark": "grammar_engine_choice", "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                              "machine": machine(), "vocab_size": vocab, "schema_fields": 20,
                              "document_tokens_median": statistics.median(len(d) for d in docs), "engines": {}}
    makers: list[Callable[[Tokenizer], Engine]] = [XGrammar, LLGuidance]
    for make in makers:
        engine = make(tok)
        compiled = engine.compile(schema)
        r: dict[str, Any] = {"version": metadata.version(engine.name), "tokenizer_setup_ms": 1e3 * engine.setup_s}
        r["compile_20_fields"] = compile_time(engine, schema, vocab)
        r["batch1"] = walk_batch1(engine, compiled, docs[:4], vocab)
        r["batch32_one_thread"] = walk_batch32(engine, compiled, docs, vocab, parallel=False)
        r["batch32_library_parallel_2_threads"] = walk_batch32(engine, compiled, docs, vocab, parallel=True)
        r["gil"] = gil_ratio(engine, compiled, docs[0], vocab)
        r["install"] = install_size(engine.name)
        result["engines"][engine.name] = r
        print(engine.name, json.dumps(r, indent=1))
    result["decision"] = decide(result["engines"])
    result["load_average_at_end"] = os.getloadavg()
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["decision"], indent=1), "->", OUT)


if __name__ == "__main__":
    main()
