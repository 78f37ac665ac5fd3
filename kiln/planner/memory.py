"""The memory budget: weights by tensor type, KV cache, activations and work buffers, a draft model, per rank.

Every figure is bytes, computed from shapes alone (no tensor is allocated), so a 70B model plans on a
laptop. Invariants: `total == weights + kv_cache + activations + draft`; under tensor parallelism each
rank holds 1/N of every split matrix (query/output heads, MLP, vocabulary-parallel embedding and head),
ceil(KV heads / N) KV heads (a rank never holds a fraction of a head, so TP above the KV head count
replicates them) and a full copy of the norms and the hidden-size activations.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from kiln.planner.arch import ArchSpec
from kiln.planner.formats import (
    DENSE_BYTES,
    GGUF_BLOCKS,
    WeightFormat,
    matrix_bytes,
    weight_format,
)

# value bytes and scale bytes per token and KV head (kiln.kernels.kv_quant's layout: fp32 scale per head)
_KV_BYTES = {"float32": (4, 0), "bfloat16": (2, 0), "float16": (2, 0), "int8": (1, 4), "fp8_e4m3": (1, 4)}
# kiln keeps these GGUF block types in their blocks and runs them natively (others are expanded at load)
NATIVE_BLOCK_TYPES = ("q4_0", "q4_1", "q8_0")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint on disk: its name (GGUF naming), storage type and size."""

    name: str
    type_name: str
    nbytes: int
    numel: int


@dataclass(frozen=True)
class ModelSource:
    """What is planned: the architecture, and for a GGUF file its real tensors (exact sizes)."""

    arch: ArchSpec
    origin: str  # "preset", "gguf", "hf", "config.json"
    tensors: tuple[TensorInfo, ...] = ()
    native_format: str = "bf16"  # the checkpoint's own type for `--weights file` when there are no tensors


