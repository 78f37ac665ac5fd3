"""`EngineArgs`: every engine option, declared once, with its help text and default.

`kiln serve`, `kiln generate`, `kiln chat`, `kiln bench` and `LLM(...)` all take their engine
options from here: `EngineArgs.add_cli_args(parser)` adds the flags, `EngineArgs.from_cli_args(ns)`
and `EngineArgs(**kwargs)` build it, and `create_engine_config()` turns it into the one frozen
`EngineConfig` the engine is built from. A new engine option is one new field here and nowhere else
(tests/engine/test_engine_args.py enumerates the CLI flags and `LLM`'s keyword arguments against it).

Kernel switches default to None = "what the environment says" (KILN_FUSED=0 etc., see
kiln.config.KernelConfig), so an environment variable and a flag mean the same thing and the flag wins.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields
from typing import Any

from kiln.config import (
    KV_CACHE_DTYPES, PREFILL_ATTENTION_CHOICES, QUANTIZED_WEIGHTS_MODES, CacheConfig, EngineConfig, KernelConfig,
    LoRAConfig, ModelLoadConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig,
)


def _opt(default: Any, help: str, *, flag: str | None = None, type: Any = None, choices: tuple[str, ...] | None = None,
         negate: bool = False, repeat: bool = False, switch: bool = False) -> Any:
    """A field with its CLI form. `negate`: a True-by-default switch whose flag (`flag`) turns it off;
    `repeat`: a flag given once per value, collected in a list; `switch`: an off-by-default flag that turns it on."""
    cli = {"help": help, "flag": flag, "type": type, "choices": choices, "negate": negate, "repeat": repeat,
           "switch": switch}
    return field(default=default, metadata={"cli": cli})


@dataclass
class EngineArgs:
    """The engine's options (names follow vLLM's where vLLM has the option)."""

    # ---- the model ----
    model: str = _opt("smollm2-135m", "registered name (see `kiln pull --list`), a .gguf file or a Hugging Face folder")
    dtype: str = _opt("auto", "activation dtype: auto (bf16 on CUDA and AMX CPUs, else fp32: faster on AVX-512 "
                              "CPUs without AMX, see README), float32, bfloat16, float16")
    device: str = _opt("cpu", "cpu or cuda")
    quantized_weights: str = _opt("auto", "GGUF Q4_0/Q4_1/Q8_0: run in their blocks with native kernels "
                                          "(auto/native) or expand to --dtype (dequantize)",
                                  choices=QUANTIZED_WEIGHTS_MODES)
    max_weight_memory: str | int | None = _opt(None, "keep at most this much of the weights in RAM, e.g. 40MiB: "
                                                     "later decoder layers stay in a memory-mapped file and are "
                                                     "streamed per step (slower; default: all resident)")
    offload_dir: str | None = _opt(None, "directory of the file --max-weight-memory streams layers from "
                                         "(default: KILN_HOME/offload)")
    offload_read_ahead: bool = _opt(False, "--max-weight-memory: a background thread faults the next layer in while "
                                           "the current one computes (off by default: on a 2-core machine it measured no faster "
                                           "than the kernel's own readahead, see README)", switch=True)
    offload_drop_page_cache: bool = _opt(False, "--max-weight-memory, for measurements: evict each streamed layer "
                                                "from the page cache after use, so every step reads the disk",
                                         switch=True)
    huge_page_weights: bool = _opt(True, "keep the resident CPU weights in ordinary 4 KiB pages instead of one "
                                         "mapping advised for transparent huge pages (decode streams the weights "
                                         "every step; huge pages measured faster here, see README)",
                                   flag="--no-huge-page-weights", negate=True)
    # ---- the KV cache ----
    kv_cache_memory: str | int | None = _opt(None, "KV cache budget, e.g. 2GiB (default: 25%% of free RAM, at most 2 GiB)")
    kv_cache_dtype: str = _opt("auto", "KV cache storage: auto (the model dtype; float16 under a float32 model on "
                                       "the CPU, as llama.cpp), float32, bfloat16, float16, or int8 / fp8_e4m3 (1 byte "
                                       "per value + a scale per token and head: ~2x the tokens of 16-bit in the same "
                                       "memory, small quality cost)", choices=KV_CACHE_DTYPES)
    block_size: int = _opt(16, "tokens per KV cache block", type=int)
    enable_prefix_caching: bool = _opt(True, "do not reuse the KV blocks of shared prompt prefixes",
                                       flag="--no-prefix-caching", negate=True)
    # ---- the scheduler ----
    max_num_seqs: int = _opt(64, "sequences in flight at once", type=int)
    max_num_batched_tokens: int = _opt(512, "tokens in one forward (the per-step token budget)", type=int)
    max_model_len: int | None = _opt(None, "context length (default: the model's)", type=int)
    enable_chunked_prefill: bool = _opt(True, "prefill a prompt in one step instead of in budget-sized chunks "
                                              "(a prompt longer than --max-num-batched-tokens is still chunked)",
                                        flag="--no-chunked-prefill", negate=True)
    num_scheduler_steps: int = _opt(4, "multi-step decode: run up to this many decode steps per engine step when "
                                       "every sequence decodes and nothing waits (tokens then reach streams this "
                                       "many at a time; 1 turns it off)", type=int)
    # ---- speculative decoding ----
    speculative_model: str | None = _opt(None, "speculative decoding: ngram (prompt lookup), self:int4 / self:int8 "
                                               "(a quantized copy of the model drafts), or a draft model name/path "
                                               "with the same tokenizer; off by default")
    num_speculative_tokens: int = _opt(4, "draft tokens per step", type=int)
    speculative_disable_by_batch_size: int = _opt(2, "do not speculate in a step with more running sequences "
                                                     "than this (it stops paying)", type=int)
    speculative_adaptive: bool = _opt(True, "speculate in every step up to the batch-size switch-off, even where "
                                            "it was measured not to pay", flag="--no-speculative-adaptive",
                                      negate=True)
    ngram_min: int = _opt(1, "ngram proposer: shortest suffix to match", type=int)
    ngram_max: int = _opt(4, "ngram proposer: longest suffix to match", type=int)
    # ---- the machine ----
    threads: int | None = _opt(None, "torch/OpenMP threads of the engine, and of each tensor-parallel rank "
                                     "(default: all cores, shared by the ranks under tensor parallel)", type=int)
    tensor_parallel_size: int = _opt(1, "tensor parallel: shard the model over this many processes joined by "
                                        "torch.distributed (gloo on CPU, NCCL on CUDA)", type=int)
    distributed_init: str | None = _opt(None, "tensor parallel rendezvous: env:// takes the ranks from a launcher "
                                              "(torchrun --nnodes ...); default: the engine spawns its ranks here",
                                        choices=("env://",))
    # ---- LoRA adapters (kiln.lora) ----
    loras: list[str] | None = _opt(None, "serve a PEFT LoRA adapter as model NAME: NAME=PATH (repeatable); requests "
                                         "pick it with \"model\": NAME", flag="--lora", repeat=True)
    max_loras: int | None = _opt(None, "adapters resident at once (their slots are allocated at start; more are "
                                       "loaded in turn, LRU); default 4 when --lora is given, else LoRA is off "
                                       "unless this is set (for adapters loaded at run time)", type=int)
    max_lora_rank: int = _opt(16, "largest adapter rank the slots hold (up to 64 is typical)", type=int)
    # ---- kernel switches (None: the environment variable's value, see kiln.config.KernelConfig) ----
    native_kernels: bool | None = _opt(None, "do not build or use kiln's C++ kernels: plain torch everywhere "
                                             "(env KILN_NO_NATIVE=1)", flag="--no-native-kernels", negate=True)
    fused_ops: bool | None = _opt(None, "run add+RMSNorm and RoPE as torch ops instead of the native fused ops "
                                        "(env KILN_FUSED=0)", flag="--no-fused-ops", negate=True)
    fused_decode_step: bool | None = _opt(None, "run decode steps op by op from Python instead of in one native "
                                                "call (env KILN_FUSED_STEP=0)", flag="--no-fused-decode-step",
                                          negate=True)
    quant_kernels: bool | None = _opt(None, "run quantized layers by dequantizing to the activation dtype instead "
                                            "of kiln's block kernels, and dense layers on torch's GEMM instead of "
                                            "kiln's dense decode kernel (env KILN_QUANT_KERNELS=0)",
                                      flag="--no-quant-kernels", negate=True)
    prefill_attention: str | None = _opt(None, "prefill attention: native (kiln's paged flash kernel) or sdpa "
                                               "(gather + torch SDPA) (env KILN_PREFILL_ATTENTION)",
                                         choices=PREFILL_ATTENTION_CHOICES)
    auto_tune: bool | None = _opt(None, "do not time this CPU's kernel crossovers at the first start without a "
                                        "`kiln tune` file (kiln then uses built-in crossovers measured elsewhere; "
                                        "env KILN_NO_AUTO_TUNE=1)", flag="--no-auto-tune", negate=True)
    packed_gemm: bool | None = _opt(None, "keep bf16 dense copies as plain tensors for torch's GEMM instead of "
                                          "pre-packing them for oneDNN's (env KILN_PACKED_GEMM=0)",
                                    flag="--no-packed-gemm", negate=True)

    # ---- CLI ----------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
        """Add one flag per field (`--max-num-seqs` for `max_num_seqs`; `--no-X` for on-by-default switches)."""
        group = parser.add_argument_group("engine")
        for f in fields(cls):
            cli = f.metadata["cli"]
            flag = cli["flag"] or "--" + f.name.replace("_", "-")
            if cli["negate"]:
                # False when given; otherwise the field default (None for kernel switches: the environment).
                group.add_argument(flag, dest=f.name, action="store_const", const=False, default=f.default,
                                   help=cli["help"])
                continue
            if cli.get("switch"):
                group.add_argument(flag, dest=f.name, action="store_true", default=f.default, help=cli["help"])
                continue
            kwargs: dict[str, Any] = {"dest": f.name, "default": f.default, "help": cli["help"]}
            if cli["type"] is not None:
                kwargs["type"] = cli["type"]
            if cli["choices"] is not None:
                kwargs["choices"] = cli["choices"]
            if cli.get("repeat"):
                kwargs["action"] = "append"
            group.add_argument(flag, **kwargs)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        return cls(**{f.name: getattr(args, f.name) for f in fields(cls)})

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> "EngineArgs":
        """`EngineArgs(**kwargs)` with an error that lists the options when one is unknown."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s) {', '.join(unknown)}; the options are: {', '.join(sorted(known))}")
        return cls(**kwargs)

    @classmethod
    def from_config_file(cls, path: str, args: argparse.Namespace | None = None) -> "EngineArgs":
        """Options from a JSON object of field names (what `kiln advise --apply` writes), with every flag
        in `args` that differs from its default on top: the command line wins over the file."""
        import json

        try:
            with open(path, encoding="utf-8") as f:
                loaded = json.load(f)
        except (OSError, ValueError) as exc:
            raise ValueError(f"--config {path}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"--config {path}: expected a JSON object of engine options, got {type(loaded).__name__}")
        if args is not None:
            loaded.update({f.name: getattr(args, f.name) for f in fields(cls)
                           if hasattr(args, f.name) and getattr(args, f.name) != f.default})
        try:
            return cls.from_kwargs(**loaded)
        except TypeError as exc:
            raise ValueError(f"--config {path}: {exc}") from None

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    # ---- the config ---------------------------------------------------------------------------
    def kernel_config(self) -> KernelConfig:
        """The environment's switches, with every switch this EngineArgs sets explicitly on top."""
        env = KernelConfig.from_env()
        return KernelConfig(
            native=env.native if self.native_kernels is None else self.native_kernels,
            fused_ops=env.fused_ops if self.fused_ops is None else self.fused_ops,
            fused_decode_step=env.fused_decode_step if self.fused_decode_step is None else self.fused_decode_step,
            quant_kernels=env.quant_kernels if self.quant_kernels is None else self.quant_kernels,
            prefill_attention=env.prefill_attention if self.prefill_attention is None else self.prefill_attention,
            auto_tune=env.auto_tune if self.auto_tune is None else self.auto_tune,
            packed_gemm=env.packed_gemm if self.packed_gemm is None else self.packed_gemm,
        )

    def create_engine_config(self) -> EngineConfig:
        """Validate every option (ValueError with the reason) and freeze them into one EngineConfig."""
        from kiln.engine.kv_budget import parse_memory

        speculative = None
        if self.speculative_model is not None:
            speculative = SpeculativeConfig.from_name(
                self.speculative_model, self.num_speculative_tokens, self.ngram_min, self.ngram_max,
                self.speculative_disable_by_batch_size, self.speculative_adaptive)
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"num_scheduler_steps must be >= 1 (1 turns multi-step decode off); got {self.num_scheduler_steps}")
        if self.max_weight_memory is not None and self.tensor_parallel_size > 1:
            raise ValueError("--max-weight-memory streams layers within one process; it does not combine with "
                             "--tensor-parallel-size > 1 (each rank already holds only its share of the weights)")
        lora = self.lora_config()
        if lora is not None and self.tensor_parallel_size > 1:
            raise ValueError("LoRA adapters do not run under tensor parallel yet; use --tensor-parallel-size 1")
        return EngineConfig(
            model=ModelLoadConfig(self.model, self.dtype, self.device, self.quantized_weights,
                                  parse_memory(self.max_weight_memory, "--max-weight-memory"), self.offload_dir,
                                  self.offload_read_ahead, self.offload_drop_page_cache, self.huge_page_weights),
            cache=CacheConfig(block_size=self.block_size, kv_cache_memory=parse_memory(self.kv_cache_memory),
                              enable_prefix_caching=self.enable_prefix_caching, kv_cache_dtype=self.kv_cache_dtype),
            scheduler=SchedulerConfig(max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
                                      enable_chunked_prefill=self.enable_chunked_prefill,
                                      max_model_len=self.max_model_len,
                                      num_scheduler_steps=self.num_scheduler_steps),
            speculative=speculative,
            parallel=ParallelConfig(threads=self.threads, tensor_parallel_size=self.tensor_parallel_size,
                                    distributed_init=self.distributed_init),
            kernel=self.kernel_config(),
            lora=lora,
        )

    def lora_config(self) -> LoRAConfig | None:
        """The adapters to serve, or None when LoRA is off (no --lora and no --max-loras)."""
        from kiln.lora.request import parse_lora_spec

        specs = self.loras or []
        if isinstance(specs, (str, dict)):
            specs = list(specs.items()) if isinstance(specs, dict) else [specs]
        pairs = tuple(spec if isinstance(spec, tuple) else parse_lora_spec(spec) for spec in specs)
        if not pairs and self.max_loras is None:
            return None
        return LoRAConfig(self.max_loras if self.max_loras is not None else 4, self.max_lora_rank, pairs)
