"""KL divergence of a model from a reference on the windows perplexity scores (llama.cpp's KLD).

What a quantized or lower-precision model loses is measured token by token against a reference
(usually the fp32 original), on exactly the positions `kiln.eval.perplexity` scores: llama.cpp's
chunking, second half of each window. Per scored position t, with P the reference's next-token
distribution and Q the model's:

* KL(P ‖ Q) = Σ_v P(v) · (log P(v) - log Q(v)), reported as mean, 99th percentile and max;
* top-1 agreement: argmax P == argmax Q (llama.cpp's "Same top p");
* Δp = Q(x) - P(x) for the true next token x: mean |Δp| and the signed mean (llama.cpp's "Mean Δp");
* the PPL of both models over the same tokens.

Unlike llama.cpp, which stores the reference's log-probs as 16-bit and skips reference terms below
e^-16, the KL here is exact in fp32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kiln.eval.perplexity import (
    EvalTokenizer, PerplexityResult, eval_windows, ppl_from_nll, progress_iter, scored_logits, scored_targets,
)


@dataclass(frozen=True, slots=True)
class KLResult:
    """Invariants: kl_p99 <= kl_max; KLs are >= 0 up to fp32 rounding; all figures cover the same n_tokens_scored positions."""

    kl_mean: float
    kl_p99: float
    kl_max: float
    top1_agreement: float
    mean_abs_dp: float  # mean |p_model(next) - p_ref(next)| of the true next token
    mean_dp: float  # signed mean of the same difference (llama.cpp's "Mean Δp"; < 0: the model is less sure)
    ppl: PerplexityResult
    ppl_reference: PerplexityResult
    n_tokens_scored: int

    def describe(self) -> str:
        return (f"KL = {self.kl_mean:.6f} (p99 {self.kl_p99:.5f}, max {self.kl_max:.4f}), "
                f"top-1 agreement = {100 * self.top1_agreement:.2f} %, mean |dp| = {self.mean_abs_dp:.5f} "
                f"(mean dp {self.mean_dp:+.5f}); PPL {self.ppl.ppl:.4f} vs reference {self.ppl_reference.ppl:.4f} "
                f"(ctx {self.ppl.ctx}, {self.ppl.n_chunks} chunks)")


def kl_from_logprobs(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(ref ‖ model) per row from log-probabilities [..., vocab]; rows where ref puts 0 mass add 0."""
    ref_lp, lp = ref_logprobs.float(), logprobs.float()
    p = ref_lp.exp()
    # 0 · log 0 is 0 by convention; without the guard a masked (-inf) reference logit gives NaN.
    return torch.where(p > 0, p * (ref_lp - lp), torch.zeros_like(p)).sum(-1)


def kl_from_logits(ref_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(softmax(ref_logits) ‖ softmax(logits)) per position, fp32 [...]; logits are [..., vocab]."""
    if ref_logits.shape != logits.shape:
        raise ValueError(f"reference logits {tuple(ref_logits.shape)} and logits {tuple(logits.shape)} differ in shape; "
                         "KL needs the same positions and the same vocabulary")
    return kl_from_logprobs(torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1))


def _window_stats(ref_logits: torch.Tensor, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-position KL, agreement, true-token probabilities and NLLs for one window's scored rows."""
    ref_lp, lp = torch.log_softmax(ref_logits.float(), -1), torch.log_softmax(logits.float(), -1)
    lp_true, ref_lp_true = lp.gather(1, target[:, None]).squeeze(1), ref_lp.gather(1, target[:, None]).squeeze(1)
    return {
        "kl": kl_from_logprobs(ref_lp, lp),
        "agree": (ref_lp.argmax(-1) == lp.argmax(-1)).float(),
        "dp": lp_true.exp() - ref_lp_true.exp(),
        "nll": -lp_true,
        "nll_ref": -ref_lp_true,
    }


def kl_divergence(model: torch.nn.Module, reference_model: torch.nn.Module, tokenizer: EvalTokenizer, text: str,
                  ctx: int = 512, max_chunks: int | None = None, progress: bool = True) -> KLResult:
    """KL(reference ‖ model) and agreement over the positions `perplexity` scores.

    Both models must share `tokenizer`'s vocabulary (same token ids): the windows are tokenized
    once and fed to both.
    """
    windows = eval_windows(tokenizer, text, ctx, max_chunks)
    parts: dict[str, list[torch.Tensor]] = {}
    for w in progress_iter(windows, "kl", progress):
        ref_logits, logits = scored_logits(reference_model, w), scored_logits(model, w)
        if ref_logits.shape != logits.shape:
            raise ValueError(f"the model has {logits.shape[-1]} logits and the reference {ref_logits.shape[-1]}; "
                             "KL needs models with the same vocabulary")
        for key, value in _window_stats(ref_logits, logits, scored_targets(w, logits.device)).items():
            parts.setdefault(key, []).append(value)
    s = {key: torch.cat(values) for key, values in parts.items()}
    kl = s["kl"].double()
    return KLResult(
        kl_mean=kl.mean().item(), kl_p99=torch.quantile(kl, 0.99).item(), kl_max=kl.max().item(),
        top1_agreement=s["agree"].mean().item(), mean_abs_dp=s["dp"].abs().double().mean().item(),
        mean_dp=s["dp"].double().mean().item(), ppl=ppl_from_nll(s["nll"], len(windows), ctx),
        ppl_reference=ppl_from_nll(s["nll_ref"], len(windows), ctx), n_tokens_scored=int(kl.numel()),
    )
