"""Structured outputs through the engine on a tiny random Llama (fast): a random model almost never
writes valid JSON by itself, so every valid output here is the grammar's doing.

References: `jsonschema` (an independent JSON Schema validator) for JSON outputs, Python's `re`
for regex outputs, and llguidance's own matcher for the masks; speculative decoding is checked
against the same engine without speculation (greedy outputs must be identical, drafts or not).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest

from kiln.config import CacheConfig, SpeculativeConfig
from kiln.engine.llm_engine import LLMEngine
from kiln.loader.model_loader import load_model
from kiln.sampling_params import SamplingParams
from kiln.structured_output.params import StructuredOutputsParams

from loader.tiny_model import build_tiny_models, one_torch_thread

SCHEMAS: dict[str, dict] = {
    "nested": {"type": "object", "properties": {
        "user": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 999}, "name": {"type": "string", "maxLength": 6}},
                 "required": ["id", "name"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False},
    "array": {"type": "object", "properties": {"xs": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                                      "minItems": 1, "maxItems": 4}},
              "required": ["xs"], "additionalProperties": False},
    "enum": {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
             "required": ["color", "ok"], "additionalProperties": False},
    "required": {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5}, "b": {"type": "integer", "minimum": -50, "maximum": 50},
                                                  "c": {"type": "null"}},
                 "required": ["a", "c"], "additionalProperties": False},
    "bounds": {"type": "object", "properties": {"t": {"type": "integer", "minimum": -5, "maximum": 5},
                                                "n": {"type": "integer", "exclusiveMinimum": 10, "maximum": 20}},
               "required": ["t", "n"], "additionalProperties": False},
}


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models").hf["tied"]


@pytest.fixture(scope="module")
def engine(tiny_path: Path) -> LLMEngine:
    return LLMEngine(load_model(tiny_path, dtype="float32"), CacheConfig(kv_cache_memory=8 << 20))


def run(engine: LLMEngine, prompts: list[str], params: list[SamplingParams]) -> list:
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    with one_torch_thread():
        done = engine.run_until_done()
    return [done[i] for i in ids]


def json_params(schema: dict, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=120, structured_outputs=StructuredOutputsParams(json=schema), **kw)


@pytest.mark.parametrize("mode", ["greedy", "sampled"])
def test_every_schema_validates_single_and_batched(engine: LLMEngine, mode: str) -> None:
    sampling = {"temperature": 0.0} if mode == "greedy" else {"temperature": 1.0, "top_p": 0.95}
    prompts = ["the cat", "hello world", "on the mat"]
    for name, schema in SCHEMAS.items():
        single = [run(engine, [p], [json_params(schema, seed=i, **sampling)])[0] for i, p in enumerate(prompts)]
        batched = run(engine, prompts, [json_params(schema, seed=i, **sampling) for i in range(len(prompts))])
        for out in single + batched:
            o = out.outputs[0]
            assert o.finish_reason == "stop", (name, o.text)
            jsonschema.validate(json.loads(o.text), schema)
        if mode == "greedy":  # a batch gives each request what it gets alone
            assert [o.outputs[0].token_ids for o in batched] == [o.outputs[0].token_ids for o in single]


def test_n_sequences_penalties_and_top_k_min_p(engine: LLMEngine) -> None:
    schema = SCHEMAS["array"]
    params = json_params(schema, n=4, temperature=1.3, top_k=20, min_p=0.01, presence_penalty=1.0,
                         frequency_penalty=0.5, repetition_penalty=1.2, seed=3)
    (out,) = run(engine, ["the cat"], [params])
    assert len(out.outputs) == 4
    for o in out.outputs:
        jsonschema.validate(json.loads(o.text), schema)


def test_regex_choice_and_grammars(engine: LLMEngine) -> None:
    specs = [
        (StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        (StructuredOutputsParams(choice=["yes", "no", "maybe (so)"]), lambda t: t in ("yes", "no", "maybe (so)")),
        # GBNF (llama.cpp's EBNF) and Lark: balanced parentheses around an x, and a list of a/b words
        (StructuredOutputsParams(grammar='root ::= "(" root ")" | "x"'),
         lambda t: re.fullmatch(r"(\(*)x(\)*)", t) and t.count("(") == t.count(")")),
        (StructuredOutputsParams(grammar='start: WORD ("," WORD)*\nWORD: "a" | "bb"'),
         lambda t: re.fullmatch(r"(a|bb)(,(a|bb))*", t)),
        (StructuredOutputsParams(json_object=True), lambda t: isinstance(json.loads(t), dict)),
    ]
    for spec, ok in specs:
        outs = run(engine, ["hello", "the cat"], [SamplingParams(temperature=1.0, seed=s, max_tokens=60, structured_outputs=spec)
                                                  for s in range(2)])
        for out in outs:
            o = out.outputs[0]
            if o.finish_reason == "length":  # an unbounded grammar may run to max_tokens; its prefix stays valid
                continue
            assert o.finish_reason == "stop" and ok(o.text), (spec, o.text)


def test_bad_specs_are_refused_with_the_reason_before_any_token(engine: LLMEngine) -> None:
    cases = [
        ({"json": {"type": "strin"}}, "strin"),
        ({"json": {"not": {"type": "string"}}}, "not"),  # unsupported keyword
        ({"json": {"type": "integer", "minimum": 5, "maximum": 2}}, "nsatisfiable"),  # matches nothing
        ({"json": {"enum": []}}, "nsatisfiable"),
        ({"regex": "[a-"}, "regex"),
        ({"grammar": "root ::= undefined_rule"}, "undefined_rule"),
    ]
    for spec, reason in cases:
        with pytest.raises(ValueError, match=reason):
            engine.add_request("hi", SamplingParams(structured_outputs=spec))
    assert not engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="ignore_eos"):
        SamplingParams(ignore_eos=True, structured_outputs={"regex": "a"})


def test_compiled_grammars_are_cached_by_spec_hash(engine: LLMEngine) -> None:
    schema = {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"], "additionalProperties": False}
    before = engine.grammar.compiles
    # the same schema written with its keys in another order is the same spec
    shuffled = json.loads(json.dumps(schema, sort_keys=True))
    run(engine, ["a", "b", "c"], [json_params(schema), json_params(shuffled), json_params(schema, temperature=0.7)])
    assert engine.grammar.compiles == before + 1


def test_stop_strings_and_min_tokens_with_a_grammar(engine: LLMEngine) -> None:
    spec = StructuredOutputsParams(regex=r"abc(d|e)fg")
    (out,) = run(engine, ["hi"], [SamplingParams(temperature=0, max_tokens=20, structured_outputs=spec, stop=["d", "e"])])
    assert out.outputs[0].text == "abc" and out.outputs[0].finish_reason == "stop"
    # min_tokens would ban end-of-sequence, but the finished grammar allows nothing else: the grammar wins
    (out,) = run(engine, ["hi"], [SamplingParams(temperature=0, max_tokens=20, min_tokens=15,
                                                  structured_outputs={"choice": ["ok"]})])
    assert out.outputs[0].text == "ok" and out.outputs[0].finish_reason == "stop"


class ReplayProposer:
    """Drafts the next 3 tokens of a known output, then one wrong token: drafts get accepted and rejected."""

    def __init__(self, expected: list[int], prompt_len: int) -> None:
        self.expected, self.prompt_len = expected, prompt_len
        self.asked = 0

    def propose(self, requests):
        out = {}
        for rid, (tokens, k) in requests.items():
            done = len(tokens) - self.prompt_len
            drafts = self.expected[done:done + 3] + [5]
            out[rid] = drafts[:k]
            self.asked += 1
        return out

    def free(self, request_id: str) -> None:
        pass


def test_speculative_decoding_with_a_grammar_is_lossless(tiny_path: Path, engine: LLMEngine) -> None:
    schema = SCHEMAS["nested"]
    prompt = "the cat sat"
    plain = run(engine, [prompt], [json_params(schema, temperature=0)])[0].outputs[0]
    prompt_ids = engine.tokenizer.encode(prompt)
    spec_engine = LLMEngine(load_model(tiny_path, dtype="float32"), CacheConfig(kv_cache_memory=8 << 20),
                            speculative_config=SpeculativeConfig("ngram", 4, adaptive=False, max_batch_size=8))
    proposer = ReplayProposer(list(plain.token_ids), len(prompt_ids))
    spec_engine.spec.proposer = proposer  # type: ignore[union-attr]
    out = run(spec_engine, [prompt], [json_params(schema, temperature=0)])[0].outputs[0]
    stats = spec_engine.spec.snapshot()  # type: ignore[union-attr]
    assert proposer.asked > 0 and 0 < stats.accepted_total < stats.proposed_total
    assert out.token_ids == plain.token_ids
    jsonschema.validate(json.loads(out.text), schema)
    # sampled: every output still follows the grammar (rejected drafts roll the matcher back)
    outs = run(spec_engine, [prompt] * 3, [json_params(schema, temperature=1.0, seed=s) for s in range(3)])
    for o in outs:
        jsonschema.validate(json.loads(o.outputs[0].text), schema)


def test_logit_bias_bans_and_forces_tokens(engine: LLMEngine) -> None:
    (free,) = run(engine, ["the cat"], [SamplingParams(temperature=0, max_tokens=1)])
    top = free.outputs[0].token_ids[0]
    (banned,) = run(engine, ["the cat"], [SamplingParams(temperature=0, max_tokens=1, logit_bias={top: -100})])
    assert banned.outputs[0].token_ids[0] != top
    outs = run(engine, ["the cat"] * 4, [SamplingParams(temperature=1.0, seed=s, max_tokens=3, ignore_eos=True,
                                                         logit_bias={77: 100}) for s in range(4)])
    assert all(o.outputs[0].token_ids == [77, 77, 77] for o in outs)
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("x", SamplingParams(logit_bias={10**6: 1.0}))
    with pytest.raises(ValueError, match=r"\[-100, 100\]"):
        SamplingParams(logit_bias={1: -101})
