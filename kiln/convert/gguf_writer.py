"""Write a model kiln has loaded as a GGUF file llama.cpp runs (`kiln convert --to gguf`).

What is written (all through the `gguf` library's writer and quantizers):

- metadata for llama.cpp's `llama` architecture (Llama, SmolLM2, Mistral) or `qwen2`: sizes, head
  counts, RoPE base / dimension / linear scaling, RMSNorm epsilon, vocabulary size, file type;
  Llama-3.1 RoPE scaling travels as a `rope_freqs.weight` tensor, as llama.cpp expects;
- the tokenizer: from a GGUF source every `tokenizer.*` key (vocabulary, merges, special ids,
  chat templates...) and the descriptive `general.*` keys are copied as they are; from a Hugging
  Face folder a `gpt2` (byte-level BPE) tokenizer is built from what kiln loaded out of
  tokenizer.json / tokenizer_config.json (see `write_hf_tokenizer`);
- every 2-D weight in the requested type (F16, Q8_0, Q4_0 or Q4_1), token embedding included, like
  llama.cpp's own converter with `--outtype`; a matrix whose rows are not a whole number of 32-blocks
  falls back to F16. One exception, after llama-quantize's Q4 mixes: for q4_0/q4_1 the output
  projection (`output.weight`, or `token_embd.weight` when the embeddings are tied, since it is then
  the output head too) is written as Q8_0, the type llama-quantize falls back to from its Q6_K when
  rows are not a multiple of 256. `pure=True` (`--pure`, as in llama-quantize) writes every 2-D weight
  in the requested type instead. With this rule, converting the default SmolLM2 Q4_1 GGUF to q4_1
  reproduces its tensors byte for byte;
- K-quant files (q4_k_m, q5_k_m, q6_k): llama-quantize's mixed-type recipe (kquant_recipe.py says which
  tensor gets which type, and the fallbacks for rows that are not whole 256-value super-blocks), the
  K-quant blocks written by kquant_quantize.py (the `gguf` library has no K-quant quantizers), the rest
  (Q5_0 / Q5_1 / Q8_0 fallbacks) by the `gguf` library;
- 1-D tensors (norms, Qwen2's q/k/v biases) in F32; no `output.weight` when the embeddings are tied;
- Q and K rows of the `llama` architecture permuted into llama.cpp's interleaved-RoPE order (the
  inverse of what kiln's GGUF loader undoes); `qwen2` uses NeoX RoPE and keeps the HF order.

Weights are taken as kiln computes with them: a kiln-quantized folder (INT8/INT4/FP8/W8A8) is
dequantized first (smoothing undone), so converting it to q4_0 re-quantizes its dequantized weights.
The file is written next to the target under a temporary name and renamed when complete, so a failed
conversion never leaves a truncated GGUF (nor clobbers the file `--force` would replace).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kiln.convert.kquant_recipe import KQUANT_TYPES, kquant_type
from kiln.layers.linear import Linear
from kiln.loader.gguf_loader import _qk_heads
from kiln.models.llama_checkpoint import GGUF_GLOBAL_NAMES as _GLOBAL_NAMES, GGUF_LAYER_NAMES as _LAYER_NAMES

if TYPE_CHECKING:
    from kiln.loader.model_loader import LoadedModel
    from kiln.loader.tokenizer import Tokenizer

TYPES = ("f16", "q8_0", "q4_0", "q4_1", *KQUANT_TYPES)
# kiln architecture → llama.cpp architecture
GGUF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
_HF_TO_GGUF_LAYER = {hf: gg for gg, hf in _LAYER_NAMES.items()}
_HF_TO_GGUF_GLOBAL = {hf: gg for gg, hf in _GLOBAL_NAMES.items()}
# general.* keys the writer sets itself (the rest are copied from a GGUF source)
_MANAGED_GENERAL = {"general.architecture", "general.name", "general.file_type", "general.quantization_version",
                    "general.alignment"}
# llama.cpp token types
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


# ----------------------------------------------------------------------------- tensors

def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """kiln's rotate-half row order → llama.cpp's interleaved one (inverse of gguf_loader.unpermute_qk)."""
    shape = w.shape
    return w.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_name(hf_name: str) -> str:
    """`model.layers.3.self_attn.q_proj.weight` → `blk.3.attn_q.weight`."""
    module, _, param = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        _, _, idx, sub = module.split(".", 3)
        return f"blk.{idx}.{_HF_TO_GGUF_LAYER[sub]}.{param}"
    return f"{_HF_TO_GGUF_GLOBAL[module]}.{param}"


def effective_weight(layer: Linear) -> torch.Tensor:
    """The fp32 [out, in] matrix a Linear multiplies by, whatever method holds it."""
    method = layer.method
    if hasattr(method, "dequantized_weight"):  # kiln-quantized checkpoints
        w = method.dequantized_weight(layer, torch.float32)
        if getattr(method, "smooth", False):  # weight-only INT with AWQ smoothing stores W·diag(smooth)
            w = w / layer.smooth.float()
        return w
    if isinstance(getattr(layer, "weight", None), torch.Tensor):
        return layer.weight.data.float()
    if hasattr(layer, "qs"):  # GGUF Q4/Q8 blocks kept for the native kernels
        from kiln.kernels.quant_matmul import dequantize

        return dequantize(layer.qs, layer.d, layer.m, method.is_q4, torch.float32)
    raise ValueError(f"cannot read the weights of a layer using {getattr(method, 'name', method)!r}; "
                     "load the model with quantized_weights='dequantize'")


def hf_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor under its Hugging Face name, fp32 on CPU, fused layers split into their shards."""
    unpacked = {(fused, shard): leaf for leaf, (fused, shard) in model.packed_modules.items()}
    out: dict[str, torch.Tensor] = {}
    linear_paths = set()
    for path, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        linear_paths.add(path)
        if path == "quantized_tied_head":  # a second view of the tied embedding, not a tensor of its own
            continue
        weight = effective_weight(module).cpu()
        prefix = "lm_head" if path == "lm_head" else f"model.{path}"
        parent, _, leaf = prefix.rpartition(".")
        for shard in module.shard_names:
            name = prefix if shard is None else f"{parent}.{unpacked[(leaf, shard)]}"
            rows = module.shard_slice(shard)
            out[f"{name}.weight"] = weight[rows]
            if module.bias is not None:
                out[f"{name}.bias"] = module.bias.data[rows].float().cpu()
    for name, param in model.named_parameters():
        if name.rpartition(".")[0] not in linear_paths:
            out[f"model.{name}"] = param.data.float().cpu()
    return out


