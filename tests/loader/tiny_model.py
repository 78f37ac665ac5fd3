"""A tiny random Llama written as GGUF (llama.cpp layout, partly quantized) and as Hugging Face
folders (config.json + safetensors, single file or sharded), holding identical weights.

The GGUF tensors are quantized once; the safetensors hold exactly their dequantized values (in the
Hugging Face row order), so every loader must produce bit-identical parameters. The tokenizer is a
small hand-built byte-level BPE (GPT-2 byte alphabet + a few merges), written both as GGUF metadata
and as `tokenizer.json`: a 49k-entry vocabulary would make every GGUF parse take seconds.

Nothing here imports kiln: the files are written the way llama.cpp's converter and
`save_pretrained` write them, so the tests check kiln against the formats, not against itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize
from safetensors.torch import save_file

# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BOS_ID, EOS_ID = 1, 2
MERGES = [
    "Ġ t", "h e", "Ġt he", "a t", "Ġ c", "Ġc at", "Ġ s", "Ġs at", "o n", "Ġ on", "Ġ m", "Ġm at",
    "i n", "Ġ in", "e r", "Ġ h", "Ġh e", "l l", "e ll", "h ell", "hell o", "Ġ w", "o r", "Ġw or",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_alphabet() -> list[str]:
    """GPT-2's printable stand-in character for each byte value 0..255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def vocabulary() -> tuple[list[str], list[int]]:
    """Tokens and llama.cpp token types (3 = control, 1 = normal)."""
    tokens = [*SPECIAL_TOKENS, *byte_alphabet()]
    for merge in MERGES:
        joined = merge.replace(" ", "")
        if joined not in tokens:
            tokens.append(joined)
    return tokens, [3] * len(SPECIAL_TOKENS) + [1] * (len(tokens) - len(SPECIAL_TOKENS))


VOCAB_SIZE = len(vocabulary()[0])


def write_hf_tokenizer(folder: Path) -> None:
    """tokenizer.json + tokenizer_config.json equivalent to the GGUF tokenizer metadata (pre 'smollm')."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens, _ = vocabulary()
    backend = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in MERGES]))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": SPECIAL_TOKENS[BOS_ID],
        "eos_token": SPECIAL_TOKENS[EOS_ID], "pad_token": SPECIAL_TOKENS[EOS_ID], "chat_template": CHAT_TEMPLATE,
    }, indent=1))


# ----------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class TinySpec:
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2  # GQA
    head_dim: int = 16
    ffn: int = 128
    # Not kiln's defaults (10000 / 1e-6), so a loader that ignores the field is caught.
    rope_theta: float = 50000.0
    eps: float = 1e-5
    context: int = 256
    vocab: int = VOCAB_SIZE
    tied: bool = True


# Storage type of each tensor in the GGUF (llama.cpp suffix → type); the rest are F32.
TIED_TYPES = {"token_embd": Q.Q8_0, "attn_q": Q.F16, "attn_k": Q.F16, "attn_v": Q.F16, "attn_output": Q.F16,
              "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q8_0}
UNTIED_TYPES = {"token_embd": Q.F16, "attn_q": Q.Q4_0, "attn_k": Q.Q4_0, "attn_v": Q.Q4_1, "attn_output": Q.Q4_1,
                "ffn_gate": Q.Q8_0, "ffn_up": Q.Q8_0, "ffn_down": Q.Q5_1, "output": Q.BF16}

_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
          "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def gguf_to_hf_name(name: str) -> str:
    base, _, suffix = name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{suffix}"
    return f"{_GLOBAL[base]}.{suffix}"


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of Q/K rows (rotate-half → interleaved RoPE)."""
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _round_trip(w: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray]:
    """(raw GGUF data, the float32 values it holds)."""
    if qtype == Q.F32:
        return w, w
    if qtype == Q.F16:
        raw = w.astype(np.float16)
        return raw, raw.astype(np.float32)
    raw = quantize(w, qtype)
    return raw, dequantize(raw, qtype).astype(np.float32)


