"""Format conversion: kiln-loadable models → files other engines load (GGUF for llama.cpp)."""
