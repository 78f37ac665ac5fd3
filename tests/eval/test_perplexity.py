"""Perplexity / KL with llama.cpp's chunking: the windows, the scored half, the error, the CLI."""

from __future__ import annotations

import copy
import math
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from kiln.entrypoints.cli import main as kiln_main
from kiln.eval.forward import window_logits
from kiln.eval.perplexity import kl_divergence, llama_cpp_windows, perplexity
from kiln.loader.model_loader import load_model

from loader.tiny_model import build_tiny_models, one_torch_thread

WORDS = "the of and a to in is was that for on with as by at from his her it an be this which or had not".split()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory: pytest.TempPathFactory):
    return load_model(build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models").hf["tied"], dtype="float32")


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(1)
    return " ".join(rng.choice(WORDS) for _ in range(400))


def test_windows_follow_llama_cpp() -> None:
    ids = list(range(100, 1100))  # 1000 tokens, ctx 256 → 3 windows, the 232-token tail dropped
    w = llama_cpp_windows(ids, 256, bos_token_id=None)
    assert len(w) == 3 and w[1] == ids[256:512]
    w = llama_cpp_windows(ids, 256, bos_token_id=1, max_chunks=2)
    assert len(w) == 2 and w[1][0] == 1 and w[1][1:] == ids[257:512]
    with pytest.raises(ValueError, match="fewer than one window"):
        llama_cpp_windows(ids[:10], 256, None)


def test_perplexity_scores_only_the_second_half(tiny_loaded, text: str) -> None:
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    ctx = 64
    ids = tok.encode(text, add_special_tokens=True)
    bos = tok.bos_token_id if tok.add_bos_token else None
    r = perplexity(model, tok, text, ctx=ctx)
    # Independent computation: for every window, cross-entropy of positions 32..62 predicting 33..63.
    total, count = 0.0, 0
    for c in range(len(ids) // ctx):
        window = ids[c * ctx:(c + 1) * ctx]
        if bos is not None:
            window[0] = bos
        logits = window_logits(model, window)
        total += F.cross_entropy(logits[ctx // 2:ctx - 1], torch.tensor(window[ctx // 2 + 1:]), reduction="sum").item()
        count += ctx - 1 - ctx // 2
    assert r.n_tokens_scored == count and r.n_chunks == len(ids) // ctx
    assert r.ppl == pytest.approx(math.exp(total / count), rel=1e-6)
    all_positions = perplexity(model, tok, text, ctx=ctx, max_chunks=1)
    assert all_positions.n_tokens_scored == 31 and all_positions.stderr > 0


def test_kl_against_itself_is_zero_and_against_a_perturbed_model_matches_torch(tiny_loaded, text: str) -> None:
    model, tok = tiny_loaded.model, tiny_loaded.tokenizer
    same = kl_divergence(model, model, tok, text, ctx=64, max_chunks=2)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-7) and same.top1_agreement == 1.0 and same.mean_abs_dp == 0.0
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layers[0].mlp.down_proj.weight.add_(torch.randn_like(other.layers[0].mlp.down_proj.weight) * 0.2)
    r = kl_divergence(other, model, tok, text, ctx=64, max_chunks=2)
    assert r.kl_mean > 1e-4
    ids = tok.encode(text, add_special_tokens=True)[:64]
    if tok.add_bos_token:
        ids[0] = tok.bos_token_id
    ref = torch.log_softmax(window_logits(model, ids)[32:63], -1)
    q = torch.log_softmax(window_logits(other, ids)[32:63], -1)
    direct = F.kl_div(q, ref, log_target=True, reduction="none").sum(-1)  # KL(ref ‖ other)
    first = kl_divergence(other, model, tok, text, ctx=64, max_chunks=1)
    assert first.kl_mean == pytest.approx(direct.mean().item(), rel=1e-5)


def test_cli_missing_text_is_one_line(tiny_loaded, tmp_path: Path, capsys) -> None:
    code = kiln_main(["eval", "ppl", str(tiny_loaded.source), "--text", str(tmp_path / "missing.txt")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.txt not found" in err


@pytest.mark.real_model
def test_default_model_ppl_matches_llama_cpp(default_gguf_path: Path, shared_data: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    text = (shared_data / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")[:40000]
    loaded = load_model(default_gguf_path, dtype="float32", quantized_weights="dequantize")
    ours = perplexity(loaded.model, loaded.tokenizer, text, ctx=128, max_chunks=3)
    llm = llama_cpp.Llama(model_path=str(default_gguf_path), n_ctx=128, logits_all=True, n_threads=2, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)
    nll = []
    for w in llama_cpp_windows(ids, 128, None, 3):
        llm.reset()
        llm.eval(w)
        lp = torch.log_softmax(torch.tensor(llm.scores[:128], dtype=torch.float32)[64:127], -1)
        nll.append(-lp.gather(1, torch.tensor(w[65:])[:, None]).squeeze(1))
    theirs = math.exp(torch.cat(nll).mean().item())
    assert ours.ppl == pytest.approx(theirs, rel=0.01)
