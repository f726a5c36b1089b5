"""The Flex policy: cost model + measured acceptance pick the arm and verify length.

A simulated engine stands in for vLLM: its true step time is the cost model's
weight work times a hidden overhead factor plus a fixed per-step overhead, and
each drafted request accepts each next draft with probability `p` (so the
policy has to learn both the correction and the acceptance).
"""

from __future__ import annotations

import random

import pytest

from flexdraft_vllm.vllm_integration.cost_model import CostModel
from flexdraft_vllm.vllm_integration.policy import Acceptance, Decision, FlexPolicy, bucket_of, probe_sample

# memory-bound up to 64 rows (flat), then linear: a GPU-like knee
ROWS = (1, 64, 128, 1024)
COST = CostModel(rows=ROWS, layer_s=(1e-4, 1e-4, 2e-4, 16e-4), head_s=(1e-4, 1e-4, 2e-4, 16e-4),
                 num_layers=30, num_deep=10, block_size=8)
# compute-bound from the first row (a CPU): 8 rows cost 1.5x one, each extra verify row ~7% of a step
COST_CPU = CostModel(rows=(1, 8, 64, 1024), layer_s=(1e-4, 1.5e-4, 5e-4, 80e-4),
                     head_s=(1e-4, 1.5e-4, 5e-4, 80e-4), num_layers=30, num_deep=10, block_size=8)


class FakeClock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


class Sim:
    """A toy engine: true times = overhead + factor * modelled weight work."""

    def __init__(self, p: float, overhead=2e-3, factor=1.5, seed=0, cost=COST):
        self.p, self.overhead, self.factor, self.cost = p, overhead, factor, cost
        self.rng = random.Random(seed)

    def step(self, policy, clock, n, steps):
        chosen, outcomes, tokens = [], [], n
        for _ in range(steps):
            policy.observe(tokens, outcomes)
            dec = policy.decide(n)
            chosen.append(dec)
            if dec.arm == "off":
                clock.t += self.overhead + self.factor * self.cost.step_s("off", n)
                outcomes, tokens = [], n
                continue
            k, m = dec.max_drafts, dec.requests or n  # a probe at a large batch drafts for m of n
            groups = k + 1 if dec.arm == "parallel" else 1
            block = min(self.cost.block_size, k + 1)  # the proposer trims a block to the cap + 1
            clock.t += self.overhead * 1.3 + self.factor * self.cost.step_s(dec.arm, n, k * m / n, groups, m, block)
            outcomes = []
            for _ in range(m):
                a = 0
                while a < k and self.rng.random() < self.p:
                    a += 1
                outcomes.append((k, a))
            tokens = n + sum(a for _, a in outcomes)
        return chosen


def _flex(cost=COST, **kw):
    clock = FakeClock()
    return FlexPolicy(mode="flex", cost=cost, max_drafts=7, clock=clock, **kw), clock


def test_buckets_are_powers_of_two():
    assert [bucket_of(n) for n in (1, 2, 3, 5, 8, 9, 64)] == [1, 2, 4, 8, 8, 16, 64]


def test_acceptance_learns_the_per_position_rates():
    acc = Acceptance(4, prior=0.5, rate=0.05)
    rng = random.Random(1)
    for _ in range(3000):
        a = 0
        while a < 4 and rng.random() < 0.8:
            a += 1
        acc.update([(4, a)])
    assert acc.accepted == pytest.approx([0.8, 0.64, 0.512, 0.41], abs=0.08)
    assert acc.tokens(4) == pytest.approx(1 + 0.8 + 0.64 + 0.512 + 0.41, abs=0.2)
    assert acc.drafts(4) == pytest.approx(4.0)
    acc.update([(2, 2)] * 500)  # the confidence rule now proposes 2: positions 3, 4 vanish
    assert acc.proposed[2] < 0.05 and acc.accepted[2] < 0.05


