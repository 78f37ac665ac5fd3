"""When speculation pays: measured online, per batch size, and switched off when it does not.

Speculation is worth it only when the tokens a verifying step yields outweigh what the step
costs: drafting (a draft model's k forwards), and verifying 1 + k rows instead of 1. Which side
wins depends on the proposer, the draft's acceptance on this text, the batch size and the
machine — benchmarks/spec_decode.py measured everything from a 1.5x gain (n-gram drafts on code
that copies its prompt, one sequence) to a 0.77x loss (an INT4 self-draft whose per-forward
overhead is as large as the target's). A fixed threshold cannot know which, so the engine asks
this controller before each step.

The controller keeps, per batch-size bucket (1, 2, 3-4, 5-8, ...), an exponential moving average
of output tokens per second over decode-only steps with drafts ("spec") and without ("plain").
Plain samples come for free whenever no request had a draft (an n-gram proposer that found no
match), or from a probe: after `probe_every` steps of a bucket one step takes the other mode, so
a change in the text (a copy-heavy stretch after prose) is noticed. A probe costs: a self-draft
step that does not pay took ~7 plain steps' time here (the draft catches up on the tokens it
missed, then drafts k), so each probe that confirms the current choice doubles the interval (up
to `max_probe_every`), and a changed choice resets it. Until both modes have `min_samples`
samples in a bucket the controller measures them. Steps that prefill are not sampled (their time
is the prompt's).

Invariant: the controller only chooses whether drafts are proposed; what is generated never
depends on it (verification is lossless), only how fast.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def batch_bucket(num_running: int) -> int:
    """1, 2, 4, 8, ...: the power of two at or above the number of running sequences."""
    return 1 << max(num_running - 1, 0).bit_length()


@dataclass
class _Bucket:
    spec_tps: float | None = None
    plain_tps: float | None = None
    spec_samples: int = 0
    plain_samples: int = 0
    since_probe: int = 0
    probe_interval: int = 0  # 0: not set yet (probe_every)
    preferred: bool | None = None  # the mode the last decision chose on the estimates


@dataclass
class SpeculationController:
    """Chooses, per step, whether to speculate; `observe` feeds it each step's outcome.

    `adaptive=False` makes it always say yes (the static batch-size switch-off still applies in
    the engine), which is what the benchmark's "switch-off disabled" sweep and some tests want.
    """

    adaptive: bool = True
    ema: float = 0.25  # weight of the newest sample
    min_samples: int = 3
    probe_every: int = 16
    max_probe_every: int = 1024
    _buckets: dict[int, _Bucket] = field(default_factory=dict)
    switched_off_steps: int = 0  # steps the controller chose not to speculate (for metrics)

    def should_speculate(self, num_running: int) -> bool:
        if not self.adaptive:
            return True
        b = self._buckets.setdefault(batch_bucket(num_running), _Bucket())
        if b.spec_samples < self.min_samples:
            return True
        if b.plain_samples < self.min_samples:
            return self._off()  # the first plain samples of a bucket (a draft model always drafts)
        assert b.spec_tps is not None and b.plain_tps is not None
        preferred = b.spec_tps >= b.plain_tps
        if preferred != b.preferred or not b.probe_interval:
            b.preferred, b.probe_interval = preferred, self.probe_every  # a new choice: watch it closely
        b.since_probe += 1
        speculate = preferred
        if b.since_probe >= b.probe_interval:  # refresh the estimate of the mode not in use
            speculate = not preferred
            b.since_probe = 0
            b.probe_interval = min(2 * b.probe_interval, self.max_probe_every)
        return True if speculate else self._off()

    def _off(self) -> bool:
        self.switched_off_steps += 1
        return False

    def observe(self, num_running: int, had_drafts: bool, tokens: int, seconds: float) -> None:
        """A decode-only step ran `num_running` sequences and produced `tokens` in `seconds`."""
        if not self.adaptive or seconds <= 0 or tokens <= 0:
            return
        b = self._buckets.setdefault(batch_bucket(num_running), _Bucket())
        tps = tokens / seconds
        if had_drafts:
            b.spec_tps = tps if b.spec_tps is None else (1 - self.ema) * b.spec_tps + self.ema * tps
            b.spec_samples += 1
        else:
            b.plain_tps = tps if b.plain_tps is None else (1 - self.ema) * b.plain_tps + self.ema * tps
            b.plain_samples += 1

    def estimates(self) -> dict[int, tuple[float | None, float | None]]:
        """bucket → (spec tok/s, plain tok/s) as currently estimated."""
        return {k: (b.spec_tps, b.plain_tps) for k, b in sorted(self._buckets.items())}
