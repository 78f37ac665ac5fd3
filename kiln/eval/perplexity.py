"""Perplexity and KL divergence with llama.cpp's perplexity-tool chunking (the quality gate).

Chunking (llama.cpp `llama-perplexity`): the whole text is tokenized once (with BOS when the
model's tokenizer adds one); it is cut into n = len(tokens) // ctx non-overlapping windows of
ctx tokens; when the tokenizer adds BOS, each window's first token is replaced by BOS; only the
second half of each window is scored — the logits at positions ctx/2 .. ctx-2 predicting the
tokens at ctx/2+1 .. ctx-1 — so every scored token has at least ctx/2 tokens of context.
The error printed with the PPL is llama.cpp's: PPL · sqrt(var(nll) / (N - 1)).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from kiln.eval.forward import window_logits


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    stderr: float  # of the PPL
    nll_mean: float
    n_chunks: int
    n_tokens_scored: int
    ctx: int

    def describe(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.stderr:.5f} (ctx {self.ctx}, {self.n_chunks} chunks, {self.n_tokens_scored} tokens scored)"


@dataclass(frozen=True)
class KLResult:
    kl_mean: float
    kl_p99: float
    top1_agreement: float
    mean_abs_dp: float  # mean |p_model(next) - p_ref(next)| of the true next token
    ppl: PerplexityResult
    ppl_reference: PerplexityResult

    def describe(self) -> str:
        return (f"mean KL = {self.kl_mean:.6f}, p99 KL = {self.kl_p99:.5f}, top-1 agreement = {100 * self.top1_agreement:.2f} %, "
                f"mean |dp| = {self.mean_abs_dp:.5f}; PPL {self.ppl.ppl:.4f} vs reference {self.ppl_reference.ppl:.4f}")


def llama_cpp_windows(token_ids: list[int], ctx: int, bos_token_id: int | None, max_chunks: int | None = None) -> list[list[int]]:
    """The windows llama.cpp's perplexity tool scores (`bos_token_id` None: no BOS replacement)."""
    if ctx < 4 or ctx % 2:
        raise ValueError(f"ctx must be an even number >= 4, got {ctx}")
    n = len(token_ids) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {ctx}")
    if max_chunks is not None:
        n = min(n, max_chunks)
    windows = []
    for c in range(n):
        w = list(token_ids[c * ctx:(c + 1) * ctx])
        if bos_token_id is not None:
            w[0] = bos_token_id
        windows.append(w)
    return windows


def scored_logprobs(logits: torch.Tensor, window: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probs [ctx/2 - 1, vocab] at the scored positions, the true next tokens [ctx/2 - 1])."""
    first = len(window) // 2
    return torch.log_softmax(logits[first:-1].float(), -1), torch.tensor(window[first + 1:], device=logits.device)


def ppl_from_nll(nll: torch.Tensor, n_chunks: int, ctx: int) -> PerplexityResult:
    v = nll.double()
    mean = v.mean().item()
    var = max((v * v).mean().item() - mean * mean, 0.0)
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * math.sqrt(var / max(v.numel() - 1, 1)), mean, n_chunks, v.numel(), ctx)


def _windows_for(tokenizer: "object", text: str, ctx: int, max_chunks: int | None) -> list[list[int]]:
    ids = tokenizer.encode(text, add_special_tokens=True)
    return llama_cpp_windows(ids, ctx, tokenizer.bos_token_id if tokenizer.add_bos_token else None, max_chunks)


def _progress(items: list, desc: str, enabled: bool) -> Iterator | list:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="chunk")


def perplexity(model: torch.nn.Module, tokenizer: "object", text: str, ctx: int = 512, max_chunks: int | None = None,
               progress: bool = False) -> PerplexityResult:
    windows = _windows_for(tokenizer, text, ctx, max_chunks)
    nll = []
    for w in _progress(windows, "perplexity", progress):
        lp, target = scored_logprobs(window_logits(model, w), w)
        nll.append(-lp.gather(1, target[:, None]).squeeze(1))
    return ppl_from_nll(torch.cat(nll), len(windows), ctx)


def kl_from_logprobs(ref_lp: torch.Tensor, lp: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ model) per position from log-probabilities [T, vocab]."""
    return (ref_lp.exp() * (ref_lp - lp)).sum(-1)


def kl_divergence(model: torch.nn.Module, reference: torch.nn.Module, tokenizer: "object", text: str, ctx: int = 512,
                  max_chunks: int | None = None, progress: bool = False,
                  reference_logits: Callable[[list[int]], torch.Tensor] | None = None) -> KLResult:
    """KL(reference ‖ model) and agreement over the scored positions of every window."""
    windows = _windows_for(tokenizer, text, ctx, max_chunks)
    kl, agree, dp, nll, nll_ref = [], [], [], [], []
    for w in _progress(windows, "kl", progress):
        ref_lp, target = scored_logprobs(reference_logits(w) if reference_logits else window_logits(reference, w), w)
        lp, _ = scored_logprobs(window_logits(model, w), w)
        kl.append(kl_from_logprobs(ref_lp, lp))
        agree.append((ref_lp.argmax(-1) == lp.argmax(-1)).float())
        p_true, p_ref_true = lp.gather(1, target[:, None]).squeeze(1), ref_lp.gather(1, target[:, None]).squeeze(1)
        dp.append((p_true.exp() - p_ref_true.exp()).abs())
        nll.append(-p_true)
        nll_ref.append(-p_ref_true)
    k = torch.cat(kl)
    return KLResult(k.mean().item(), torch.quantile(k.float(), 0.99).item(), torch.cat(agree).mean().item(),
                    torch.cat(dp).mean().item(), ppl_from_nll(torch.cat(nll), len(windows), ctx),
                    ppl_from_nll(torch.cat(nll_ref), len(windows), ctx))
