"""Perplexity / KL with llama.cpp's chunking: the windows, the scored half, BOS replacement, the
error formula, KL against torch, the CLI, and (real model) the PPL against llama.cpp's own."""

from __future__ import annotations

import copy
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer as Backend
from tokenizers import processors

from kiln.data import WIKITEXT2_TEST, data_path
from kiln.entrypoints.cli_eval import main as eval_main
from kiln.eval.forward import window_logits
from kiln.eval.kl_divergence import kl_divergence, kl_from_logits
from kiln.eval.perplexity import llama_cpp_windows, perplexity
from kiln.loader.model_loader import LoadedModel, load_model
from kiln.loader.tokenizer import Tokenizer

from loader.tiny_model import build_tiny_models, one_torch_thread

WORDS = "the of and a to in is was that for on with as by at from his her it an be this which or had not".split()
CTX = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(build_tiny_models(tmp_path_factory.getbasetemp() / "kiln-tiny-models").hf["tied"], dtype="float32")


@pytest.fixture(scope="module")
def text() -> str:
    rng = random.Random(1)
    return " ".join(rng.choice(WORDS) for _ in range(300))


def with_bos(tok: Tokenizer) -> Tokenizer:
    """The tiny tokenizer made to add BOS, as SentencePiece GGUFs (Llama 2, Mistral) do."""
    backend = Backend.from_str(tok.backend.to_str())
    backend.post_processor = processors.TemplateProcessing(single=f"{tok.bos_token} $A", special_tokens=[(tok.bos_token, tok.bos_token_id)])
    out = Tokenizer(backend, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    assert out.add_bos_token
    return out


def reference_nll(model: torch.nn.Module, ids: list[int], bos: int | None, replace_bos: bool = True,
                  first: int = CTX // 2) -> list[float]:
    """Independent llama.cpp-style NLLs: whole-window logits, cross-entropy of logits [first, CTX-1)."""
    out: list[float] = []
    for c in range(len(ids) // CTX):
        w = ids[c * CTX:(c + 1) * CTX]
        if bos is not None and replace_bos:
            w[0] = bos
        logits = window_logits(model, w)
        out += F.cross_entropy(logits[first:CTX - 1], torch.tensor(w[first + 1:]), reduction="none").tolist()
    return out


def test_windows_follow_llama_cpp() -> None:
    ids = list(range(100, 1100))  # 1000 tokens, ctx 256 → 3 windows, the 232-token tail dropped
    w = llama_cpp_windows(ids, 256, bos_token_id=None)
    assert len(w) == 3 and w[0] == ids[:256] and w[2] == ids[512:768]
    w = llama_cpp_windows(ids, 256, bos_token_id=1, max_chunks=2)
    assert len(w) == 2 and all(x[0] == 1 and len(x) == 256 for x in w) and w[1][1:] == ids[257:512]
    with pytest.raises(ValueError, match="fewer than one window"):
        llama_cpp_windows(ids[:10], 256, None)
    with pytest.raises(ValueError, match="at least 4"):
        llama_cpp_windows(ids, 2, None)


@pytest.mark.parametrize("add_bos", [False, True])
def test_perplexity_scores_the_second_half_like_llama_cpp(tiny: LoadedModel, text: str, add_bos: bool) -> None:
    tok = with_bos(tiny.tokenizer) if add_bos else tiny.tokenizer
    bos = tok.bos_token_id if add_bos else None
    ids = ([bos] if add_bos else []) + tok.encode(text, add_special_tokens=False)
    r = perplexity(tiny.model, tok, text, ctx=CTX, progress=False)
    nll = reference_nll(tiny.model, ids, bos)
    n = len(ids) // CTX
    assert n >= 3 and r.n_chunks == n and r.n_tokens_scored == len(nll) == n * (CTX - 1 - CTX // 2)
    expected = math.exp(statistics.fmean(nll))
    assert r.ppl == pytest.approx(expected, rel=1e-5)
    # llama.cpp's "+/-": PPL * sqrt(popvar / (N - 1)), i.e. PPL * sample stdev / sqrt(N).
    assert r.stderr == pytest.approx(expected * statistics.stdev(nll) / math.sqrt(len(nll)), rel=1e-5)
    # The tolerance above tells the chunking apart: scoring from one position earlier, or every
    # position, or (with BOS) not replacing each window's first token gives another figure.
    wrong = [reference_nll(tiny.model, ids, bos, first=CTX // 2 - 1), reference_nll(tiny.model, ids, bos, first=0)]
    if add_bos:
        wrong.append(reference_nll(tiny.model, ids, bos, replace_bos=False))
    for other in wrong:
        assert abs(math.exp(statistics.fmean(other)) / r.ppl - 1) > 1e-4


def test_kl_from_logits_matches_torch() -> None:
    gen = torch.Generator().manual_seed(0)
    ref, logits = torch.randn(5, 7, 50, generator=gen) * 3, torch.randn(5, 7, 50, generator=gen) * 3
    direct = F.kl_div(torch.log_softmax(logits, -1), torch.log_softmax(ref, -1), log_target=True, reduction="none").sum(-1)
    assert torch.allclose(kl_from_logits(ref, logits), direct, atol=1e-6)
    ref[..., 0] = -math.inf  # a masked vocabulary entry contributes 0, not NaN
    assert torch.isfinite(kl_from_logits(ref, logits)).all()
    assert torch.allclose(kl_from_logits(logits, logits), torch.zeros(5, 7), atol=1e-6)


def test_kl_of_a_model_with_itself_is_zero(tiny: LoadedModel, text: str) -> None:
    r = kl_divergence(tiny.model, tiny.model, tiny.tokenizer, text, ctx=CTX, max_chunks=2, progress=False)
    assert r.kl_mean == 0.0 and r.kl_max == 0.0 and r.top1_agreement == 1.0 and r.mean_abs_dp == 0.0
    assert r.ppl == r.ppl_reference and r.n_tokens_scored == 2 * (CTX - 1 - CTX // 2)


def test_kl_against_a_perturbed_model_matches_torch(tiny: LoadedModel, text: str) -> None:
    model, tok = tiny.model, tiny.tokenizer
    other = copy.deepcopy(model)
    with torch.no_grad():
        w = next(p for name, p in other.named_parameters() if "down_proj" in name)
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
    r = kl_divergence(other, model, tok, text, ctx=CTX, max_chunks=2, progress=False)
    ids = tok.encode(text, add_special_tokens=True)
    kl, agree, dp = [], [], []
    for w in llama_cpp_windows(ids, CTX, None, 2):
        ref = torch.log_softmax(window_logits(model, w)[CTX // 2:-1], -1)
        q = torch.log_softmax(window_logits(other, w)[CTX // 2:-1], -1)
        kl.append(F.kl_div(q, ref, log_target=True, reduction="none").sum(-1))  # KL(ref ‖ other)
        agree.append(ref.argmax(-1) == q.argmax(-1))
        target = torch.tensor(w[CTX // 2 + 1:])[:, None]
        dp.append(q.gather(1, target).exp() - ref.gather(1, target).exp())
    direct = torch.cat(kl).double()
    assert r.kl_mean > 1e-3 and r.kl_mean == pytest.approx(direct.mean().item(), rel=1e-4)
    assert r.kl_p99 == pytest.approx(torch.quantile(direct, 0.99).item(), rel=1e-4)
    assert r.top1_agreement == pytest.approx(torch.cat(agree).float().mean().item()) and r.top1_agreement < 1
    assert r.mean_abs_dp == pytest.approx(torch.cat(dp).abs().mean().item(), rel=1e-4)
    assert r.ppl_reference.ppl == pytest.approx(perplexity(model, tok, text, CTX, 2, progress=False).ppl, rel=1e-6)


def test_cli_missing_text_is_one_line(tiny: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert eval_main(["eval", "ppl", str(tiny.source), "--text", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("kiln: error:") and "missing.txt not found" in err


def test_cli_prints_ppl(tiny: LoadedModel, text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "t.txt").write_text(text)
    args = ["eval", "ppl", str(tiny.source), "--text", str(tmp_path / "t.txt"), "--ctx", str(CTX), "--chunks", "2"]
    assert eval_main([*args, "--no-progress"]) == 0
    expected = perplexity(tiny.model, tiny.tokenizer, text, CTX, 2, progress=False)
    assert capsys.readouterr().out == f"PPL = {expected.ppl:.4f} +/- {expected.stderr:.5f} (ctx {CTX}, 2 chunks)\n"


@pytest.mark.real_model
def test_default_model_ppl_matches_llama_cpp(default_gguf_path: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp")
    ctx, chunks = 128, 3
    text = data_path(WIKITEXT2_TEST).read_bytes().decode("utf-8")[:20000]
    loaded = load_model(default_gguf_path, dtype="float32", quantized_weights="dequantize")
    ours = perplexity(loaded.model, loaded.tokenizer, text, ctx=ctx, max_chunks=chunks, progress=False)
    llm = llama_cpp.Llama(model_path=str(default_gguf_path), n_ctx=ctx, logits_all=True, n_threads=2, verbose=False)
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)  # add_bos: "as the vocab says"
    bos = llm.token_bos() if llm._model.add_bos_token() else None
    nll = []
    for w in llama_cpp_windows(ids, ctx, bos, chunks):
        llm.reset()
        llm.eval(w)
        logits = torch.tensor(llm.scores[:ctx], dtype=torch.float32)
        nll.append(F.cross_entropy(logits[ctx // 2:ctx - 1], torch.tensor(w[ctx // 2 + 1:]), reduction="none"))
    theirs = math.exp(torch.cat(nll).double().mean().item())
    assert ours.n_tokens_scored == sum(len(x) for x in nll)
    assert ours.ppl == pytest.approx(theirs, rel=0.01)
