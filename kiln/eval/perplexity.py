"""Perplexity with llama.cpp's `llama-perplexity` chunking: the number kiln's quality gate compares.

Chunking (tools/perplexity/perplexity.cpp, `perplexity()`), reproduced exactly so that a kiln PPL
and a llama.cpp PPL of the same file on the same text are the same quantity:

* the whole text is tokenized once, with BOS in front iff the model's tokenizer adds BOS
  (`common_tokenize(ctx, text, add_special=true)`; SmolLM2's GGUF says add_bos_token = false);
* it is cut into n = len(tokens) // ctx non-overlapping windows of ctx tokens (the tail that does
  not fill a window is dropped), optionally capped at `max_chunks`;
* when the tokenizer adds BOS, each window's first token is *replaced* by BOS (not prepended), so
  every window is exactly ctx tokens long;
* only the second half is scored: the logits at positions first = ctx // 2 .. ctx - 2 predict the
  tokens at first + 1 .. ctx - 1, i.e. ctx - 1 - ctx // 2 tokens per window, each with at least
  ctx // 2 tokens of context;
* PPL = exp(mean NLL) and the reported error is llama.cpp's delta-method one:
  PPL · sqrt(var(nll) / (N - 1)), var being the population variance E[nll²] - E[nll]².

llama.cpp additionally refuses texts shorter than 2·ctx tokens; kiln accepts a single window
(useful for short tests) and says so in the result's n_chunks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar

import torch

from kiln.eval.forward import window_hidden

T = TypeVar("T")


class EvalTokenizer(Protocol):
    """What the evaluation needs from a tokenizer (kiln.loader.tokenizer.Tokenizer has it)."""

    bos_token_id: int | None
    add_bos_token: bool

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class PerplexityResult:
    """Invariants: ppl == exp(nll_mean); n_tokens_scored == n_chunks * (ctx - 1 - ctx // 2)."""

    ppl: float
    stderr: float  # llama.cpp's "+/-" on the PPL (NaN when fewer than 2 tokens were scored)
    nll_mean: float
    n_chunks: int
    n_tokens_scored: int
    ctx: int

    def describe(self) -> str:
        return f"PPL = {self.ppl:.4f} +/- {self.stderr:.5f} (ctx {self.ctx}, {self.n_chunks} chunks)"


def first_scored(ctx: int) -> int:
    """Position of the first scored logit in a window of `ctx` tokens (llama.cpp: n_ctx / 2)."""
    return ctx // 2


def llama_cpp_windows(token_ids: Sequence[int], ctx: int, bos_token_id: int | None,
                      max_chunks: int | None = None) -> list[list[int]]:
    """The windows llama.cpp's perplexity tool evaluates; `bos_token_id` None means no BOS replacement."""
    if ctx < 4:
        raise ValueError(f"ctx must be at least 4 tokens (half of each window is scored), got {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise ValueError(f"the number of chunks must be at least 1, got {max_chunks}")
    n = len(token_ids) // ctx
    if n == 0:
        raise ValueError(f"the text has {len(token_ids)} tokens, fewer than one window of {ctx}; use a longer text or a smaller --ctx")
    if max_chunks is not None:
        n = min(n, max_chunks)
    windows = []
    for c in range(n):
        window = list(token_ids[c * ctx:(c + 1) * ctx])
        if bos_token_id is not None:
            window[0] = bos_token_id  # replaced, not prepended: the window stays ctx tokens long
        windows.append(window)
    return windows


def eval_windows(tokenizer: EvalTokenizer, text: str, ctx: int, max_chunks: int | None = None) -> list[list[int]]:
    """Tokenize `text` once (BOS iff the tokenizer adds it) and cut it as llama.cpp does."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    bos = tokenizer.bos_token_id if tokenizer.add_bos_token else None
    return llama_cpp_windows(ids, ctx, bos, max_chunks)


def scored_targets(window: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """The tokens the scored logits predict: window[ctx // 2 + 1:], as a long tensor."""
    return torch.tensor(window[first_scored(len(window)) + 1:], dtype=torch.long, device=device)


def scored_logits(model: torch.nn.Module, window: Sequence[int]) -> torch.Tensor:
    """fp32 logits [ctx - 1 - ctx // 2, vocab] at the scored positions of one window.

    The whole window is prefilled (causal: each logit sees only its prefix), but the LM head runs
    only on the scored rows, as llama.cpp requests outputs only for pos >= first; on a 49k
    vocabulary that halves the head's cost.
    """
    hidden = window_hidden(model, list(window))
    with torch.inference_mode():
        return model.compute_logits(hidden[first_scored(len(window)):-1])


def scored_logprobs(logits: torch.Tensor, window: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """From a whole window's logits [ctx, vocab]: (log-probs at the scored positions, their targets)."""
    first = first_scored(len(window))
    return torch.log_softmax(logits[first:-1].float(), -1), scored_targets(window, logits.device)


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row of `logits` [N, vocab], in fp32."""
    return -torch.log_softmax(logits.float(), -1).gather(1, targets[:, None]).squeeze(1)


def ppl_from_nll(nll: torch.Tensor, n_chunks: int, ctx: int) -> PerplexityResult:
    """PPL and llama.cpp's error from per-token NLLs (accumulated in float64, as llama.cpp does)."""
    v = nll.detach().double().flatten()
    n = int(v.numel())
    if n == 0:
        raise ValueError("no tokens were scored")
    mean = v.mean().item()
    var = ((v - mean) ** 2).mean().item()  # population variance, = E[nll²] - E[nll]² (llama.cpp's nll2)
    ppl = math.exp(mean)
    stderr = ppl * math.sqrt(var / (n - 1)) if n > 1 else math.nan
    return PerplexityResult(ppl, stderr, mean, n_chunks, n, ctx)


def progress_iter(items: Sequence[T], desc: str, enabled: bool) -> Iterable[T]:
    """`items` with a tqdm bar on stderr when asked for and tqdm is installed."""
    if not enabled:
        return items
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is optional: evaluation works the same without a bar
        return items
    return tqdm(items, desc=desc, unit="chunk")


def perplexity(model: torch.nn.Module, tokenizer: EvalTokenizer, text: str, ctx: int = 512,
               max_chunks: int | None = None, progress: bool = True) -> PerplexityResult:
    """PPL of `model` on `text` with llama.cpp's chunking (see the module docstring)."""
    windows = eval_windows(tokenizer, text, ctx, max_chunks)
    nll = [token_nll(scored_logits(model, w), scored_targets(w)) for w in progress_iter(windows, "perplexity", progress)]
    return ppl_from_nll(torch.cat(nll), len(windows), ctx)


__all__ = ["PerplexityResult", "EvalTokenizer", "first_scored", "llama_cpp_windows", "eval_windows", "scored_targets",
           "scored_logits", "scored_logprobs", "token_nll", "ppl_from_nll", "progress_iter", "perplexity"]
