"""Single-stream decode and prefill: kiln against llama.cpp's own C++ tools, in one run.

Peers (built by benchmarks/build_llama_cpp.py, or given with --llama-bench / --llama-server):
- `llama-bench`: tg128, pp512 and pp1024, each with flash attention off and on; the better of the two
  is the peer for each test (one repetition per round: the rounds are the repetitions).
- `llama-server -np 1`: one streamed greedy chat completion of 128 tokens (EOS ignored) through the
  same HTTP client as `kiln serve`; decode tok/s between the first and the last streamed token.
kiln, same GGUF file and threads:
- `LLM` offline in a fresh process: decode of 128 tokens after the chat prompt, and a 1,024-token prefill;
- `kiln serve`: the same streamed request as llama-server.

Every system runs in a fresh process in each of ROUNDS rounds, in alternating order. Headline
ratios are per round (kiln serve / llama-server, kiln offline decode / llama-bench tg128, kiln
prefill / llama-bench pp1024); the verdict against a target is "met" when every round's ratio
reaches it, "not met" when none does, and "not established" when the spread crosses it. The machine
is recorded (CPU, the flags that matter, cores, threads, read bandwidth at the start and the end),
and kiln's decode is given as a fraction of the bandwidth limit (the GGUF's bytes per token at the
measured read bandwidth). On a CPU shared with other work, run it as
`nice -n -20 python benchmarks/single_stream_peers.py` with the other work niced and autogroup
scheduling off (`echo 0 > /proc/sys/kernel/sched_autogroup_enabled`: with it on, nice values count
only within a login session); not under SCHED_FIFO, whose spinning engine threads starve the servers'
HTTP threads (kiln serve then merges every token into one chunk). Writes benchmarks/results/single_stream_peers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from build_llama_cpp import build_dir, build_flags, build_info, cpu_flags, existing  # noqa: E402
from serve_single_stream import PROMPT, kiln_serve_cmd, llama_server, server_decode  # noqa: E402

OUT = Path(__file__).parent / "results" / "single_stream_peers.json"
THREADS, ROUNDS, DECODE_TOKENS, PREFILL_TOKENS = 2, 5, 128, 1024
TARGETS = {"serve_vs_llama_server": 1.5, "decode_vs_llama_bench_tg128": 1.5, "prefill_vs_llama_bench_pp1024": 3.0}


def machine(bandwidth_gb_s: float) -> dict[str, Any]:
    from kiln.kernels.tune import cpu_identity, load_tuning
    from kiln.planner.calibration import cpu_name

    tuning = load_tuning(THREADS)  # kiln's kernel choice: measured here by `kiln tune`, or its built-in one
    return {"cpu": cpu_name(), "arch": platform.machine(), "cores": os.cpu_count(), "threads": THREADS,
            "flags": list(cpu_identity()[1]), "read_bandwidth_gb_s_start": bandwidth_gb_s,
            "scheduling": scheduling(), "kiln_kernel_choice": f"kiln tune {tuning['date']}" if tuning else "built-in",
            "load_average_start": os.getloadavg()[0]}


def scheduling() -> str:
    """How this run shared the CPU: its policy and nice value, and whether autogroup scheduling (which
    makes nice values count only within a session) was on."""
    if os.sched_getscheduler(0) == os.SCHED_FIFO:
        return "SCHED_FIFO"
    try:
        autogroup = Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1"
    except OSError:
        autogroup = False
    return f"nice {os.nice(0)}, autogroup {'on' if autogroup else 'off'}"


def prompts(gguf: Path) -> tuple[list[int], list[int]]:
    from kiln.data import WIKITEXT2_TEST, data_path
    from kiln.loader.tokenizer import Tokenizer

    tok = Tokenizer.from_gguf(gguf)
    chat = tok.encode(tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True),
                      add_special_tokens=False)
    return chat, tok.encode(data_path(WIKITEXT2_TEST).read_text()[:20000])[:PREFILL_TOKENS]


def llama_bench(binary: Path, gguf: Path) -> dict[str, float]:
    """tg128, pp512, pp1024 tok/s: for each, the better of flash attention off and on (one repetition)."""
    out = subprocess.run([str(binary), "-m", str(gguf), "-t", str(THREADS), "-p", f"512,{PREFILL_TOKENS}",
                          "-n", str(DECODE_TOKENS), "-fa", "0,1", "-r", "1", "-o", "json"],
                         check=True, capture_output=True, text=True, timeout=900).stdout
    best: dict[str, float] = {}
    runs: dict[str, float] = {}
    for row in json.loads(out):
        test = f"tg{row['n_gen']}" if row["n_gen"] else f"pp{row['n_prompt']}"
        runs[f"{test} fa={int(bool(row.get('flash_attn')))}"] = row["avg_ts"]
        best[test] = max(best.get(test, 0.0), row["avg_ts"])
    return {**best, "runs": runs}  # type: ignore[dict-item]


def kiln_offline(gguf: Path, chat: list[int], long: list[int]) -> dict[str, Any]:
    from kiln.bench.kiln_runs import kiln_latency
    from kiln.bench.runner import run_isolated

    res = run_isolated(kiln_latency, str(gguf), "auto", chat, long, DECODE_TOKENS, {"threads": THREADS},
                       threads=THREADS)
    if "error" in res:
        raise RuntimeError(f"kiln offline: {res['error']}")
    return {"decode_tok_s": res["decode_tok_s"], "prefill_tok_s": res["prefill_tok_s"], "system": res["system"]}


def verdict(ratios: list[float], target: float) -> str:
    if min(ratios) >= target:
        return "met"
    return "not met" if max(ratios) < target else "not established"


def summarize(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    pairs = {"serve_vs_llama_server": lambda r: r["kiln serve"] / r["llama-server -np 1"],
             "decode_vs_llama_bench_tg128": lambda r: r["kiln offline decode"] / r["llama-bench tg128"],
             "prefill_vs_llama_bench_pp1024": lambda r: r["kiln offline prefill"] / r["llama-bench pp1024"]}
    out: dict[str, Any] = {}
    for name, ratio in pairs.items():
        rs = [ratio(r) for r in rounds]
        out[name] = {"per_round": rs, "median": statistics.median(rs), "min": min(rs), "max": max(rs),
                     "target": TARGETS[name], "verdict": verdict(rs, TARGETS[name])}
    return out


def main() -> None:
    import torch

    from kiln.hub import resolve_model
    from kiln.planner.calibration import read_bandwidth_gb_s

    torch.set_num_threads(THREADS)  # the bandwidth probe's threads, as every system's
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--llama-bench", type=Path, help="default: benchmarks/build_llama_cpp.py's build")
    parser.add_argument("--llama-server", type=Path, help="default: benchmarks/build_llama_cpp.py's build")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=OUT,
                        help="result file (default %(default)s; a second machine kind gets its own file, e.g. single_stream_peers_avx2.json)")
    args = parser.parse_args()
    built = existing(build_dir(build_flags(cpu_flags())[0])) or {}
    bench_bin, server_bin = args.llama_bench or built.get("llama-bench"), args.llama_server or built.get("llama-server")
    if bench_bin is None or server_bin is None:
        sys.exit("no llama.cpp build: run benchmarks/build_llama_cpp.py or pass --llama-bench and --llama-server")
    gguf = resolve_model(args.model)
    chat, long = prompts(gguf)
    t0 = time.time()
    bw_start = read_bandwidth_gb_s()
    result: dict[str, Any] = {"benchmark": "single_stream_peers", "model": args.model, "file": gguf.name,
                              "file_bytes": gguf.stat().st_size, "date": time.strftime("%Y-%m-%d %H:%M"),
                              "machine": machine(bw_start), "decode_tokens": DECODE_TOKENS,
                              "prefill_tokens": PREFILL_TOKENS,
                              "peers": {"llama-bench": build_info(bench_bin), "llama-server": build_info(server_bin)}}
    systems = {
        "kiln offline": lambda: kiln_offline(gguf, chat, long),
        "kiln serve": lambda: server_decode(*kiln_serve_cmd(args.model, None)),
        "llama-server -np 1": lambda: server_decode(*llama_server(server_bin, gguf)),
        "llama-bench": lambda: llama_bench(bench_bin, gguf),
    }
    rounds: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for i in range(args.rounds):
        order = list(systems) if i % 2 == 0 else list(reversed(systems))
        got: dict[str, Any] = {}
        for name in order:
            got[name] = systems[name]()
            print(f"round {i + 1} {name}: {json.dumps(got[name])[:200]}", file=sys.stderr)
        raw.append(got)
        rounds.append({"kiln offline decode": got["kiln offline"]["decode_tok_s"],
                       "kiln offline prefill": got["kiln offline"]["prefill_tok_s"],
                       "kiln serve": statistics.median(got["kiln serve"]["decode_runs"]),
                       "llama-server -np 1": statistics.median(got["llama-server -np 1"]["decode_runs"]),
                       "llama-bench tg128": got["llama-bench"][f"tg{DECODE_TOKENS}"],
                       "llama-bench pp512": got["llama-bench"]["pp512"],
                       "llama-bench pp1024": got["llama-bench"][f"pp{PREFILL_TOKENS}"]})
    bw_end = read_bandwidth_gb_s()
    result["machine"].update(read_bandwidth_gb_s_end=bw_end, load_average_end=os.getloadavg()[0])
    result["kiln_system"] = raw[0]["kiln offline"]["system"]
    result["rounds"] = rounds
    result["raw"] = raw
    result["medians"] = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    result["ratios"] = summarize(rounds)
    limit = min(bw_start, bw_end) * 1e9 / gguf.stat().st_size  # tok/s if every weight byte streamed at the read rate
    result["bandwidth_limit_tok_s"] = limit
    result["kiln_decode_fraction_of_limit"] = result["medians"]["kiln offline decode"] / limit
    result["wall_s"] = time.time() - t0
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
