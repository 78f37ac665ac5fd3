"""The ingress deployment: kiln's own OpenAI app (api_server.build_app) over a RemoteEngine.

Ray Serve's HTTP proxy hands every HTTP request to this deployment, whose ASGI app is built once
the replica is up (`__serve_build_asgi_app__`, Ray Serve's late-bound ingress): by then it holds a
handle to the engine deployment and the facts one engine replica reported, so the routes, streaming,
errors, API key, limits and /metrics are those of `kiln serve` itself, not a copy.
"""

from __future__ import annotations

from typing import Any

from kiln.entrypoints.openai.limits import ServerLimits
from kiln.entrypoints.replicas.remote_engine import RemoteEngine


class KilnIngress:
    """Wrapped by launch.py with `serve.ingress()` and `serve.deployment`."""

    async def __init__(self, engine_handle: Any, model_name: str, api_key: str | None, limits: ServerLimits,
                       max_queue: int | None, max_replicas: int, hub_name: str | None, hub_namespace: str | None,
                       shutdown_timeout: float) -> None:
        import ray

        facts = await engine_handle.describe.remote()
        hub = ray.get_actor(hub_name, namespace=hub_namespace) if hub_name else None
        self.remote = RemoteEngine(engine_handle, facts, hub, max_queue, max_replicas)
        self.model_name = model_name
        self.api_key = api_key
        self.limits = limits
        self.shutdown_timeout = shutdown_timeout

    def __serve_build_asgi_app__(self) -> Any:
        from kiln.entrypoints.openai.api_server import build_app

        # The browser pages read a local engine's configuration and stats; they stay off here.
        return build_app(self.remote, self.model_name, self.api_key,  # type: ignore[arg-type]  # duck-typed engine
                         engine_shutdown_timeout=self.shutdown_timeout, limits=self.limits, ui=False)
