"""`kiln plan` and `kiln advise`: what a model costs in memory and speed before it runs, and what to change.

memory.py (the budget: weights by tensor type, KV cache, activations, draft, per rank), arch.py (an
architecture from a config.json, a GGUF header or a preset), presets.py (well-known configurations),
quality.py (kiln's own measured quality tables), calibration.py + predict.py (tok/s from a measured
calibration of this machine), profile.py + rules.py + advisor.py (`kiln advise`: measure, decide, verify).

Nothing here is imported by the engine: the planner sits beside the entrypoints and only calls down.
"""