def storage_type(shape: tuple[int, ...], qtype: str, output_head: bool = False, pure: bool = False) -> Any:
    """The GGML type a tensor of `shape` is written in for `--type qtype` (see the module docstring):
    1-D → F32; rows not a multiple of 32, or `f16` → F16; the output head of a Q4 type → Q8_0 unless
    `pure`; otherwise `qtype`."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1:
        return Q.F32
    if qtype == "f16" or shape[-1] % 32:
        return Q.F16
    if output_head and qtype.startswith("q4") and not pure:
        return Q.Q8_0
    return Q[qtype.upper()]


def is_output_head(gguf_tensor_name: str, tied: bool) -> bool:
    """Whether a tensor is the matrix that projects to the vocabulary (tied: the token embedding)."""
    return gguf_tensor_name == ("token_embd.weight" if tied else "output.weight")


def llama3_freq_factors(cfg: Any) -> np.ndarray | None:
    """Llama 3.1 RoPE scaling as llama.cpp's `rope_freqs` tensor (unscaled / scaled frequency)."""
    if cfg.rope_scaling is None or cfg.rope_scaling.rope_type != "llama3":
        return None
    from kiln.layers.rotary import _inv_freq

    plain = _inv_freq(cfg.head_dim, cfg.rope_theta, None)
    scaled = _inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    return (plain / scaled).numpy().astype(np.float32)


# ----------------------------------------------------------------------------- tokenizer

def _copy_gguf_metadata(writer: Any, source: Path) -> None:
    """Every tokenizer.* key and the descriptive general.* keys of a GGUF source, values and types as they are."""
    source = Path(source).resolve()
    stat = source.stat()
    for key, value, vtype, sub in _gguf_metadata(str(source), stat.st_mtime_ns, stat.st_size):
        writer.add_key_value(key, value, vtype, sub)


@functools.lru_cache(maxsize=2)
def _gguf_metadata(path: str, mtime_ns: int, size: int) -> tuple[tuple[str, Any, Any, Any], ...]:
    """(key, value, type, array item type) of the keys `_copy_gguf_metadata` copies; parsed once per file
    version (the gguf library's reader takes seconds on a 50k-token vocabulary) when one source is
    converted to several types."""
    from gguf import GGUFValueType

    from kiln.loader.gguf_loader import open_gguf

    reader = open_gguf(Path(path))
    out = []
    for key, field in reader.fields.items():
        if not (key.startswith("tokenizer.") or (key.startswith("general.") and key not in _MANAGED_GENERAL)):
            continue
        vtype = GGUFValueType(field.types[0])
        sub = GGUFValueType(field.types[-1]) if vtype == GGUFValueType.ARRAY else None
        if sub == GGUFValueType.ARRAY:
            raise ValueError(f"{path}: nested array metadata {key!r} cannot be copied")
        out.append((key, field.contents(), vtype, sub))
    return tuple(out)


