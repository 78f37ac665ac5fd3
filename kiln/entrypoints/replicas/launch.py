"""`kiln serve --replicas N`: start (or join) Ray, deploy the engines and the ingress, serve until a signal.

The deployment graph: Ray Serve's HTTP proxy on --host/--port → one `kiln-ingress` replica (kiln's
app over a RemoteEngine, no CPUs reserved: it only relays) → `kiln-engine` replicas, each a whole
kiln engine with `threads_per_replica` threads (x its tensor-parallel ranks) reserved as Ray CPUs.
Routing between the engines: kiln's PrefixAffinityRouter (default) or Ray's power of two choices.
With --min-replicas/--max-replicas, Ray Serve autoscales the engines on ongoing requests per replica
(running + queued), aiming at max_num_seqs each: a replica whose batch is full makes room for another.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from dataclasses import asdict
from typing import Any

from kiln.engine.arg_utils import EngineArgs
from kiln.entrypoints.openai.limits import ServerLimits
from kiln.errors import KilnError
from kiln.entrypoints.replicas.options import ReplicaOptions

logger = logging.getLogger("kiln.entrypoints.replicas")

NAMESPACE = "kiln"
APP_NAME = "kiln"
ENGINE_DEPLOYMENT = "kiln-engine"
INGRESS_DEPLOYMENT = "kiln-ingress"


def engine_options(engine_args: EngineArgs, opts: ReplicaOptions) -> dict[str, Any]:
    """The EngineArgs every replica builds its engine from: this machine's paths made absolute (a
    replica's working directory is Ray's), and the replica's share of the cores as its threads."""
    options = asdict(engine_args)
    if os.path.exists(engine_args.model):
        options["model"] = os.path.abspath(engine_args.model)
    options["threads"] = opts.threads_per_replica
    return options


def deployment_options(engine_args: EngineArgs, opts: ReplicaOptions, shutdown_timeout: float,
                       max_queue: int | None) -> dict[str, Any]:
    """`serve.deployment` options of the engine replicas (Ray Serve's names)."""
    from ray.serve.config import AutoscalingConfig, RequestRouterConfig

    from kiln.entrypoints.replicas.prefix_router import PrefixAffinityRouter

    router = RequestRouterConfig(request_routing_stats_period_s=2.0)
    if opts.routing == "prefix":
        router = RequestRouterConfig(
            request_router_class=PrefixAffinityRouter, request_routing_stats_period_s=2.0,
            request_router_kwargs={"block_size": engine_args.block_size,
                                   "imbalance": max(4, engine_args.max_num_seqs // 8)})
    scale: dict[str, Any] = {"num_replicas": opts.replicas}
    if opts.autoscaling:
        scale = {"autoscaling_config": AutoscalingConfig(
            min_replicas=opts.min_replicas, max_replicas=opts.max_replicas, initial_replicas=opts.replicas,
            target_ongoing_requests=engine_args.max_num_seqs)}
    threads = str(opts.threads_per_replica)
    return {
        **scale,
        "name": ENGINE_DEPLOYMENT,
        "ray_actor_options": {"num_cpus": opts.cpus_per_replica,
                              "runtime_env": {"env_vars": {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}}},
        # kiln batches and queues inside each engine; Ray only needs to keep its hands off
        "max_ongoing_requests": engine_args.max_num_seqs + (max_queue or 4 * engine_args.max_num_seqs),
        "request_router_config": router,
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 60.0,
        "graceful_shutdown_timeout_s": shutdown_timeout,
    }


def start_ray(opts: ReplicaOptions, log_to_driver: bool) -> None:
    import ray

    if opts.ray_address:
        ray.init(address=opts.ray_address, namespace=NAMESPACE, log_to_driver=log_to_driver)
        return
    # A local cluster sized so that every replica the range allows fits: Ray never leaves one pending
    # for want of CPUs this machine has (threads_per_replica already shares the real cores out).
    cpus = max(os.cpu_count() or 1, opts.max_replicas * opts.cpus_per_replica)
    # address="local": always a new instance of our own, even when a cluster started with `ray start`
    # runs on this machine (ray.init would otherwise join it, and refuse num_cpus)
    ray.init(address="local", num_cpus=cpus, namespace=NAMESPACE, include_dashboard=False,
             log_to_driver=log_to_driver)


def serve_replicas(args: argparse.Namespace, engine_args: EngineArgs, limits: ServerLimits,
                   api_key: str | None) -> None:
    """Run `kiln serve` as replicas on Ray Serve until SIGTERM/SIGINT; KilnError on bad flags or a failed start."""
    opts = ReplicaOptions.from_args(args)  # bad flags fail here, before Ray starts
    engine_args.create_engine_config()  # bad engine options too (each replica would fail the same way)
    from kiln.hub import resolve_model

    if not opts.ray_address:
        resolve_model(engine_args.model)  # a missing model is one line here, not N replica tracebacks
    try:
        import ray
        from ray import serve
    except ImportError:
        raise KilnError("--replicas needs Ray Serve: pip install -e '.[ray]'") from None
    from kiln.entrypoints.replicas.ingress import KilnIngress
    from kiln.entrypoints.replicas.metrics_hub import MetricsHub
    from kiln.entrypoints.replicas.replica import KilnReplica

    max_queue = args.max_queue or None
    hub_name = f"kiln-metrics-{os.getpid()}"
    start_ray(opts, log_to_driver=args.log_level in ("debug", "info"))
    try:
        # kept referenced until shutdown: a named actor whose last handle goes away is collected
        hub = ray.remote(num_cpus=0)(MetricsHub).options(name=hub_name, namespace=NAMESPACE).remote()
        serve.start(http_options={"host": args.host, "port": args.port})
        engine = serve.deployment(KilnReplica, **deployment_options(engine_args, opts, args.shutdown_timeout,
                                                                    max_queue))
        ingress = serve.deployment(serve.ingress()(KilnIngress), name=INGRESS_DEPLOYMENT, num_replicas=1,
                                   ray_actor_options={"num_cpus": 0}, max_ongoing_requests=100_000,
                                   graceful_shutdown_timeout_s=args.shutdown_timeout)
        app = ingress.bind(engine.bind(engine_options(engine_args, opts), max_queue, hub_name, NAMESPACE),
                           args.served_model_name or engine_args.model, api_key, limits, max_queue,
                           opts.max_replicas, hub_name, NAMESPACE, args.shutdown_timeout)
        try:
            serve.run(app, name=APP_NAME, route_prefix="/")
        except Exception as exc:
            raise KilnError(f"the replicas did not start: {type(exc).__name__}: {exc}") from None
        scaling = (f"{opts.min_replicas}..{opts.max_replicas} replicas (autoscaling, starting at {opts.replicas})"
                   if opts.autoscaling else f"{opts.replicas} replica(s)")
        print(f"kiln: {scaling} x {opts.threads_per_replica} thread(s) on Ray Serve "
              f"({'cluster ' + opts.ray_address if opts.ray_address else 'local Ray'}), routing {opts.routing}, "
              f"at http://{args.host}:{args.port}/v1", file=sys.stderr, flush=True)
        _wait_for_signal()
        del hub
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def _wait_for_signal() -> None:
    """Block until SIGTERM or SIGINT (then the caller shuts Serve and Ray down: exit 0)."""
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
