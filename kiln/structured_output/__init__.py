"""Structured output: constrain a request's tokens to a JSON schema, a regex, a list of choices or a
grammar, through the llguidance grammar engine (chosen by benchmarks/grammar_engine_choice.py).

`params` (what a request asks for, pure Python) is imported by SamplingParams; `backend` (compiling
and caching grammars for one tokenizer) and `manager` (per-sequence matchers and the batch's token
bitmask, filled on a helper thread while the model runs) are used by the engine and the runner.
"""