@dataclass(frozen=True)
class PlanRequest:
    """The deployment being planned. `weights` is a formats.FORMATS key or "file" (a GGUF's own types)."""

    weights: str = "file"
    kv_cache_dtype: str = "auto"
    activation_dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on a CPU (kiln's choice without AMX)
    context: int | None = None  # None: the model's maximum
    concurrency: int = 1
    max_num_batched_tokens: int = 512
    block_size: int = 16
    tensor_parallel_size: int = 1
    device: str = "cpu"
    quantized_weights: str = "auto"  # kiln on the CPU: auto keeps a dense copy of block-quantized layers
    draft: str | None = None  # "ngram", "self:int4", "self:int8" or None (a draft model is planned by the caller)
    max_weight_memory: int | None = None  # `--max-weight-memory`: decoder layers beyond it stream from disk (CPU)

    def act_bytes(self) -> int:
        if self.activation_dtype == "auto":
            return 2 if self.device == "cuda" else 4
        return DENSE_BYTES[self.activation_dtype]


@dataclass
class Budget:
    """One rank's (or the whole model's) memory, in bytes, each part broken down."""

    weights: dict[str, int]
    kv_cache_bytes: int
    kv_per_token_bytes: int
    activations: dict[str, int]
    draft_bytes: int = 0
    notes: list[str] = field(default_factory=list)
    mapped_weight_bytes: int = 0  # decoder layers streamed from a file under --max-weight-memory (not in RAM)

    @property
    def weights_bytes(self) -> int:
        return sum(self.weights.values())

    @property
    def activations_bytes(self) -> int:
        return sum(self.activations.values())

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes + self.activations_bytes + self.draft_bytes

    def as_dict(self) -> dict[str, Any]:
        return {"weights_bytes": self.weights_bytes, "weights_by_type": dict(self.weights),
                "kv_cache_bytes": self.kv_cache_bytes, "kv_per_token_bytes": self.kv_per_token_bytes,
                "activations_bytes": self.activations_bytes, "activations_by_part": dict(self.activations),
                "draft_bytes": self.draft_bytes, "mapped_weight_bytes": self.mapped_weight_bytes,
                "total_bytes": self.total_bytes}


# ------------------------------------------------------------------------------------------ weights
def _kind(gguf_name: str) -> str:
    """embeddings / lm_head / attention / mlp / norms for a GGUF tensor name."""
    if gguf_name.startswith("token_embd"):
        return "embeddings"
    if gguf_name.startswith("output."):
        return "lm_head"
    part = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name
    if part.startswith("attn_") and not part.endswith("norm"):
        return "attention"
    if part.startswith("ffn_") and not part.endswith("norm"):
        return "mlp"
    return "norms"


def _layer_matrices(a: ArchSpec) -> list[tuple[str, str, int, int]]:
    """(kind, role, rows, cols) of one decoder layer's linear layers, cols = input dimension."""
    h, f = a.hidden_size, a.intermediate_size
    return [("attention", "q", a.q_size, h), ("attention", "k", a.kv_size, h), ("attention", "v", a.kv_size, h),
            ("attention", "o", h, a.q_size), ("mlp", "gate", f, h), ("mlp", "up", f, h), ("mlp", "down", h, f)]


def weights_for_format(a: ArchSpec, fmt: WeightFormat) -> dict[str, int]:
    """Bytes by tensor type of the whole model stored in `fmt` (norms and biases fp32, as GGUF keeps them)."""
    out = {"embeddings": matrix_bytes(fmt.embedding if not a.tie_word_embeddings else
                                      (fmt.head if fmt.embedding in GGUF_BLOCKS else fmt.embedding),
                                      a.vocab_size, a.hidden_size, fmt.group_size),
           "lm_head": 0 if a.tie_word_embeddings else matrix_bytes(fmt.head, a.vocab_size, a.hidden_size, fmt.group_size),
           "attention": 0, "mlp": 0}
    for kind, role, rows, cols in _layer_matrices(a):
        plain = matrix_bytes(fmt.matrix, rows, cols, fmt.group_size)
        if fmt.attn_v_down and role in ("v", "down"):
            promoted = matrix_bytes(fmt.attn_v_down, rows, cols, fmt.group_size)
            per_layer = fmt.promoted_share * promoted + (1 - fmt.promoted_share) * plain
        else:
            per_layer = plain
        out[kind] += int(per_layer * a.num_layers)
    bias = 4 * (a.q_size + 2 * a.kv_size) if a.attention_bias else 0
    qk_norm = 4 * 2 * a.head_dim if a.qk_norm else 0
    out["attention"] += (bias + qk_norm) * a.num_layers
    out["norms"] = 4 * a.hidden_size * (a.norms_per_layer * a.num_layers + 1)
    return out


def weights_from_tensors(tensors: tuple[TensorInfo, ...]) -> dict[str, int]:
    """Bytes by tensor type of a checkpoint's real tensors."""
    out = {"embeddings": 0, "lm_head": 0, "attention": 0, "mlp": 0, "norms": 0}
    for t in tensors:
        out[_kind(t.name)] += t.nbytes
    return out


def runtime_copies(source: ModelSource, req: PlanRequest, fmt_matrix: str) -> int:
    """What kiln holds beyond the checkpoint on the CPU: a dense embedding table when the embedding is
    quantized (lookups read rows in the activation dtype), and with quantized_weights=auto a dense copy of
    every natively run block-quantized linear (batched prefill runs the dense GEMM)."""
    a, act = source.arch, req.act_bytes()
    extra = 0
    emb_type = _embedding_type(source, req)
    if emb_type not in DENSE_BYTES:
        extra += a.vocab_size * a.hidden_size * act
    if req.max_weight_memory is not None and a.tie_word_embeddings and emb_type not in DENSE_BYTES:
        # under a weight budget the tied head's blocks serve lookups (kiln.offload.block_embedding), whatever
        # block type the head is kept in
        extra = 0
    if (req.device == "cpu" and req.quantized_weights == "auto" and req.max_weight_memory is None
            and fmt_matrix in NATIVE_BLOCK_TYPES):
        import torch

        from kiln.kernels.packed_linear import packing_available

        copy = _dense_copy_bytes(act)
        extra += sum(rows * cols for _, _, rows, cols in _layer_matrices(a)) * a.num_layers * copy
        copy_dtype = torch.bfloat16 if copy == 2 else torch.float32
        if act == 4 and a.tie_word_embeddings and emb_type not in DENSE_BYTES and packing_available("cpu", copy_dtype):
            # the tied head's copy of the fp32 table, packed for oneDNN (kiln.kernels.packed_linear); without
            # packing, or with a bf16 table, the head adopts the table itself
            extra += a.vocab_size * a.hidden_size * copy
    return extra


def _dense_copy_bytes(act: int) -> int:
    """Bytes per value of a block layer's resident dense copy: fp32 models keep it in bf16 where `kiln tune`
    found that faster (kiln.kernels.tune.copy_dtype)."""
    if act != 4:
        return act
    from kiln.planner.predict import dense_copy_path

    return 2 if dense_copy_path("float32") == "bfloat16" else 4



def _embedding_type(source: ModelSource, req: PlanRequest) -> str:
    if req.weights == "file":
        for t in source.tensors:
            if t.name.startswith("token_embd"):
                return t.type_name.lower()
        return source.native_format
    return weight_format(req.weights).embedding


def matrix_type(source: ModelSource, req: PlanRequest) -> str:
    """The type most linear layers are stored in under `req` (for kernel choice and labels)."""
    if req.weights != "file":
        return weight_format(req.weights).matrix
    counts: dict[str, int] = {}
    for t in source.tensors:
        if _kind(t.name) in ("attention", "mlp"):
            counts[t.type_name.lower()] = counts.get(t.type_name.lower(), 0) + t.numel
    return max(counts, key=counts.__getitem__) if counts else source.native_format


def model_weights(source: ModelSource, req: PlanRequest) -> dict[str, int]:
    """The whole model's weight bytes by tensor type, kiln's runtime copies included."""
    if req.weights == "file" and source.tensors:
        out = weights_from_tensors(source.tensors)
    else:
        fmt = weight_format(source.native_format if req.weights == "file" else req.weights)
        out = weights_for_format(source.arch, fmt)
    extra = runtime_copies(source, req, matrix_type(source, req))
    if extra:
        out["kiln runtime copies"] = extra
    return out


def apply_weight_budget(a: ArchSpec, weights: dict[str, int], budget: int) -> tuple[dict[str, int], int, str]:
    """Split `weights` as `--max-weight-memory budget` does (kiln.offload.weight_offload): everything but the
    decoder layers' matrices stays resident, then whole layers while the budget lasts; the rest is mapped.
    Returns (resident weights by type, mapped bytes, a note). ValueError when the fixed part alone exceeds it."""
    layer_kinds = ("attention", "mlp")
    # the RoPE cos/sin tables (fp32, [context, head_dim / 2] each; Gemma 3 has a local and a global pair) stay
    # resident too; the engine counts them in the budget, so the plan does here
    weights = {**weights, "rope tables": a.max_context * a.head_dim * 4 * (2 if a.sliding_layers else 1)}
    per_layer = sum(weights.get(k, 0) for k in layer_kinds) / max(a.num_layers, 1)
    fixed = sum(v for k, v in weights.items() if k not in layer_kinds)
    if fixed > budget:
        raise ValueError(f"--max-weight-memory {budget / 2**20:.1f} MiB is below the {fixed / 2**20:.1f} MiB that must "
                         "stay resident (embeddings, LM head, norms, RoPE tables)")
    resident_layers = min(a.num_layers, int((budget - fixed) // per_layer)) if per_layer else a.num_layers
    share = resident_layers / max(a.num_layers, 1)
    out = {k: (int(v * share) if k in layer_kinds else v) for k, v in weights.items()}
    mapped = sum(weights.get(k, 0) for k in layer_kinds) - sum(out.get(k, 0) for k in layer_kinds)
    note = (f"--max-weight-memory: {a.num_layers - resident_layers} of {a.num_layers} decoder layers "
            f"({mapped / 2**20:.1f} MiB) stay in a memory-mapped file and stream from disk every step; "
            "decode then runs the per-layer path (the fused step is off) and reads those bytes each step")
    return out, mapped, note


def shard_weights(a: ArchSpec, whole: dict[str, int], tp: int) -> dict[str, int]:
    """One rank's share of `whole` under tensor parallelism `tp` (see the module invariants)."""
    if tp == 1:
        return dict(whole)
    kv_share = math.ceil(a.num_kv_heads / tp) / a.num_kv_heads
    q_o = 2 * a.q_size * a.hidden_size
    k_v = 2 * a.kv_size * a.hidden_size
    attn_rank = whole["attention"] * (q_o / tp + k_v * kv_share) / (q_o + k_v)  # split by the bytes' shapes
    out = {k: (v if k == "norms" else v // tp) for k, v in whole.items()}
    out["attention"] = int(attn_rank)
    return out


# ------------------------------------------------------------------------------------------ KV cache
def kv_value_bytes(kv_cache_dtype: str, act_bytes: int, device: str) -> tuple[int, int]:
    """(bytes per K/V value, scale bytes per token and head). auto: the activation dtype, or fp16 under an
    fp32 model on the CPU (what kiln and llama.cpp store by default)."""
    if kv_cache_dtype == "auto":
        return (2, 0) if act_bytes == 4 and device == "cpu" else (act_bytes, 0)
    if kv_cache_dtype not in _KV_BYTES:
        raise ValueError(f"--kv-dtype must be one of auto, {', '.join(_KV_BYTES)}; got {kv_cache_dtype!r}")
    return _KV_BYTES[kv_cache_dtype]


def kv_cache(a: ArchSpec, req: PlanRequest, context: int, kv_heads: int | None = None) -> tuple[int, int]:
    """(bytes at `context` x concurrency, bytes per token while every window still grows).

    GQA-correct: only KV heads are cached. A sliding-window layer holds at most its window (rounded up to
    whole blocks, as a paged cache allocates); a full-attention layer holds the whole context."""
    heads = a.num_kv_heads if kv_heads is None else kv_heads
    value, scale = kv_value_bytes(req.kv_cache_dtype, req.act_bytes(), req.device)
    per_layer_token = 2 * heads * (a.head_dim * value + scale)
    bs = req.block_size
    total = 0
    for window in a.layer_windows:
        tokens = context if window is None else min(context, window)
        total += per_layer_token * math.ceil(tokens / bs) * bs
    return total * req.concurrency, per_layer_token * a.num_layers


def seed_kv_formula(a: ArchSpec, context: int, bytes_per_value: int = 2, concurrency: int = 1) -> int:
    """The seed documents' KV formula: 2 x layers x hidden size x tokens x bytes. It caches every attention
    head (no GQA) and every token in every layer (no sliding windows): an upper bound, wrong for GQA."""
    return 2 * a.num_layers * a.hidden_size * context * bytes_per_value * concurrency


# ------------------------------------------------------------------------------------------ activations
def activations(a: ArchSpec, req: PlanRequest, tp: int = 1) -> dict[str, int]:
    """Live tensors at the peak of one forward of `max_num_batched_tokens` tokens, and the logits.

    Per layer the residual, the normed input and the block output are live (hidden-size, replicated
    under TP); on top either the attention's q/k/v and output or the MLP's gate/up and activation,
    whichever is larger (they are never live together). Attention scores are not counted: kiln's paged
    flash kernel (and cuDNN's) tiles them. Logits are fp32, one row per sequence that samples (at most
    the concurrency), twice (probabilities for sampling)."""
    t, act = req.max_num_batched_tokens, req.act_bytes()
    hidden = 3 * t * a.hidden_size * act
    attn = t * (2 * a.q_size + 2 * math.ceil(a.num_kv_heads / tp) * a.head_dim) * act // (max(1, tp))
    mlp = t * 3 * a.intermediate_size * act // tp
    rows = min(t, req.concurrency)
    return {"hidden states": hidden, "attention or MLP work": max(attn, mlp), "logits + sampling": 2 * rows * a.vocab_size * 4}


# ------------------------------------------------------------------------------------------ the plan
@dataclass
class MemoryPlan:
    """The budget of one deployment: whole model, per rank, and the draft model's share."""

    source: ModelSource
    request: PlanRequest
    context: int
    whole: Budget
    per_rank: Budget
    seed_kv_bytes: int

    def as_dict(self) -> dict[str, Any]:
        d = {"model": self.source.arch.name, "origin": self.source.origin, "context": self.context,
             "request": asdict(self.request), **self.whole.as_dict(),
             "seed_formula_kv_cache_bytes": self.seed_kv_bytes, "notes": list(self.whole.notes)}
        d["per_rank"] = {"tensor_parallel_size": self.request.tensor_parallel_size, **self.per_rank.as_dict()}
        return d


def draft_budget(source: ModelSource, req: PlanRequest, context: int) -> tuple[int, str | None]:
    """A self-draft's bytes (its own weights and KV cache, same context and concurrency) and a note."""
    if req.draft in (None, "ngram"):
        return 0, ("n-gram drafts (prompt lookup) hold no model" if req.draft == "ngram" else None)
    if req.draft in ("self:int4", "self:int8"):
        fmt = weight_format(req.draft.split(":")[1])
        w = sum(weights_for_format(source.arch, fmt).values())
        kv, _ = kv_cache(source.arch, req, context)
        return w + kv, f"draft {req.draft}: a {fmt.name} copy of the model plus its own KV cache"
    raise ValueError(f"--draft must be ngram, self:int4, self:int8 or a model (planned separately); got {req.draft!r}")


def plan_memory(source: ModelSource, req: PlanRequest, draft_bytes: int = 0) -> MemoryPlan:
    """The budget of `req` for `source`; `draft_bytes` adds a separately planned draft model."""
    a = source.arch
    if req.concurrency < 1 or req.tensor_parallel_size < 1 or req.max_num_batched_tokens < 1:
        raise ValueError("concurrency, tensor parallel size and max_num_batched_tokens must be >= 1")
    context = req.context or a.max_context
    own_draft, draft_note = draft_budget(source, req, context)
    draft_total = own_draft + draft_bytes
    weights = model_weights(source, req)
    mapped, budget_note = 0, None
    if req.max_weight_memory is not None:
        if req.tensor_parallel_size > 1 or req.device != "cpu":
            raise ValueError("--max-weight-memory is planned for one CPU process (no tensor parallel, no CUDA)")
        weights, mapped, budget_note = apply_weight_budget(a, weights, req.max_weight_memory)
    kv, per_token = kv_cache(a, req, context)
    whole = Budget(weights, kv, per_token, activations(a, req), draft_total, mapped_weight_bytes=mapped)
    tp = req.tensor_parallel_size
    heads_rank = math.ceil(a.num_kv_heads / tp)
    kv_rank, per_token_rank = kv_cache(a, req, context, heads_rank)
    per_rank = Budget(shard_weights(a, weights, tp), kv_rank, per_token_rank, activations(a, req, tp),
                      math.ceil(draft_total / tp), mapped_weight_bytes=mapped)  # mapped: TP 1 only
    if draft_note:
        whole.notes.append(draft_note)
    if budget_note:
        whole.notes.append(budget_note)
    if a.sliding_layers:
        whole.notes.append(f"{a.sliding_layers} of {a.num_layers} layers slide over {max(w for w in a.layer_windows if w)} "
                           f"tokens: their KV cache is capped there")
    if tp > a.num_kv_heads:
        whole.notes.append(f"TP {tp} > {a.num_kv_heads} KV heads: each rank replicates a KV head")
    if "kiln runtime copies" in weights:
        whole.notes.append("kiln runtime copies: a dense embedding table for a quantized embedding and, with "
                           "--quantized-weights auto on the CPU, dense copies of block-quantized layers for "
                           "batched prefill (--quantized-weights native drops the latter)")
    seed = seed_kv_formula(a, context, 2, req.concurrency)
    return MemoryPlan(source, replace(req, context=context), context, whole, per_rank, seed)
