"""The Flex policy picks the arm with the better measured goodput per batch bucket."""

from __future__ import annotations

from flexdraft_vllm.vllm_integration.policy import FlexPolicy, bucket_of


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _run(policy, clock, num_reqs, steps, cost):
    """cost(arm) -> (seconds, tokens) of the step that arm shapes."""
    chosen = []
    for _ in range(steps):
        arm = policy.decide(num_reqs)
        chosen.append(arm)
        dt, toks = cost(arm)
        clock.t += dt
        policy.observe(toks)
    return chosen


def test_buckets_are_powers_of_two():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]


def test_flex_prefers_drafting_when_it_pays_and_off_when_it_does_not():
    clock = FakeClock()
    p = FlexPolicy(mode="flex", clock=clock, warmup=3, explore_every=1000)
    small = _run(p, clock, 1, 40, lambda a: (0.012, 3) if a == "draft" else (0.010, 1))
    big = _run(p, clock, 64, 40, lambda a: (0.5, 80) if a == "draft" else (0.2, 64))
    assert small[-20:].count("draft") == 20
    assert big[-20:].count("off") == 20
    assert set(p.arms) == {1, 64}


def test_flex_keeps_exploring_so_it_notices_a_change():
    clock = FakeClock()
    p = FlexPolicy(mode="flex", clock=clock, warmup=2, explore_every=10)
    chosen = _run(p, clock, 4, 100, lambda a: (0.01, 1) if a == "off" else (0.01, 0.5))
    assert 0 < chosen.count("draft") < 30


def test_fixed_modes_never_switch():
    for mode, arm in (("sequential", "draft"), ("off", "off")):
        clock = FakeClock()
        p = FlexPolicy(mode=mode, clock=clock)
        assert set(_run(p, clock, 8, 20, lambda a: (0.01, 1))) == {arm}
