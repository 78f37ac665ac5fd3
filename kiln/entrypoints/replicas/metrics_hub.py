"""Every replica's Prometheus metrics on the ingress's `/metrics`, each sample labelled by replica.

Each replica renders its own EngineMetrics (the same text one `kiln serve` exports) and pushes it
to one named Ray actor, the hub, about once a second (KilnReplica._push_metrics). The ingress pulls
the hub's snapshot on the same period and `merge_metrics` re-emits every family once, with a
`replica` label added to each sample, plus `kiln:replica_info{replica, pid}` (1 per live replica)
and `kiln:replicas_reporting`. A replica that stopped pushing for `STALE_S` (it died) drops out,
so the restarted one shows as a new `replica` label with its own pid.

`merge_metrics` and `MetricsHub` are plain Python (the hub becomes an actor in launch.py through
`ray.remote`), so tests/replicas/test_metrics_merge.py runs them without Ray.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

STALE_S = 5.0
PUSH_PERIOD_S = 1.0


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One replica's metrics text as of `at` (time.time() on the hub)."""

    replica: str
    pid: int
    text: str
    at: float


class MetricsHub:
    """Latest snapshot per replica (run as a Ray actor with num_cpus=0)."""

    def __init__(self) -> None:
        self._latest: dict[str, ReplicaSnapshot] = {}

    def put(self, replica: str, pid: int, text: str) -> None:
        self._latest[replica] = ReplicaSnapshot(replica, pid, text, time.time())

    def snapshot(self, stale_s: float = STALE_S) -> list[ReplicaSnapshot]:
        """Live replicas' snapshots, oldest replica name first; stale ones are dropped for good."""
        now = time.time()
        for name in [n for n, s in self._latest.items() if now - s.at > stale_s]:
            del self._latest[name]
        return [self._latest[n] for n in sorted(self._latest)]


def _label_str(labels: dict[str, str]) -> str:
    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in labels.items()) + "}" if labels else ""


def _value(v: float) -> str:
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


def merge_metrics(snapshots: list[ReplicaSnapshot]) -> str:
    """One Prometheus text exposition of all replicas: HELP/TYPE once per family, then every
    replica's samples with `replica="<name>"` added."""
    families: dict[str, tuple[str, str, list[str]]] = {}
    for snap in snapshots:
        for fam in text_string_to_metric_families(snap.text):
            # a counter "x" parses as family "x" with samples "x_total": HELP/TYPE go out once under the
            # family's name and each sample keeps its own, as prometheus_client writes them
            _, _, lines = families.setdefault(fam.name, (fam.type, fam.documentation, []))
            for s in fam.samples:
                labels = {"replica": snap.replica, **s.labels}
                lines.append(f"{s.name}{_label_str(labels)} {_value(s.value)}")
    out: list[str] = []
    for name, (kind, doc, lines) in families.items():
        out.append(f"# HELP {name} {doc}")
        out.append(f"# TYPE {name} {kind}")
        out.extend(lines)
    out.append("# HELP kiln:replica_info One per live replica: its name and process id.")
    out.append("# TYPE kiln:replica_info gauge")
    out.extend(f'kiln:replica_info{_label_str({"replica": s.replica, "pid": str(s.pid)})} 1.0' for s in snapshots)
    out.append("# HELP kiln:replicas_reporting Replicas whose metrics reached the ingress in the last few seconds.")
    out.append("# TYPE kiln:replicas_reporting gauge")
    out.append(f"kiln:replicas_reporting {float(len(snapshots))!r}")
    return "\n".join(out) + "\n"
