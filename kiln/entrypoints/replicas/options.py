"""The replica flags of `kiln serve` and their validation, before anything heavy starts.

`kiln serve` stays a one-engine server unless a replica flag is given (--replicas, --min-replicas,
--max-replicas, --ray-address); then it runs `ReplicaOptions.replicas` engines on Ray Serve. Every
check here raises ValueError with the flag's name, which the CLI prints as one line (exit 2).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass

ROUTING_CHOICES = ("prefix", "pow2")


def add_replica_args(parser: argparse.ArgumentParser) -> None:
    """The serve-only flags of replicas (listed in tests/engine/test_engine_args.py SERVE_ONLY)."""
    g = parser.add_argument_group("replicas (Ray Serve; needs `pip install -e '.[ray]'`)")
    g.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="run N engines as a Ray Serve deployment behind this one endpoint (traffic; for a model "
                        "that does not fit one machine use --tensor-parallel-size)")
    g.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="autoscale on queue length between --min-replicas and --max-replicas (Ray Serve autoscaling)")
    g.add_argument("--max-replicas", type=int, default=None, metavar="N", help="see --min-replicas")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="join this Ray cluster (e.g. HEAD_IP:6379 after `ray start --head`) instead of starting a "
                        "local one")
    g.add_argument("--replica-routing", default="prefix", choices=ROUTING_CHOICES,
                   help="prefix: requests sharing a prompt prefix go to the replica that holds it in its prefix "
                        "cache, else the least-loaded one; pow2: Ray Serve's default (power of two choices)")


def wants_replicas(args: argparse.Namespace) -> bool:
    """True when any replica flag was given: then `kiln serve` runs on Ray Serve."""
    return any(getattr(args, name, None) is not None
               for name in ("replicas", "min_replicas", "max_replicas", "ray_address"))


@dataclass(frozen=True)
class ReplicaOptions:
    """Validated replica settings.

    Invariants: 1 <= min_replicas <= replicas <= max_replicas; `autoscaling` is True exactly when
    min_replicas != max_replicas (Ray Serve then moves between them on queue length);
    threads_per_replica >= 1 (one tensor-parallel rank's threads when tensor_parallel_size > 1).
    """

    replicas: int
    min_replicas: int
    max_replicas: int
    threads_per_replica: int
    tensor_parallel_size: int
    ray_address: str | None
    routing: str

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas != self.max_replicas

    @property
    def cpus_per_replica(self) -> int:
        """The CPUs Ray reserves for one replica: its threads on every rank (so Ray places replicas on
        machines that have the cores, and never more replicas on one machine than it has cores for)."""
        return self.threads_per_replica * self.tensor_parallel_size

    @classmethod
    def from_args(cls, args: argparse.Namespace, cores: int | None = None) -> "ReplicaOptions":
        """From `kiln serve`'s parsed flags; `cores`: this machine's (default os.cpu_count())."""
        return cls.build(replicas=args.replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                         threads=args.threads, tensor_parallel_size=args.tensor_parallel_size,
                         ray_address=args.ray_address, routing=args.replica_routing, cores=cores)

    @classmethod
    def build(cls, replicas: int | None = None, min_replicas: int | None = None, max_replicas: int | None = None,
              threads: int | None = None, tensor_parallel_size: int = 1, ray_address: str | None = None,
              routing: str = "prefix", cores: int | None = None) -> "ReplicaOptions":
        for flag, value in (("--replicas", replicas), ("--min-replicas", min_replicas),
                            ("--max-replicas", max_replicas)):
            if value is not None and value < 1:
                raise ValueError(f"{flag} must be at least 1 (got {value}); one replica is one kiln engine")
        if min_replicas is not None and max_replicas is not None and min_replicas > max_replicas:
            raise ValueError(f"--min-replicas ({min_replicas}) is greater than --max-replicas ({max_replicas}); "
                             f"give a range with min <= max")
        lo = min_replicas if min_replicas is not None else min(replicas or 1, max_replicas or replicas or 1)
        hi = max_replicas if max_replicas is not None else max(replicas or 1, lo)
        start = replicas if replicas is not None else lo
        if not lo <= start <= hi:
            raise ValueError(f"--replicas {start} is outside --min-replicas {lo} .. --max-replicas {hi}; "
                             f"give a starting count inside the autoscaling range")
        if routing not in ROUTING_CHOICES:
            raise ValueError(f"--replica-routing must be one of {', '.join(ROUTING_CHOICES)} (got {routing!r})")
        if threads is not None and threads < 1:
            raise ValueError(f"--threads must be at least 1 (got {threads})")
        cores = cores or os.cpu_count() or 1
        # The machine's cores shared by the most replicas it may hold (and their tensor-parallel ranks):
        # more threads than cores would put two OpenMP teams on one core.
        per_replica = threads or max(1, cores // (hi * max(1, tensor_parallel_size)))
        return cls(start, lo, hi, per_replica, max(1, tensor_parallel_size), ray_address, routing)