def test_strong_drafter_drafts_at_small_batch_and_stops_when_compute_bound():
    p, clock = _flex()
    sim = Sim(p=0.8)
    small = sim.step(p, clock, 1, 200)
    assert [d.arm for d in small[-50:]].count("off") <= 2  # only the periodic baseline refresh
    assert all(d.max_drafts >= 4 for d in small[-50:] if d.arm != "off")
    big = sim.step(p, clock, 512, 300)  # 512 requests: every extra row costs its full FLOPs
    drafted = [d for d in big[-200:] if d.arm != "off"]
    # only probes, of a few requests each, within probe_budget: no more drafting than 4 full probes
    assert all(d.probe and d.requests == p.probe_requests for d in drafted)
    assert sum(d.requests for d in drafted) <= 4 * 512


def test_weak_drafter_stays_off_and_probes_within_budget():
    p, clock = _flex(probe_budget=0.02, explore_every=20)
    sim = Sim(p=0.05)
    chosen = sim.step(p, clock, 64, 2000)
    drafted = [d for d in chosen[100:] if d.arm != "off"]
    # a few probes (of 8 requests each) keep acceptance measured, but not enough to cost
    # more than the budget: fewer drafting request-steps than 2% of the steps' requests
    assert 0 < sum(d.requests or 64 for d in drafted) < 0.02 * 1900 * 64
    assert p.acceptance.accepted[0] < 0.2


@pytest.mark.parametrize("probe_cost, max_probes", [(3.0, 6), (0.9, 110)])
def test_probes_are_charged_what_they_measurably_lost(probe_cost, max_probes):
    """Where the model misjudges break-even (e.g. a draft pass's fixed cost it
    cannot see), the predicted loss allows a probe every `probe_every` steps. A
    probe is charged the larger of that and what past probes here lost against
    plain steps, which keeps them within `probe_budget` of the time; probes
    that gain keep the floor (the old rule probed every 4 steps in both cases)."""
    n, t_plain = 4, 0.01
    p, clock = _flex(allow_parallel=False, probe_budget=0.01, probe_every=4)
    # the model's view: sequential k=1 loses 1% against plain, so probe at the floor
    p.predict = lambda num, req_ids=None: [(num / t_plain, t_plain, Decision("off", 0)),
                                           (0.99 * num / t_plain, t_plain, Decision("sequential", 1))]
    probes, tokens, step_s = 0, n, t_plain
    for _ in range(400):
        p.observe(tokens, [], step_s)
        dec = p.decide(n)
        probes += dec.arm != "off"
        # a probe step takes probe_cost plain steps and yields one extra token per request
        tokens, step_s = (2 * n, probe_cost * t_plain) if dec.arm != "off" else (n, t_plain)
    assert probes <= max_probes
    if probe_cost > 2:  # lost (3 - 2) plain steps per probe: about one probe per 100 steps
        assert p.probe_loss[4].value == pytest.approx(t_plain, rel=0.01) and probes >= 2
    else:  # gained: the floor
        assert p.probe_loss[4].value < 0 and probes >= 90


def test_verify_length_shrinks_as_the_batch_grows():
    p, clock = _flex(allow_parallel=False)
    sim = Sim(p=0.6)
    sim.step(p, clock, 1, 100)
    k_small = max(d.max_drafts for d in sim.step(p, clock, 1, 50) if d.arm != "off")
    sim.step(p, clock, 24, 150)  # 24 * 8 rows is past the knee at 64: each extra draft costs
    ks = [d.max_drafts for d in sim.step(p, clock, 24, 50) if d.arm != "off" and not d.widened]
    assert k_small == 7 and ks and max(ks) <= 3


def test_notices_a_workload_that_becomes_predictable():
    p, clock = _flex(explore_every=10, allow_parallel=False)
    sim = Sim(p=0.02)
    sim.step(p, clock, 8, 300)
    assert p.acceptance.accepted[0] < 0.2
    sim.p = 0.95  # e.g. the batch now repeats its context
    late = sim.step(p, clock, 8, 800)
    assert [d.arm for d in late[-100:]].count("sequential") > 80


def test_without_parallel_the_policy_never_picks_it():
    p, clock = _flex(allow_parallel=False)
    chosen = Sim(p=0.9).step(p, clock, 1, 200)
    assert all(d.arm != "parallel" for d in chosen)
    assert any(d.arm == "sequential" for d in chosen)


def test_fixed_modes_never_switch():
    for mode in ("parallel", "sequential", "off"):
        clock = FakeClock()
        p = FlexPolicy(mode=mode, clock=clock, max_drafts=5)
        arms = {d.arm for d in Sim(p=0.5).step(p, clock, 8, 20)}
        assert arms == {mode}


