"""Weights beyond a memory budget: memory-mapped decoder layers streamed per step (`--max-weight-memory`)."""
