"""Offline batch throughput: kiln vs transformers (static batches) vs llama-cpp-python, in one run.

64 GSM8K questions as chat prompts, 128 new tokens each, 2 threads per system, each system in
its own process. Writes benchmarks/results/throughput.json (the README's throughput table).
Needs `pip install -e '.[bench,peers]'` for the peers; a missing peer is listed, not faked.
"""

import sys
from pathlib import Path

from kiln.entrypoints.cli import main

OUT = Path(__file__).parent / "results" / "throughput.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "throughput", "--num-prompts", "64", "--output-len", "128", "--bench-threads", "2",
                   "--out", str(OUT), *sys.argv[1:]]))