def test_flex_needs_a_cost_model():
    with pytest.raises(ValueError, match="cost model"):
        FlexPolicy(mode="flex")


def test_acceptance_prior_is_replaced_after_a_few_requests():
    acc = Acceptance(3, prior=0.5, rate=0.02, prior_weight=4)
    acc.update([(3, 0)] * 20)  # e.g. 20 drafting steps at batch 1, nothing accepted
    assert acc.accepted[0] < 0.1


def test_engine_step_time_scores_decisions_not_wall_clock():
    """The engine's busy time scores a decision (idle gaps between a server's
    requests are not a step's cost); NaN, a step with prefill chunks, leaves
    the step-time estimates alone."""
    clock = FakeClock()
    p = FlexPolicy(mode="off", clock=clock)  # every decision "off": each step scores T_off
    for _ in range(4):
        p.observe(1, (), step_s=0.01)
        p.decide(1)
        clock.t += 5.0
    assert p.t_off[1].n == 3 and abs(p.t_off[1].value - 0.01) < 1e-12
    p.observe(1, (), step_s=float("nan"))
    p.decide(1)
    p.observe(1, (), step_s=0.01)
    assert p.t_off[1].n == 4


def _run_request(policy, clock, sim, rid, p, steps):
    """One request alone (batch 1) for `steps` steps; its outcomes carry its id."""
    chosen, outcomes, tokens = [], [], 1
    for _ in range(steps):
        policy.observe(tokens, outcomes)
        dec = policy.decide(1, [rid])
        chosen.append(dec.arm)
        k = dec.max_drafts
        clock.t += sim.overhead * (1.3 if k else 1.0) + sim.factor * COST.step_s(dec.arm if k else "off", 1, k, k + 1,
                                                                                 block=min(COST.block_size, k + 1))
        a = 0
        while a < k and sim.rng.random() < p:
            a += 1
        outcomes, tokens = ([(k, a, rid)] if k else []), 1 + a
    return chosen


def test_each_request_is_judged_by_its_own_acceptance():
    """Batch 1, requests one after another: poor ones (chat) run plain, good ones
    (code that repeats) draft, even after the poor ones dragged the overall
    estimate down: near break-even the policy probes often enough to notice."""
    p, clock = _flex(allow_parallel=False)
    sim = Sim(p=0.0, overhead=20e-3)  # a big fixed step cost: drafting pays only for good requests
    late_good, late_poor = [], []
    for r in range(6):
        poor = _run_request(p, clock, sim, f"poor{r}", 0.1, 60)
        good = _run_request(p, clock, sim, f"good{r}", 0.9, 60)
        if r >= 2:
            late_poor += poor[20:]
            late_good += good[20:]
    assert late_good.count("sequential") > 0.8 * len(late_good)
    assert late_poor.count("off") > 0.7 * len(late_poor)
    assert len(p.per_request) <= 4 * 1 + 16  # finished requests are forgotten


def test_the_overall_estimate_is_not_biased_toward_requests_that_keep_drafting():
    """Good requests keep drafting, poor ones stop after a few steps; the overall
    estimate, where a new request starts, counts each request's first few
    outcomes only, so it sits near the mix (0.5), not near the good ones (the
    old rule, every outcome counted: 0.74)."""
    p, clock = _flex(allow_parallel=False)
    sim = Sim(p=0.0, overhead=20e-3)
    for r in range(6):
        _run_request(p, clock, sim, f"poor{r}", 0.1, 60)
        _run_request(p, clock, sim, f"good{r}", 0.9, 60)
    assert 0.3 < p.acceptance.accepted[0] < 0.6
    assert p.acceptance.requests <= 12 * p.request_prior


