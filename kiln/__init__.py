"""kiln: an LLM inference engine that proves what each optimization buys."""
