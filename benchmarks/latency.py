"""Single-stream latency: decode tok/s (128 tokens after a chat prompt) and prefill tok/s (a
1024-token prompt) of kiln, transformers and llama-cpp-python, in one run, 2 threads each.
Writes benchmarks/results/latency.json (the README's latency table).
"""

import sys
from pathlib import Path

from kiln.entrypoints.cli import main

OUT = Path(__file__).parent / "results" / "latency.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "latency", "--output-len", "128", "--prefill-len", "1024", "--bench-threads", "2",
                   "--out", str(OUT), *sys.argv[1:]]))