@dataclass
class TinyCheckpoint:
    """One set of weights: `gguf_raw` (llama.cpp names, GGUF layout) and `hf` (the same values, HF names)."""

    spec: TinySpec
    gguf_raw: dict[str, tuple[np.ndarray, Q]] = field(default_factory=dict)
    hf: dict[str, torch.Tensor] = field(default_factory=dict)

    def config_json(self) -> dict:
        s = self.spec
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": s.vocab,
            "hidden_size": s.hidden, "intermediate_size": s.ffn, "num_hidden_layers": s.layers,
            "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": s.head_dim,
            "hidden_act": "silu", "rms_norm_eps": s.eps, "rope_theta": s.rope_theta, "rope_scaling": None,
            "max_position_embeddings": s.context, "tie_word_embeddings": s.tied, "attention_bias": False,
            "mlp_bias": False, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "torch_dtype": "float32",
        }


def make_checkpoint(spec: TinySpec = TinySpec(), seed: int = 0) -> TinyCheckpoint:
    """Random weights (fixed seed), rounded through each tensor's GGUF storage type."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int, std: float = 1.0, mean: float = 0.0) -> np.ndarray:
        return (torch.randn(*shape, generator=gen) * std + mean).numpy().astype(np.float32)

    s = spec
    q_rows, kv_rows = s.heads * s.head_dim, s.kv_heads * s.head_dim
    # Q/K weights large enough for peaked attention: a wrong Q/K row order or RoPE changes the logits a lot
    # (see test_unpermuted_qk_gguf_is_detected), yet fp32 rounding stays well under the 1e-4 tolerance.
    shapes: dict[str, tuple[tuple[int, ...], float, float]] = {"token_embd.weight": ((s.vocab, s.hidden), 0.3, 0.0)}
    for i in range(s.layers):
        shapes |= {
            f"blk.{i}.attn_norm.weight": ((s.hidden,), 0.2, 1.0),
            f"blk.{i}.attn_q.weight": ((q_rows, s.hidden), 0.2, 0.0),
            f"blk.{i}.attn_k.weight": ((kv_rows, s.hidden), 0.2, 0.0),
            f"blk.{i}.attn_v.weight": ((kv_rows, s.hidden), 0.2, 0.0),
            f"blk.{i}.attn_output.weight": ((s.hidden, q_rows), 0.2, 0.0),
            f"blk.{i}.ffn_norm.weight": ((s.hidden,), 0.2, 1.0),
            f"blk.{i}.ffn_gate.weight": ((s.ffn, s.hidden), 0.2, 0.0),
            f"blk.{i}.ffn_up.weight": ((s.ffn, s.hidden), 0.2, 0.0),
            f"blk.{i}.ffn_down.weight": ((s.hidden, s.ffn), 0.1, 0.0),
        }
    shapes["output_norm.weight"] = ((s.hidden,), 0.2, 1.0)
    if not s.tied:
        shapes["output.weight"] = ((s.vocab, s.hidden), 0.3, 0.0)
    types = TIED_TYPES if s.tied else UNTIED_TYPES

    ckpt = TinyCheckpoint(spec)
    for name, (shape, std, mean) in shapes.items():
        w = randn(*shape, std=std, mean=mean)
        kind = name.rsplit(".", 1)[0].split(".")[-1]
        qtype = types.get(kind, Q.F32)
        _, held = _round_trip(w, qtype)  # HF layout
        n_head = {"attn_q": s.heads, "attn_k": s.kv_heads}.get(kind)
        raw, held_gguf = _round_trip(llama_cpp_permute(w, n_head) if n_head else w, qtype)
        # Quantization blocks lie within a row, so permuting rows commutes with it exactly.
        assert np.array_equal(held_gguf, llama_cpp_permute(held, n_head) if n_head else held), name
        ckpt.gguf_raw[name] = (raw, qtype)
        ckpt.hf[gguf_to_hf_name(name)] = torch.from_numpy(held.copy())
    return ckpt


# ----------------------------------------------------------------------------- writers

def write_gguf(
    ckpt: TinyCheckpoint,
    path: Path,
    *,
    arch: str = "llama",
    drop: tuple[str, ...] = (),
    replace_tensors: dict[str, np.ndarray] | None = None,
    unpermuted_qk: bool = False,
) -> Path:
    """Write `ckpt` as llama.cpp does. `drop`/`replace_tensors` (F32) build broken files;
    `unpermuted_qk` writes Q/K in HF row order (a converter bug the tests must notice)."""
    s = ckpt.spec
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("kiln-tiny-llama")
    w.add_block_count(s.layers)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_freq_base(s.rope_theta)
    w.add_layer_norm_rms_eps(s.eps)
    w.add_rope_dimension_count(s.head_dim)
    tokens, types = vocabulary()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(EOS_ID)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    replace_tensors = replace_tensors or {}
    for name, (raw, qtype) in ckpt.gguf_raw.items():
        if name in drop:
            continue
        if name in replace_tensors:
            w.add_tensor(name, np.ascontiguousarray(replace_tensors[name], dtype=np.float32))
            continue
        if unpermuted_qk and (".attn_q." in name or ".attn_k." in name):
            raw, _ = _round_trip(ckpt.hf[gguf_to_hf_name(name)].numpy(), qtype)
        w.add_tensor(name, raw, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_hf_folder(ckpt: TinyCheckpoint, folder: Path, *, shards: int = 1, config: dict | None = None) -> Path:
    """config.json + model.safetensors (or `shards` files + index, tensors dealt round-robin so fused
    q/k/v and gate/up come from different files) + tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or ckpt.config_json(), indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}))
    write_hf_tokenizer(folder)
    tensors = {k: v.contiguous() for k, v in sorted(ckpt.hf.items())}
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return folder
    files = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    parts: list[dict[str, torch.Tensor]] = [{} for _ in range(shards)]
    weight_map = {}
    for i, (name, t) in enumerate(tensors.items()):
        parts[i % shards][name] = t
        weight_map[name] = files[i % shards]
    for fname, part in zip(files, parts):
        save_file(part, str(folder / fname), metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return folder


@dataclass
class TinyModels:
    root: Path
    tied: TinyCheckpoint
    untied: TinyCheckpoint
    gguf: dict[str, Path]  # "tied" | "untied" | "tied_unpermuted"
    hf: dict[str, Path]  # "tied" | "tied_sharded" | "untied"


_BUILT: dict[Path, TinyModels] = {}


def build_tiny_models(root: Path) -> TinyModels:
    """Every tiny file the tests use, written once per `root` (cached for the session)."""
    root = Path(root)
    if root in _BUILT:
        return _BUILT[root]
    root.mkdir(parents=True, exist_ok=True)
    tied = make_checkpoint(TinySpec(tied=True), seed=0)
    untied = make_checkpoint(TinySpec(tied=False), seed=1)
    models = TinyModels(
        root, tied, untied,
        gguf={
            "tied": write_gguf(tied, root / "tiny-tied.gguf"),
            "untied": write_gguf(untied, root / "tiny-untied.gguf"),
            "tied_unpermuted": write_gguf(tied, root / "tiny-tied-unpermuted.gguf", unpermuted_qk=True),
        },
        hf={
            "tied": write_hf_folder(tied, root / "hf-tied"),
            "tied_sharded": write_hf_folder(tied, root / "hf-tied-sharded", shards=2),
            "untied": write_hf_folder(untied, root / "hf-untied"),
        },
    )
    _BUILT[root] = models
    return models


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Tiny matmuls are fastest on one thread, and far faster on one when other processes load the CPU
    (OpenMP workers then wait on each other at every op)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
