"""Per-replica metrics merged for the ingress's /metrics, and the replica flags' validation.

Reference for the metrics: prometheus_client's own text parser reads the merged exposition back; every
sample of each replica's EngineMetrics must be there with its value and a `replica` label.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln.engine.metrics import EngineMetrics
from kiln.entrypoints.cli import main
from kiln.entrypoints.replicas.metrics_hub import MetricsHub, ReplicaSnapshot, merge_metrics
from kiln.entrypoints.replicas.options import ReplicaOptions


def _samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_merged_metrics_keep_every_replica_sample_under_a_replica_label() -> None:
    a, b = EngineMetrics(), EngineMetrics()
    a.observe_first_token(0.3)
    a.requests_finished.labels(finish_reason="stop").inc(3)
    b.observe_first_token(2.0)
    b.prompt_tokens.inc(42)
    snaps = [ReplicaSnapshot("ra", 11, a.render().decode(), 0.0), ReplicaSnapshot("rb", 22, b.render().decode(), 0.0)]
    merged = merge_metrics(snaps)
    got = _samples(merged)
    for snap in snaps:
        for (name, labels), value in _samples(snap.text).items():
            if name.endswith("_created"):
                continue  # creation timestamps are kept but differ per registry
            assert got[(name, labels | {("replica", snap.replica)})] == value, name
    assert got[("kiln:replica_info", frozenset({("replica", "rb"), ("pid", "22")}))] == 1.0
    assert got[("kiln:replicas_reporting", frozenset())] == 2.0
    # one HELP/TYPE per family, not one per replica (Prometheus rejects duplicates)
    assert merged.count("# TYPE kiln:time_to_first_token_seconds histogram") == 1


def test_hub_drops_replicas_that_stopped_pushing(monkeypatch: pytest.MonkeyPatch) -> None:
    import kiln.entrypoints.replicas.metrics_hub as hub_module

    now = [1000.0]
    monkeypatch.setattr(hub_module.time, "time", lambda: now[0])
    hub = MetricsHub()
    hub.put("old", 1, "")
    now[0] += 4
    hub.put("new", 2, "")
    assert [s.replica for s in hub.snapshot(stale_s=5)] == ["new", "old"]
    now[0] += 2  # "old" last pushed 6 s ago: it died
    assert [s.replica for s in hub.snapshot(stale_s=5)] == ["new"]


@pytest.mark.parametrize(("flags", "message"), [
    (["--replicas", "0"], "--replicas must be at least 1 (got 0)"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is greater than --max-replicas (2)"),
    (["--replicas", "5", "--min-replicas", "1", "--max-replicas", "2"], "--replicas 5 is outside"),
    (["--max-replicas", "-1"], "--max-replicas must be at least 1"),
])
def test_bad_replica_flags_are_one_clear_error_before_ray_starts(flags: list[str], message: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    # a model that does not exist: the flags must be refused before anything looks for it
    assert main(["serve", "--model", "/nonexistent.gguf", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_threads_default_to_the_cores_shared_by_the_most_replicas() -> None:
    assert ReplicaOptions.build(replicas=2, cores=2).threads_per_replica == 1
    assert ReplicaOptions.build(replicas=1, cores=2).threads_per_replica == 2
    opts = ReplicaOptions.build(min_replicas=1, max_replicas=4, cores=8, tensor_parallel_size=2)
    assert (opts.replicas, opts.threads_per_replica, opts.cpus_per_replica, opts.autoscaling) == (1, 1, 2, True)
    assert ReplicaOptions.build(replicas=3, threads=2, cores=2).threads_per_replica == 2  # an explicit count wins
    assert not ReplicaOptions.build(replicas=2).autoscaling


def test_deployment_options_hand_ray_serve_the_autoscaling_range_router_and_threads() -> None:
    """What launch.py gives `serve.deployment`, as Ray Serve's own config classes validate and read it."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from kiln.engine.arg_utils import EngineArgs
    from kiln.entrypoints.replicas.launch import deployment_options, engine_options
    from kiln.entrypoints.replicas.prefix_router import PrefixAffinityRouter

    args = EngineArgs(max_num_seqs=32, block_size=16)
    opts = ReplicaOptions.build(replicas=2, min_replicas=1, max_replicas=3, cores=6)
    d = deployment_options(args, opts, shutdown_timeout=7.0, max_queue=100)
    scale = d["autoscaling_config"]
    assert isinstance(scale, AutoscalingConfig) and "num_replicas" not in d
    assert (scale.min_replicas, scale.max_replicas, scale.initial_replicas) == (1, 3, 2)
    assert scale.target_ongoing_requests == 32  # a replica whose batch is full asks for another
    assert d["ray_actor_options"]["num_cpus"] == 2  # 6 cores shared by at most 3 replicas
    assert d["ray_actor_options"]["runtime_env"]["env_vars"]["OMP_NUM_THREADS"] == "2"
    router = d["request_router_config"]
    path = f"{PrefixAffinityRouter.__module__}.{PrefixAffinityRouter.__qualname__}"
    assert isinstance(router, RequestRouterConfig) and router.request_router_class == path  # Ray keeps the path
    assert router.request_router_kwargs == {"block_size": 16, "imbalance": 4}
    assert d["max_ongoing_requests"] == 32 + 100 and d["graceful_shutdown_timeout_s"] == 7.0
    fixed = deployment_options(args, ReplicaOptions.build(replicas=2, routing="pow2", cores=2), 7.0, None)
    assert fixed["num_replicas"] == 2 and "autoscaling_config" not in fixed
    assert fixed["request_router_config"].request_router_class != path  # Ray's default
    assert engine_options(args, opts)["threads"] == 2