def test_lookup_cap_pays_for_its_rows():
    # past 64 rows a row costs ~0.87 of a plain step's time per token at batch 512
    cost = CostModel(rows=(1, 64, 1024), layer_s=(1e-4, 1e-4, 8e-4), head_s=(1e-4, 1e-4, 8e-4),
                     num_layers=30, num_deep=10, block_size=8)
    p = FlexPolicy(mode="flex", cost=cost, max_drafts=7, clock=FakeClock())
    for n in (1, 512):
        p.t_off[n] = _measured(cost.step_s("off", n) * 1.5)
    assert p.lookup_caps(1, [None]) == [7]  # memory-bound batch 1: a verify row is nearly free
    p.lookup.update([(7, 0)] * 50)  # lookup drafts that are never accepted ...
    assert p.lookup_caps(512, [None]) == [0]  # ... are not worth a compute-bound row
    p.observe(1, lookup_outcomes=[(7, 7, "rep")] * 40)  # one request that repeats itself
    assert p.lookup_caps(512, ["rep", "other"]) == [7, 0]


def test_a_step_with_lookup_drafts_is_not_a_plain_step():
    clock = FakeClock()
    p = FlexPolicy(mode="off", clock=clock)
    p.observe(1, (), step_s=0.01)
    p.decide(1)
    p.drafted(3, masked=0)  # prompt lookup drafted 3 tokens on an "off" step
    p.observe(1, (), step_s=0.05)
    assert 1 not in p.t_off  # 50 ms with 3 verify rows is not T_off


def _measured(v):
    """A measured figure that has settled at v."""
    from flexdraft_vllm.vllm_integration.policy import _Recent

    e = _Recent()
    for _ in range(4):
        e.update(v)
    return e


def test_lookup_rows_are_priced_by_what_they_were_measured_to_cost():
    cost = CostModel(rows=(1, 64, 1024), layer_s=(1e-4, 2e-4, 8e-4), head_s=(1e-4, 2e-4, 8e-4),
                     num_layers=30, num_deep=10, block_size=8)
    p = FlexPolicy(mode="flex", cost=cost, max_drafts=7, clock=FakeClock())
    t0 = cost.step_s("off", 8)
    p.t_off[8] = _measured(t0)
    p.lookup.update([(7, 4)] * 50)  # the first 4 lookup drafts are accepted, the rest never
    p.acceptance.update([(7, 0)] * 50)  # FlexDraft's own drafts never are: "off" (with lookup) wins
    assert p.lookup_caps(8, [None]) == [4]  # modelled rows are cheap at batch 8: all that can be accepted
    for _ in range(3):  # but "off" steps with 8 x 4 lookup drafts took 10 plain steps
        p.decide(8)
        p.drafted(32, masked=0)
        p.observe(8, step_s=10 * t0)
    assert p.corr[("lookup", None)].value > 10
    assert p.lookup_caps(8, [None])[0] < 4


def test_a_dear_draft_pass_does_not_make_verify_rows_dear():
    """Verify rows cost per row, the draft pass about the same for 1 or 7
    drafts: the correction learned for the pass (here 10x its model) must not
    price the rows; they cost what the model says until lookup steps measure them."""
    cost = CostModel(rows=(1, 64, 1024), layer_s=(1e-4, 4e-4, 6.4e-3), head_s=(1e-4, 4e-4, 6.4e-3),
                     num_layers=30, num_deep=10, block_size=8)
    p = FlexPolicy(mode="flex", cost=cost, max_drafts=7, clock=FakeClock(), allow_parallel=False)
    p.t_off[1] = _measured(0.045)
    p.acceptance.update([(7, 7)] * 20)  # every draft proposed (the cost of a row is what varies)
    p.corr[("sequential", None)] = _measured(10.0)
    t = {d.max_drafts: s for _, s, d in p.predict(1) if d.arm == "sequential"}
    rows = cost.step_s("off", 1, 7) - cost.step_s("off", 1, 1)
    # the pass of a cap-k step runs a block trimmed to k + 1 masks
    pass_ = {k: cost.step_s("sequential", 1, k, block=k + 1) - cost.step_s("off", 1, k) for k in (1, 7)}
    assert t[7] - t[1] == pytest.approx(rows + 10 * (pass_[7] - pass_[1]), rel=1e-6)
    assert t[1] == pytest.approx(0.045 + cost.row_s(1) + 10 * pass_[1], rel=1e-6)
    p.corr[("lookup", None)] = _measured(3.0)  # lookup steps measured rows at 3x the model
    t = {d.max_drafts: s for _, s, d in p.predict(1) if d.arm == "sequential"}
    assert t[7] - t[1] == pytest.approx(3 * rows + 10 * (pass_[7] - pass_[1]), rel=1e-6)


