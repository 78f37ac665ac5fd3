"""Frozen configuration dataclasses shared by the loader, model, engine and CLI."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# KV cache storage (kiln.kernels.kv_quant): auto = see kv_quant.full_precision_kv_dtype;
# float32 / bfloat16 / float16 = that dtype (16-bit under fp32 activations is widened in the
# attention kernel); int8 / fp8_e4m3 = 1 byte per value plus an fp32 scale per token and KV head.
KV_CACHE_DTYPES = ("auto", "float32", "bfloat16", "float16", "int8", "fp8_e4m3")


def check_kv_cache_dtype(name: str) -> str:
    """`name` if it is one of KV_CACHE_DTYPES, else a ValueError that lists them."""
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    return name


@dataclass(frozen=True)
class RopeScaling:
    """RoPE scaling parameters. Only `llama3` (Llama 3.1 style) and `linear` are supported."""

    rope_type: str  # "llama3" | "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder.

    Invariants: hidden_size == num_attention_heads * head_dim is *not* required
    (some models decouple them), but num_attention_heads % num_key_value_heads == 0.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2 has biases on q/k/v
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""
    # Per-layer sliding attention window (keys a query sees, itself included); None = global
    # attention. Empty: every layer is global (the Llama family).
    layer_windows: tuple[int | None, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.layer_windows and len(self.layer_windows) != self.num_hidden_layers:
            raise ValueError(f"layer_windows has {len(self.layer_windows)} entries for {self.num_hidden_layers} layers")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def num_parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += q + 2 * kv
        total = per_layer * self.num_hidden_layers + v * h + h
        if not self.tie_word_embeddings:
            total += v * h
        return total

    def kv_bytes_per_token(self, dtype_bytes: int) -> int:
        """Bytes of K+V cache one token occupies across all layers (only KV heads are cached)."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache sizing.

    `kv_cache_memory` (bytes) wins when set; otherwise `kv_cache_fraction` of the memory
    available at start-up is used, capped at `kv_cache_max_default` bytes.
    """

    block_size: int = 16
    kv_cache_memory: int | None = None
    kv_cache_fraction: float = 0.25
    kv_cache_max_default: int = 2 << 30
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"  # one of KV_CACHE_DTYPES

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.kv_cache_dtype)


@dataclass(frozen=True)
class SchedulerConfig:
    """Per-step limits: tokens in one forward and sequences in flight."""

    max_num_batched_tokens: int = 512
    max_num_seqs: int = 64
    enable_chunked_prefill: bool = True  # off: a prompt waits for a step with room for all of it (one longer than the budget is chunked anyway)
    max_model_len: int | None = None  # None: the model's context length
    # multi-step decode: up to this many decode steps per engine step for an all-decode batch with
    # nothing waiting (kiln.engine.multi_step); 1 turns it off
    num_scheduler_steps: int = 4


@dataclass
class SpeculativeConfig:
    """Speculative decoding. `method` 'ngram' (prompt lookup) or 'draft' (a draft model: `draft_model`
    is 'self:int4', 'self:int8' — a quantized copy of the target — or a model name/path).

    Speculation is skipped for a step when more than `max_batch_size` sequences run: a big
    batch already keeps the cores busy, and verifying k drafts per sequence would multiply
    the step's tokens for little gain. With `adaptive` (the default) it is also skipped at any
    batch size where the engine has measured speculating steps to yield fewer tokens per second
    than plain ones (a draft model that costs more than it saves, drafts that keep missing).
    """

    method: str = "ngram"
    num_speculative_tokens: int = 4
    ngram_min: int = 1
    ngram_max: int = 4
    max_batch_size: int = 2  # benchmarks/spec_decode.py: n-gram drafts paid at 2 sequences, lost at 4
    draft_model: str | None = None
    adaptive: bool = True  # also skip steps where the measured speedup is < 1 (kiln.spec_decode.controller)

    @classmethod
    def from_name(cls, name: str, num_speculative_tokens: int = 4, ngram_min: int = 1, ngram_max: int = 4,
                  max_batch_size: int = 2, adaptive: bool = True) -> "SpeculativeConfig":
        """`--speculative-model NAME`: 'ngram', 'self:int4', 'self:int8' or a draft model name/path."""
        if name == "ngram":
            return cls("ngram", num_speculative_tokens, ngram_min, ngram_max, max_batch_size, adaptive=adaptive)
        return cls("draft", num_speculative_tokens, ngram_min, ngram_max, max_batch_size, draft_model=name,
                   adaptive=adaptive)

    def __post_init__(self) -> None:
        if self.method not in ("ngram", "draft"):
            raise ValueError(f"speculative method must be 'ngram' or 'draft', got {self.method!r}")
        if self.method == "draft" and not self.draft_model:
            raise ValueError("a draft-model speculative config needs draft_model (self:int4, self:int8, or a model)")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens must be in [1, 16], got {self.num_speculative_tokens}")
        if not isinstance(self.max_batch_size, int) or self.max_batch_size < 0:
            raise ValueError(f"the speculation switch-off batch size must be a non-negative integer, got {self.max_batch_size}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")



PREFILL_ATTENTION_CHOICES = ("native", "sdpa")


@dataclass(frozen=True)
class KernelConfig:
    """Which kernel paths may run (each False/"sdpa" falls back to the plain-torch twin).

    Environment variable → field (the CLI flag in brackets):
      KILN_NO_NATIVE=1          → native=False            [--no-native-kernels]
      KILN_FUSED=0              → fused_ops=False         [--no-fused-ops]
      KILN_FUSED_STEP=0         → fused_decode_step=False [--no-fused-decode-step]
      KILN_QUANT_KERNELS=0      → quant_kernels=False     [--no-quant-kernels]
      KILN_PREFILL_ATTENTION=sdpa → prefill_attention="sdpa" [--prefill-attention sdpa]
      KILN_NO_AUTO_TUNE=1       → auto_tune=False         [--no-auto-tune]
      KILN_PACKED_GEMM=0        → packed_gemm=False       [--no-packed-gemm]
    """

    native: bool = True  # build/load the C++ kernel library at all
    fused_ops: bool = True  # native add+RMSNorm and in-place RoPE
    fused_decode_step: bool = True  # a pure decode batch's decoder stack in one native call
    quant_kernels: bool = True  # GGUF/INT blocks through kiln's block/panel matmul kernels; dense decode kernel
    prefill_attention: str = "native"  # "native": kiln's paged flash kernel; "sdpa": gather + torch SDPA
    auto_tune: bool = True  # no `kiln tune` file for this CPU, build and thread count: measure one (kiln.tuning.auto_tune)
    packed_gemm: bool = True  # bf16 dense copies pre-packed for oneDNN's GEMM (kiln.kernels.packed_linear)

    def __post_init__(self) -> None:
        if self.prefill_attention not in PREFILL_ATTENTION_CHOICES:
            raise ValueError(f"prefill_attention must be one of {', '.join(PREFILL_ATTENTION_CHOICES)}; "
                             f"got {self.prefill_attention!r}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "KernelConfig":
        """The switches the environment variables name (unset ones keep their defaults)."""
        env = os.environ if environ is None else environ
        return cls(
            native=env.get("KILN_NO_NATIVE", "0") != "1",
            fused_ops=env.get("KILN_FUSED", "1") != "0",
            fused_decode_step=env.get("KILN_FUSED_STEP", "1") != "0",
            quant_kernels=env.get("KILN_QUANT_KERNELS", "1") != "0",
            prefill_attention=env.get("KILN_PREFILL_ATTENTION", "native"),
            auto_tune=env.get("KILN_NO_AUTO_TUNE", "0") != "1",
            packed_gemm=env.get("KILN_PACKED_GEMM", "1") != "0",
        )


@dataclass(frozen=True)
class ModelLoadConfig:
    """What to load and how: a registered name, a .gguf file or a Hugging Face folder; the activation
    dtype ('auto' picks per device and CPU, see kiln.loader.model_loader); the device; and whether
    GGUF Q4_0/Q4_1/Q8_0 matrices stay in their blocks ('auto'/'native') or are expanded ('dequantize').
    `max_weight_memory` (bytes, None: no limit): decoder layers beyond it stream from a file in
    `offload_dir` (kiln.offload), with kiln's own read-ahead of the next layer if `offload_read_ahead`;
    `offload_drop_page_cache` evicts them from the page cache after each use (a cold-cache measurement).
    `huge_page_weights`: resident CPU weights move into one mapping advised for transparent huge pages
    (kiln.offload.huge_pages)."""

    model: str = "smollm2-135m"
    dtype: str = "auto"
    device: str = "cpu"
    quantized_weights: str = "auto"
    max_weight_memory: int | None = None
    offload_dir: str | None = None
    offload_read_ahead: bool = False
    offload_drop_page_cache: bool = False
    huge_page_weights: bool = True

    def __post_init__(self) -> None:
        if self.quantized_weights not in QUANTIZED_WEIGHTS_MODES:
            raise ValueError(f"quantized_weights must be one of {', '.join(QUANTIZED_WEIGHTS_MODES)}; "
                             f"got {self.quantized_weights!r}")


QUANTIZED_WEIGHTS_MODES = ("auto", "native", "dequantize")


@dataclass(frozen=True)
class ParallelConfig:
    """How the engine uses the machine. `threads`: torch/OpenMP threads of the engine thread, and of each
    tensor-parallel rank (None: all cores, or cores / tensor_parallel_size under TP, at least 1). They are
    set on the thread that runs the model, since OpenMP's thread count is per thread.

    `tensor_parallel_size` ranks run one model (kiln.distributed); `distributed_init` None: the engine
    spawns the other ranks on this machine; 'env://': a launcher (torchrun) started every rank and its
    RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT environment variables say who is who."""

    threads: int | None = None
    tensor_parallel_size: int = 1
    distributed_init: str | None = None

    def __post_init__(self) -> None:
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.distributed_init not in (None, "env://"):
            raise ValueError(f"distributed_init must be 'env://' (ranks from a launcher such as torchrun) or unset "
                             f"(the engine spawns its ranks), got {self.distributed_init!r}")

    def rank_threads(self, cores: int) -> int:
        """Threads of one rank: `threads` when set, else this machine's cores shared by its ranks."""
        if self.threads is not None:
            return self.threads
        return max(1, cores // self.tensor_parallel_size)


@dataclass(frozen=True)
class LoRAConfig:
    """LoRA adapters to serve (kiln.lora): `max_loras` slots of rank up to `max_lora_rank` on every adapted
    layer, and the (name, PEFT folder) pairs loaded at start. More adapters may be loaded than there are
    slots; they take turns (LRU)."""

    max_loras: int = 4
    max_lora_rank: int = 16
    loras: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError(f"max_loras ({self.max_loras}) and max_lora_rank ({self.max_lora_rank}) must be >= 1")
        names = [name for name, _ in self.loras]
        if len(set(names)) != len(names):
            raise ValueError(f"--lora names must be unique, got {names}")


@dataclass(frozen=True)
class EngineConfig:
    """Everything an engine is built from, in one frozen value (made by kiln.engine.arg_utils.EngineArgs).

    Invariant: two engines built from equal EngineConfigs behave the same; nothing the engine does
    depends on an option that is not in here (the kernel switches included)."""

    model: ModelLoadConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    speculative: SpeculativeConfig | None
    parallel: ParallelConfig
    kernel: KernelConfig
    lora: LoRAConfig | None = None  # None: no adapters (no slots allocated)