def gguf_pre_tokenizer(pre: dict | None) -> str:
    """llama.cpp's `tokenizer.ggml.pre` name for a tokenizer.json `pre_tokenizer`, or ValueError.

    Only splits kiln knows llama.cpp reproduces are named: GPT-2's regex ('gpt2'), one piece per
    digit then GPT-2's regex ('smollm'), and the Llama 3 / Qwen2 regexes ('llama-bpe' / 'qwen2').
    """
    from kiln.loader.tokenizer import _PRE_SPLITS

    parts = (pre.get("pretokenizers") or []) if pre and pre.get("type") == "Sequence" else ([pre] if pre else [])
    kinds = [p.get("type") for p in parts]
    byte_level = parts[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        regex = byte_level.get("use_regex", True)
        if kinds == ["ByteLevel"] and regex:
            return "gpt2"
        if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and regex:
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not regex and not parts[0].get("invert", False) \
                and str(parts[0].get("behavior", "")).lower() == "isolated":
            pattern = (parts[0].get("pattern") or {}).get("Regex")
            for name in ("llama-bpe", "qwen2"):
                if pattern == _PRE_SPLITS[name]:
                    return name
    raise ValueError(f"tokenizer.json pre-tokenizer {json.dumps(pre)[:300]} has no llama.cpp equivalent kiln knows "
                     "(supported: GPT-2 byte-level, SmolLM digits + byte-level, Llama 3 and Qwen2 splits); "
                     "convert from a GGUF of this model instead")


def write_hf_tokenizer(writer: Any, tokenizer: "Tokenizer", vocab_size: int) -> None:
    """`tokenizer.ggml.*` metadata for a byte-level BPE tokenizer kiln loaded from tokenizer.json.

    Tokens by id (ids the vocabulary skips, up to the model's `vocab_size`, become `[PAD<id>]`
    of type UNUSED, as llama.cpp's converter does); token types: special added tokens and the
    named bos/eos/pad → CONTROL, other added tokens → USER_DEFINED, the rest NORMAL; merges;
    the pre-tokenizer name (`gguf_pre_tokenizer`); bos/eos/pad/unk ids; whether BOS/EOS are
    added (what kiln's encode does); the chat template.
    """
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not tokenizer.byte_level:
        raise ValueError("only byte-level BPE tokenizers (GPT-2 style tokenizer.json) can be written from a folder; "
                         "SentencePiece-style vocabularies (Llama 2, Mistral) need their GGUF: "
                         "convert from that instead")
    pre = gguf_pre_tokenizer(data.get("pre_tokenizer"))
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    size = max(vocab_size, max(vocab.values()) + 1)
    if size > vocab_size:
        raise ValueError(f"the tokenizer has ids up to {size - 1} but the model's vocabulary is {vocab_size}")
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [_UNUSED] * size
    special = set(tokenizer.all_special_ids)
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = _CONTROL if i in special else _USER_DEFINED if i in tokenizer.added_token_ids else _NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    plain = tokenizer.backend.encode("a", add_special_tokens=False).ids
    full = tokenizer.backend.encode("a", add_special_tokens=True).ids
    add_eos = tokenizer.eos_token_id is not None and len(full) > len(plain) and full[-1] == tokenizer.eos_token_id
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    if tokenizer.bos_token_id is not None:
        writer.add_bos_token_id(tokenizer.bos_token_id)
    if tokenizer.eos_token_id is not None:
        writer.add_eos_token_id(tokenizer.eos_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        writer.add_unk_token_id(vocab[unk])
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(add_eos)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


# ----------------------------------------------------------------------------- the file

def check_output(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise ValueError(f"{out} exists; pass --force to overwrite it")
    if out.exists() and not out.is_file():
        raise ValueError(f"{out} exists and is not a file")
    if not out.parent.is_dir():
        raise ValueError(f"folder {out.parent} does not exist")


def convert_to_gguf(loaded: "LoadedModel", out_path: Path | str, qtype: str, progress: bool = True,
                    force: bool = False, pure: bool = False) -> Path:
    """Write `loaded` (a kiln LoadedModel) as a GGUF file llama.cpp loads; returns the path.

    `qtype` ('f16', 'q8_0', 'q4_0', 'q4_1') is the storage type of the 2-D weights, token
    embedding included (rows not a multiple of 32 long: F16; for q4_0/q4_1 the output head is Q8_0
    unless `pure`); norms and biases stay F32. 'q4_k_m', 'q5_k_m' and 'q6_k' follow llama-quantize's
    mixed-type recipe (kquant_recipe.kquant_type; `pure`: the base K type everywhere it fits). The metadata, tokenizer and Q/K row order written
    are described in this module's docstring. Raises ValueError for an unknown type, an unsupported
    architecture or tokenizer, or when `out_path` exists and `force` is False (the existing file is
    then left untouched).
    """
    from gguf import GGMLQuantizationType as Q
    from gguf import GGUFWriter, LlamaFileType, RopeScalingType
    from gguf.quants import quantize
    from tqdm import tqdm

    from kiln.convert.kquant_quantize import BLOCK_BYTES, quantize_kquant

    if qtype not in TYPES:
        raise ValueError(f"--type must be one of {', '.join(TYPES)}, got {qtype!r}")
    cfg = loaded.config
    if cfg.architecture not in GGUF_ARCHITECTURES:
        raise ValueError(f"cannot write architecture {cfg.architecture!r} as GGUF "
                         f"(supported: {', '.join(GGUF_ARCHITECTURES)})")
    out = Path(out_path)
    check_output(out, force)
    arch = GGUF_ARCHITECTURES[cfg.architecture]
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    writer = GGUFWriter(str(tmp), arch)
    try:
        writer.add_name(cfg.name or "kiln-converted")
        writer.add_context_length(cfg.max_position_embeddings)
        writer.add_embedding_length(cfg.hidden_size)
        writer.add_block_count(cfg.num_hidden_layers)
        writer.add_feed_forward_length(cfg.intermediate_size)
        writer.add_head_count(cfg.num_attention_heads)
        writer.add_head_count_kv(cfg.num_key_value_heads)
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_dimension_count(cfg.head_dim)
        writer.add_rope_freq_base(cfg.rope_theta)
        writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
        writer.add_vocab_size(cfg.vocab_size)
        writer.add_file_type({"f16": LlamaFileType.MOSTLY_F16, "q8_0": LlamaFileType.MOSTLY_Q8_0,
                              "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
                              "q4_k_m": LlamaFileType.MOSTLY_Q4_K_M, "q5_k_m": LlamaFileType.MOSTLY_Q5_K_M,
                              "q6_k": LlamaFileType.MOSTLY_Q6_K}[qtype])
        if qtype != "f16":
            writer.add_quantization_version(2)
        if cfg.rope_scaling is not None and cfg.rope_scaling.rope_type == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope_scaling.factor)
        if loaded.file_format == "gguf":
            _copy_gguf_metadata(writer, Path(loaded.source))
        else:
            write_hf_tokenizer(writer, loaded.tokenizer, cfg.vocab_size)

        factors = cfg.extra.get("rope_freq_factors")
        factors = np.asarray(factors, dtype=np.float32) if factors is not None else llama3_freq_factors(cfg)
        if factors is not None:
            writer.add_tensor("rope_freqs.weight", factors)
        tensors = hf_tensors(loaded.model)
        for hf_name, tensor in tqdm(tensors.items(), desc=f"convert to {qtype}", unit="tensor", disable=not progress):
            name = gguf_name(hf_name)
            data = np.ascontiguousarray(tensor.numpy(), dtype=np.float32)
            heads = _qk_heads(name, cfg)
            if heads is not None:
                data = np.ascontiguousarray(permute_qk(data, heads))
            head = is_output_head(name, cfg.tie_word_embeddings)
            ggml = (kquant_type(name, data.shape, qtype, cfg.num_hidden_layers, head, pure)
                    if qtype in KQUANT_TYPES else storage_type(data.shape, qtype, head, pure))
            if ggml == Q.F32:
                writer.add_tensor(name, data)
            elif ggml == Q.F16:
                writer.add_tensor(name, data.astype(np.float16))
            elif ggml.name in BLOCK_BYTES:
                writer.add_tensor(name, quantize_kquant(data, ggml.name), raw_dtype=ggml)
            else:
                writer.add_tensor(name, quantize(data, ggml), raw_dtype=ggml)
        del tensors
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=progress)
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return out