@pytest.mark.parametrize("widen_by", [2, 0])
def test_a_cap_set_by_stale_estimates_is_raised_by_widened_steps(widen_by):
    """Positions past the cap are never verified. An estimate whose positions
    2+ are stale-low (early poor requests, the prior) argues for a cap of 1,
    which then never measures them: the trap that kept flex at 1.0x where
    sequential with every draft ran 1.4x (batch 1, CPU). Widened steps verify
    the next positions, so the cap climbs to what the drafter earns; without
    them (widen_by 0) it stays put, which is what this test guards."""
    p, clock = _flex(cost=COST_CPU, allow_parallel=False, widen_by=widen_by)
    p.acceptance.accepted = [0.7, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001]
    late = [d for d in Sim(p=0.75, cost=COST_CPU).step(p, clock, 1, 400)[-100:]
            if d.arm != "off" and not d.widened]
    assert late
    if widen_by:
        assert min(d.max_drafts for d in late) >= 3
        assert p.acceptance.accepted[1] > 0.4
    else:
        assert max(d.max_drafts for d in late) == 1


def test_widened_steps_are_paced_and_bounded():
    p, clock = _flex(cost=COST_CPU, allow_parallel=False, widen_every=8, widen_by=2)
    chosen = [d for d in Sim(p=0.5, cost=COST_CPU).step(p, clock, 1, 300) if d.arm != "off" and not d.probe]
    widened = [d for d in chosen if d.widened]
    assert 0 < len(widened) <= len(chosen) // 8 + 1
    assert all(d.max_drafts <= 7 for d in chosen)


def test_positions_past_the_cap_keep_their_estimate():
    acc = Acceptance(4, prior=0.5)
    acc.update([(2, 2)] * 30, cap=2)  # the policy capped at 2: positions 3, 4 were not tried
    assert acc.accepted[2:] == [0.125, 0.0625] and acc.accepted[1] > 0.9
    acc.update([(2, 2)] * 200, cap=4)  # the confidence rule stopped at 2 under cap 4: they do not pay
    assert acc.accepted[2] < 0.05 and acc.proposed[2] < 0.05


def test_summary_shows_lookup_acceptance_only_once_measured():
    p, _ = _flex()
    assert "lookup_accepted_per_position" not in p.summary()
    p.observe(1, lookup_outcomes=[(3, 2, "r")])
    assert p.summary()["lookup_accepted_per_position"][0] > 0.7


def test_step_times_ignore_bursts():
    """Bursts (another process on the cores) only slow steps. Plain step times
    are the lower quartile of the last 16: a burst that fills half the window
    just before drafting starts (batch 4 offline: 33-36 ms, then 8 samples at
    37-48 ms; the median of 8 priced plain steps at 43 ms and drafting stuck at
    0.82x) leaves it at the steady figure; a lasting change moves it within a
    window. Corrections are the median of 8."""
    p = FlexPolicy(mode="off", clock=FakeClock())  # every step plain: each one samples T_off
    p.decide(4)
    for x in [0.034] * 8 + [0.045] * 8:
        p.observe(4, (), step_s=x)
        p.decide(4)
    assert p.t_off[4].value == pytest.approx(0.034)
    for _ in range(13):  # the machine got slower for good
        p.observe(4, (), step_s=0.060)
        p.decide(4)
    assert p.t_off[4].value == pytest.approx(0.060)
    from flexdraft_vllm.vllm_integration.policy import _Recent

    e = _Recent(window=8)
    for x in [1.0] * 5 + [3.0] * 3:
        e.update(x)
    assert e.value == pytest.approx(1.0) and e.n == 8


