"""`kiln info`: what a model is and what it costs to hold in memory."""

from __future__ import annotations

from pathlib import Path

from kiln.config import ModelConfig


def describe_config(cfg: ModelConfig) -> list[str]:
    n = cfg.num_parameters
    return [
        f"architecture     {cfg.architecture} ({cfg.name})",
        f"parameters       {n / 1e6:.1f} M",
        f"layers           {cfg.num_hidden_layers}, hidden {cfg.hidden_size}, ffn {cfg.intermediate_size}",
        f"attention        {cfg.num_attention_heads} query heads, {cfg.num_key_value_heads} KV heads, head_dim {cfg.head_dim}"
        + (" (GQA)" if cfg.num_key_value_heads < cfg.num_attention_heads else ""),
        f"vocabulary       {cfg.vocab_size}, tied embeddings: {cfg.tie_word_embeddings}",
        f"context          {cfg.max_position_embeddings} tokens, rope theta {cfg.rope_theta:g}"
        + (f", scaling {cfg.rope_scaling.rope_type} x{cfg.rope_scaling.factor:g}" if cfg.rope_scaling else ""),
        "weights memory   " + ", ".join(f"{name} {n * b / (1 << 20):.0f} MiB" for name, b in
                                       (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.5))),
        f"KV cache         {cfg.kv_bytes_per_token(2) / 1024:.1f} KiB/token at bf16, "
        f"{cfg.kv_bytes_per_token(4) / 1024:.1f} KiB/token at fp32",
        *describe_layer_pattern(cfg),
    ]


def describe_layer_pattern(cfg: ModelConfig) -> list[str]:
    """Sliding-window models: which layers are local (L, windowed) and which global (G)."""
    if not any(w is not None for w in cfg.layer_windows):
        return []
    pattern = "".join("G" if w is None else "L" for w in cfg.layer_windows)
    global_layers = [i for i, w in enumerate(cfg.layer_windows) if w is None]
    windows = sorted({w for w in cfg.layer_windows if w is not None})
    local_base = cfg.extra.get("rope_local_base")
    return [f"layer pattern    {pattern} (L: sliding window {', '.join(map(str, windows))} tokens"
            + (f", rope theta {local_base:g}" if local_base else "")
            + f"; G: global, layers {', '.join(map(str, global_layers)) or 'none'})"]


def print_info(model: str, dtype: str = "auto", max_weight_memory: str | None = None) -> None:
    from kiln.config import ModelLoadConfig
    from kiln.engine.kv_budget import parse_memory
    from kiln.hub import resolve_model
    from kiln.kernels.native import native_status
    from kiln.loader.model_loader import load_model
    from kiln.offload.weight_offload import weight_offload_config

    path = resolve_model(model)
    budget = parse_memory(max_weight_memory, "--max-weight-memory")
    offload = weight_offload_config(ModelLoadConfig(str(path), dtype, max_weight_memory=budget))
    # as the engine loads it (huge pages included), so the weight-memory line says what a served model gets
    loaded = load_model(path, dtype, weight_offload=offload, huge_pages=True)
    print(f"file             {path} ({loaded.file_format}, {Path(path).stat().st_size / (1 << 20):.1f} MiB)"
          if Path(path).is_file() else f"folder           {path} ({loaded.file_format})")
    for line in describe_config(loaded.config):
        print(line)
    print("tensor types     " + ", ".join(f"{k}: {v}" for k, v in sorted(loaded.tensor_types.items())))
    if loaded.file_format == "gguf":
        from kiln.loader.gguf_loader import RUNNABLE_TYPES

        # types no native kernel runs (Q2_K, Q3_K, Q5_1, IQ*...): their matrices are expanded to the compute dtype
        expanded = sorted(t for t in loaded.tensor_types if t not in RUNNABLE_TYPES and t not in ("F32", "F16", "BF16"))
        if expanded:
            print(f"dequantized      {', '.join(expanded)}: expanded at load (no native kernel for these types)")
    print(f"compute dtype    {loaded.model.dtype} (activations; quantized weights see 'linear path')")
    counts: dict[str, int] = {}
    for m in loaded.model.modules():
        if hasattr(m, "method"):
            counts[m.method.name] = counts.get(m.method.name, 0) + 1
    print("linear path      " + "\n                 ".join(f"{n} layer(s): {name}" for name, n in sorted(counts.items())))
    from kiln.kernels.tune import describe, load_tuning

    for line in describe(load_tuning()):
        print(line)
    if loaded.model.quantized_tied_head is None and loaded.config.tie_word_embeddings:
        print("lm head          tied to the dense embedding")
    # Which kernels run and, when plain torch, why (switched off, or no C++ compiler here).
    print(f"kernels          {native_status()}")
    loaded.model.decode_plan()
    print(f"decode step      {loaded.model.decode_plan_status}")
    print(f"weight memory    {weight_memory_line(loaded)}")
    print(f"chat template    {'yes' if loaded.tokenizer.chat_template else 'no'}")


def weight_memory_line(loaded: "LoadedModel") -> str:  # noqa: F821 - kiln.loader.model_loader
    """Resident vs memory-mapped weight bytes, as the startup line and `kiln info` print them."""
    from kiln.offload.weight_offload import model_weight_tensors, unique_bytes

    if loaded.offload is not None:
        return loaded.offload.summary()
    resident = unique_bytes(model_weight_tensors(loaded.model))
    how = ("GGUF blocks are repacked into kiln's kernel layouts at load (Q5_K/Q6_K rows kept as stored, but "
           "fused and un-permuted), so none is used in place from the file; "
           if loaded.file_format == "gguf" else "")
    huge = f"; {loaded.huge_pages.summary()}" if loaded.huge_pages is not None else ""
    return (f"{resident / (1 << 20):.1f} MiB resident, 0 mapped ({how}--max-weight-memory streams layers "
            f"from a file){huge}")
