"""`kiln advise MODEL --workload chat|code|rag|FILE.jsonl ...`: measured profile → answers → verified advice."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    from kiln.engine.arg_utils import EngineArgs

    p = sub.add_parser("advise", help="profile a workload, answer prefill/decode-bound, KV limit, kernels and batching, "
                                      "and recommend changes verified by re-measuring them")
    p.add_argument("model_pos", nargs="?", default=None, metavar="MODEL", help="as --model")
    p.add_argument("--workload", default="chat", help="chat, code, rag, or a .jsonl of {prompt|messages, max_tokens}")
    p.add_argument("--concurrency", type=int, default=1, help="requests in flight during the profile")
    p.add_argument("--num-requests", type=int, default=None, help="requests per profile (default: 3 at concurrency 1, "
                                                                  "1.5 x concurrency above)")
    p.add_argument("--max-tokens", type=int, default=48, help="new tokens per request")
    p.add_argument("--top", type=int, default=3, help="recommendations to verify by re-measuring")
    p.add_argument("--slo-ttft-ms", type=float, default=None, help="p95 time-to-first-token objective")
    p.add_argument("--slo-tpot-ms", type=float, default=None, help="p95 time-per-output-token objective")
    p.add_argument("--tokens-per-second-per-user", type=float, default=None, help="at the p95 inter-token time")
    p.add_argument("--cost-per-hour", type=float, default=None, help="machine price (USD/hour): cost per Mtok")
    p.add_argument("--max-quality-loss-kl", type=float, default=None, help="drop changes whose KL exceeds this")
    p.add_argument("--apply", default=None, metavar="OUT.json",
                   help="write the winning configuration as engine arguments (`kiln serve --config OUT.json`)")
    p.add_argument("--json", action="store_true", help="the report as one JSON object (schema kiln.advise/1)")
    EngineArgs.add_cli_args(p)
    p.set_defaults(func=cmd_advise, threads=2)


def baseline_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line that differ from EngineArgs' defaults (model, threads aside)."""
    from kiln.engine.arg_utils import EngineArgs

    out = {}
    for f in fields(EngineArgs):
        if f.name in ("model", "threads"):
            continue
        value = getattr(args, f.name)
        if value != f.default:
            out[f.name] = value
    return out


def cmd_advise(args: argparse.Namespace) -> None:
    from kiln.planner.advisor import Targets, advise
    from kiln.planner.report import advise_text

    model = args.model_pos or args.model
    targets = Targets(args.slo_ttft_ms, args.slo_tpot_ms, args.tokens_per_second_per_user, args.cost_per_hour,
                      args.max_quality_loss_kl)
    report = advise(model, args.workload, args.concurrency, baseline_options(args), targets, threads=args.threads or 2,
                    num_requests=args.num_requests, max_tokens=args.max_tokens, top_n=args.top,
                    log=lambda s: print(f"advise: {s}", file=sys.stderr))
    if args.apply:
        config = {"model": model, **(report["winner"]["config"] if report["winner"] else report["baseline"]["config"])}
        with open(args.apply, "w", encoding="utf-8") as f:
            json.dump(config, f, indent=1)
        print(f"wrote {args.apply}: kiln serve --config {args.apply}", file=sys.stderr)
    print(json.dumps(report, indent=1) if args.json else advise_text(report))
