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


COST = {  # (seconds, tokens) per step: parallel wins small, off wins big
    1: {"parallel": (0.011, 3), "sequential": (0.014, 3), "off": (0.010, 1)},
    64: {"parallel": (0.9, 80), "sequential": (0.5, 80), "off": (0.2, 64)},
    8: {"parallel": (0.05, 20), "sequential": (0.03, 20), "off": (0.03, 8)},
}


def test_flex_picks_the_best_arm_per_batch_bucket():
    clock = FakeClock()
    p = FlexPolicy(mode="flex", clock=clock, warmup=3, explore_every=1000)
    small = _run(p, clock, 1, 40, lambda a: COST[1][a])
    big = _run(p, clock, 64, 40, lambda a: COST[64][a])
    mid = _run(p, clock, 8, 40, lambda a: COST[8][a])
    assert small[-20:] == ["parallel"] * 20
    assert big[-20:] == ["off"] * 20
    assert mid[-20:] == ["sequential"] * 20
    assert set(p.arms) == {1, 8, 64}


def test_without_parallel_the_policy_never_picks_it():
    clock = FakeClock()
    p = FlexPolicy(mode="flex", clock=clock, warmup=3, explore_every=5, allow_parallel=False)
    chosen = _run(p, clock, 1, 60, lambda a: COST[1][a])
    assert "parallel" not in chosen and chosen[-4:].count("sequential") >= 3


def test_flex_keeps_exploring_so_it_notices_a_change():
    clock = FakeClock()
    p = FlexPolicy(mode="flex", clock=clock, warmup=2, explore_every=10)
    chosen = _run(p, clock, 4, 100, lambda a: (0.01, 1) if a == "off" else (0.01, 0.5))
    assert 0 < chosen.count("sequential") < 30 and 0 < chosen.count("parallel") < 30


def test_fixed_modes_never_switch():
    for mode in ("parallel", "sequential", "off"):
        arm = mode
        clock = FakeClock()
        p = FlexPolicy(mode=mode, clock=clock)
        assert set(_run(p, clock, 8, 20, lambda a: (0.01, 1))) == {arm}
