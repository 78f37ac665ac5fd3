"""OpenAI-compatible HTTP API: `kiln serve` (see api_server.build_app / run_server)."""
