"""The speculation controller: speculates until it has measured both modes, then follows the
faster one per batch-size bucket, probing the other now and then."""

from __future__ import annotations

import pytest

from kiln.spec_decode.controller import SpeculationController, batch_bucket


@pytest.mark.parametrize("n, bucket", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 8), (8, 8), (9, 16)])
def test_batch_buckets(n: int, bucket: int) -> None:
    assert batch_bucket(n) == bucket


def _run(ctrl: SpeculationController, running: int, spec_tps: float, plain_tps: float, steps: int) -> list[bool]:
    """Drive the controller as the engine does; a step's rate depends only on its mode."""
    choices = []
    for _ in range(steps):
        spec = ctrl.should_speculate(running)
        choices.append(spec)
        ctrl.observe(running, spec, tokens=10, seconds=10 / (spec_tps if spec else plain_tps))
    return choices


def test_keeps_speculating_where_it_pays() -> None:
    choices = _run(SpeculationController(), 1, spec_tps=80, plain_tps=50, steps=200)
    assert sum(choices) >= 0.9 * len(choices)
    assert not all(choices)  # the plain mode was measured (and is re-probed)


def test_switches_off_where_it_does_not_pay_and_probes() -> None:
    ctrl = SpeculationController(probe_every=16)
    choices = _run(ctrl, 1, spec_tps=27, plain_tps=35, steps=320)
    assert sum(choices[20:]) <= len(choices[20:]) / 16 + 1  # only the probes speculate
    assert any(choices[20:])  # ... and they do, so a change would be noticed
    assert ctrl.switched_off_steps >= 280


def test_buckets_are_independent() -> None:
    ctrl = SpeculationController()
    _run(ctrl, 1, spec_tps=80, plain_tps=50, steps=50)
    _run(ctrl, 8, spec_tps=90, plain_tps=120, steps=50)
    est = ctrl.estimates()
    assert est[1][0] > est[1][1] and est[8][0] < est[8][1]
    assert sum(_run(ctrl, 1, spec_tps=80, plain_tps=50, steps=32)) >= 30


def test_follows_a_change_in_the_text() -> None:
    """Prose (drafts miss: slower) then copying (drafts land: faster): speculation comes back."""
    ctrl = SpeculationController()
    _run(ctrl, 1, spec_tps=40, plain_tps=50, steps=100)
    later = _run(ctrl, 1, spec_tps=120, plain_tps=50, steps=100)
    assert sum(later[40:]) >= 55


def test_plain_steps_without_drafts_count_as_plain_samples() -> None:
    """An n-gram proposer with no match yields plain steps for free: hardly any forced plain steps."""
    ctrl = SpeculationController()
    for i in range(64):
        matched = ctrl.should_speculate(1) and i % 2 == 0  # every other step the proposer finds a match
        ctrl.observe(1, had_drafts=matched, tokens=3 if matched else 1, seconds=0.03 if matched else 0.02)
    assert ctrl.switched_off_steps <= 5  # a couple before the free plain samples arrive, then the probes


def test_not_adaptive_always_speculates() -> None:
    assert all(_run(SpeculationController(adaptive=False), 1, spec_tps=10, plain_tps=100, steps=50))


def test_confirmed_probes_back_off() -> None:
    """A costly mode that keeps losing is probed ever more rarely: ~log2(steps / probe_every) probes."""
    choices = _run(SpeculationController(probe_every=16, max_probe_every=1024), 1, spec_tps=14, plain_tps=35, steps=2000)
    assert sum(choices[6:]) <= 8
