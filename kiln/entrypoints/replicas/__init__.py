"""`kiln serve --replicas N`: N kiln engines as one Ray Serve deployment behind kiln's own OpenAI app.

Layout (each file one job):
* options.py        the replica flags, validated before Ray starts (no Ray import)
* prefix_index.py   which replica probably holds which prompt blocks (no Ray import)
* prefix_router.py  the Ray Serve request router that uses it (prefix affinity, else least loaded)
* replica.py        one engine replica: an AsyncEngine, streamed outputs, health, metrics push
* remote_engine.py  the ingress side: an AsyncEngine look-alike that kiln's FastAPI app runs on
* metrics_hub.py    each replica's Prometheus text, merged with a `replica` label
* ingress.py        the ingress deployment: kiln's own app (build_app) over the remote engine
* launch.py         ray.init / serve.run / wait for a signal / shut down

Ray is an optional dependency (`pip install -e '.[ray]'`): only launch.py's callers import the
Ray-facing modules, and only when --replicas (or another replica flag) is given.
"""