def test_a_slow_start_does_not_make_drafting_look_cheap():
    """The first plain steps of a server ran 82-84 ms where later ones took
    46-50 (first shapes, the API server's start-up work). Priced at those,
    drafting that loses looks like a gain (the premise, checked first).
    Drafting waits for `min_plain` plain steps and plain steps are priced at
    their lower quartile, so two slow first steps start no drafting."""
    t = COST_CPU.step_s("off", 1) * 1.5  # the true plain step

    def policy():
        p, clock = _flex(cost=COST_CPU, allow_parallel=False)
        p.acceptance = Acceptance(7, prior=0.4)
        p.corr[("sequential", None)] = _measured(3.0)  # the draft pass costs 3x what the model says
        return p

    for scale, best in ((1.0, "off"), (1.65, "sequential")):  # the premise
        p = policy()
        p.t_off[1] = _measured(t * scale)
        assert p.predict(1)[0][2].arm == best
    p = policy()
    times = iter([1.78 * t, 1.8 * t] + [t] * 100)
    decisions = []
    for _ in range(16):
        p.observe(1, (), step_s=next(times))
        decisions.append(p.decide(1))
    assert [d.arm for d in decisions[: p.min_plain]] == ["off"] * p.min_plain  # measure first
    assert all(d.arm == "off" or d.probe for d in decisions)
    assert p.t_off[1].value == pytest.approx(t)


def test_an_unmeasured_drafting_arm_borrows_the_other_arms_correction():
    """Overheads the model cannot see are the same code in both drafting arms:
    until parallel mode has its own measurements it is priced with sequential's."""
    p, clock = _flex(cost=COST_CPU)
    p.t_off[1] = _measured(COST_CPU.step_s("off", 1) * 1.5)
    p.acceptance.update([(7, 7)] * 20)
    par = lambda: {d.max_drafts: t for _, t, d in p.predict(1) if d.arm == "parallel"}  # noqa: E731
    before = par()
    p.corr[("sequential", None)] = _measured(20.0)  # the draft pass costs 20x what the model says
    after = par()
    _, mask = p._model_extra("parallel", 1, p.acceptance.drafts(3), cap=3)
    assert after[3] - before[3] == pytest.approx(19.0 * mask, rel=1e-6)
    p.corr[("parallel", None)] = _measured(2.0)  # its own figure, once measured, wins
    assert par()[3] - before[3] == pytest.approx(1.0 * mask, rel=1e-6)


def test_a_probe_at_a_large_batch_drafts_for_a_few_requests():
    """A probe only has to sample acceptance: at batch 64 it drafts for
    `probe_requests` of the requests (in turn), so each probe loses a fraction
    of what a full one does (no step that stalls the whole batch: 0.61 s
    against 0.15 s plain on a 2-core CPU), and several times as many fit the
    same budget: as many requests sampled, spread over the run. Its step time
    does not price the whole batch's draft pass (a few blocks' fixed costs
    would make it look dear); its loss is measured as for any probe."""
    def run(probe_requests):
        p, clock = _flex(cost=COST_CPU, allow_parallel=False, probe_requests=probe_requests)
        chosen = Sim(p=0.3, cost=COST_CPU).step(p, clock, 64, 1500)
        probes = [d for d in chosen if d.arm != "off"]
        assert probes and all(d.probe for d in probes)  # drafting loses at batch 64 here
        return p, probes, clock.t

    full, full_probes, full_t = run(64)
    part, part_probes, part_t = run(8)
    assert all(d.requests is None for d in full_probes) and all(d.requests == 8 for d in part_probes)
    assert ("sequential", 64) in full.corr and ("sequential", 64) not in part.corr
    assert 64 in part.probe_loss and 0 < part.probe_loss[64].value < full.probe_loss[64].value / 3
    assert len(part_probes) >= 5 * len(full_probes)  # acceptance measured more often ...
    assert 8 * len(part_probes) >= 0.8 * 64 * len(full_probes)  # ... about as many requests sampled ...
    assert part_t <= full_t * 1.001  # ... for no more time


def test_a_probe_at_a_small_batch_drafts_for_every_request():
    p, clock = _flex(cost=COST_CPU, allow_parallel=False, probe_requests=8)
    probes = [d for d in Sim(p=0.05, cost=COST_CPU).step(p, clock, 4, 600) if d.arm != "off"]
    assert probes and all(d.requests is None for d in probes)


def test_probe_samples_take_every_request_in_turn():
    rows = list(range(10))
    samples = [probe_sample(rows, 4, turn) for turn in range(5)]
    assert samples[:3] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert set().union(*map(set, samples)) == set(rows) and all(len(s) == 4 for s in samples)
    assert probe_sample(rows[:3], 4, 7) == [0, 1, 2]  # fewer rows than the sample: all of them
