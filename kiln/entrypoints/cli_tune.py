"""`kiln tune`: measure this machine's kernel crossovers (kiln.kernels.tune) and print them."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub: "argparse._SubParsersAction") -> None:
    p = sub.add_parser("tune", help="measure which kernel wins at each batch size on this CPU and cache it "
                                    "(kiln then picks kernels by it)")
    p.add_argument("--model", default="smollm2-135m", help="a GGUF with Q4_0/Q4_1 linears to time (default: %(default)s)")
    p.add_argument("--threads", type=int, default=None, help="threads to tune for (default: torch's count here)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; each path's figure is their low percentile")
    p.add_argument("--json", action="store_true", help="print the whole measurement as JSON")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from kiln.tuning.kernel_tune import measure
    from kiln.kernels.tune import describe, tune_file

    result = measure(args.model, args.threads, args.rounds, log=lambda s: print(s, file=sys.stderr))
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print("\n".join(describe(result)))
        print(f"saved {tune_file(result['fingerprint'])}")
    return 0
