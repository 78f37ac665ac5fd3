"""Serving: `kiln serve` vs llama-cpp-python's server, same load generator, same run.

Open-loop Poisson arrivals of streaming chat requests (GSM8K questions, 128 tokens max,
temperature 0) for 45 s (at least 12 requests) at each of rising request rates; a rate is sustained while p95 TTFT <= 1 s. Writes
benchmarks/results/serving.json (the README's serving table) with the ratio of sustained rates.
"""

import sys
from pathlib import Path

from kiln.entrypoints.cli import main

OUT = Path(__file__).parent / "results" / "serving.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "serving", "--num-prompts", "12", "--duration", "45", "--output-len", "128",
                   "--slo-ttft", "1.0", "--request-rates", "0.1,0.25,0.5,1,1.5,2,2.5,3,4", "--bench-threads", "2",
                   "--out", str(OUT), *sys.argv[1:]]))
