"""The Flex policy: how to draft for the next step, from a cost model and measurements.

Arms (what the engine does for step t+1, decided when step t's tokens are in):
  parallel    step t+1's verify forward also runs G = n+1 mask groups per
              request through the deep layers; its drafts come out of that
              same forward (one pass over the weights per step)
  sequential  after step t+1's verify, a separate deep-layers-only draft
              pass with one block per request
  off         no drafts: plain decoding
and, for the drafting arms, the verify length cap k (drafts per request; the
confidence rule may trim a request's drafts further).

Predicted goodput (tokens per second) of each (arm, k) at the current batch of
n decoding requests:

  tokens(k)       = n * (1 + sum_{j<=k} P(draft j proposed and accepted))
  time(off)       = T_off[bucket]            measured (EMA of plain steps)
  time(arm, k)    = T_off + c[arm] * (model(arm, n, k) - model(off, n))

where model() is the start-up cost model (cost_model.py: the weight work of
the extra rows, measured on this machine) and c[arm] >= 0 corrects it with
what drafting steps actually took (overheads the model does not see: the
draft pass's Python, attention gathers). Acceptance is learned from every
verified draft, shared by all batch sizes (it is a property of the drafter
and the text, not of the batch); step times are kept per batch bucket (powers
of two). The policy picks the best prediction, so an arm the model shows to
lose is never tried at that batch size, e.g. drafting at a compute-bound
batch 64 with a weak drafter.

Staying current costs little: while drafting wins, every `explore_every`-th
step runs plain to refresh T_off; while "off" wins, a sequential probe runs
at most once per `explore_every` steps and only as often as keeps its
predicted loss under `probe_budget` of the time, so acceptance keeps being
measured (a more predictable workload is noticed) without a measurable cost.

The decision made at step t is scored by the step t+1 it shapes (that step
verifies t's drafts), which is how `observe` attributes measurements.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from flexdraft_vllm.vllm_integration.cost_model import CostModel

ARMS = ("parallel", "sequential", "off")
DRAFTING = ("parallel", "sequential")


def bucket_of(num_reqs: int) -> int:
    b = 1
    while b < num_reqs:
        b *= 2
    return b


@dataclass(frozen=True)
class Decision:
    arm: str  # one of ARMS
    max_drafts: int  # drafts per request at most (0 when arm == "off")


class Acceptance:
    """What a drafting request yields, learned from verified steps (EMA).

    proposed[j]  P(a request that drafted proposed >= j+1 drafts)
    accepted[j]  P(draft j+1 was proposed and accepted)
    Starts from a prior (accepted[j] = prior**(j+1)) worth `prior_weight`
    requests: the first outcomes are averaged in (1/n), so a few drafting steps
    at batch 1 already replace the prior; after that each outcome moves the
    estimate by `rate` (an EMA over ~1/rate requests), so it follows a changing
    workload.
    """

    def __init__(self, max_drafts: int, prior: float = 0.5, rate: float = 0.02, prior_weight: int = 4):
        self.proposed = [1.0] * max_drafts
        self.accepted = [prior ** (j + 1) for j in range(max_drafts)]
        self.rate = rate
        self.prior_weight = prior_weight
        self.requests = 0

    def update(self, outcomes) -> None:
        """outcomes: (drafts proposed, drafts accepted) per request that drafted."""
        for d, a in outcomes:
            if d <= 0:
                continue
            a = min(a, d)
            self.requests += 1
            r = max(self.rate, 1.0 / (self.requests + self.prior_weight))
            for j in range(len(self.proposed)):
                self.proposed[j] += r * (float(j < d) - self.proposed[j])
                self.accepted[j] += r * (float(j < a) - self.accepted[j])

    def tokens(self, k: int) -> float:
        """Expected tokens per request per step with at most k drafts (bonus included)."""
        return 1.0 + sum(self.accepted[:k])

    def drafts(self, k: int) -> float:
        """Expected drafts verified per request with at most k drafts."""
        return sum(self.proposed[:k])


@dataclass
class _Ema:
    value: float | None = None
    n: int = 0

    def update(self, x: float, alpha: float) -> None:
        self.value = x if self.value is None else (1 - alpha) * self.value + alpha * x
        self.n += 1


@dataclass
class FlexPolicy:
    mode: str = "flex"  # flex | sequential | parallel | off
    max_drafts: int = 7
    cost: CostModel | None = None  # required for mode "flex"
    allow_parallel: bool = True  # False where the model cannot host mask rows (compiled graphs)
    max_groups: int | None = None  # cap on G in parallel mode
    explore_every: int = 50
    probe_budget: float = 0.01
    replan_every: int = 8  # steps a ranking is reused while nothing was verified (keeps "off" steps cheap)
    alpha: float = 0.2
    clock: callable = time.perf_counter
    acceptance: Acceptance | None = None
    t_off: dict = field(default_factory=dict)  # bucket -> _Ema of plain step seconds
    corr: dict = field(default_factory=dict)  # (arm, bucket or None) -> _Ema of measured/modelled extra time
    steps: int = 0
    chosen: dict = field(default_factory=lambda: {a: 0 for a in ARMS})
    _since_draft: int = 0
    _last: tuple | None = None  # (time, num_reqs, decision, mean drafts modelled) of the previous decision
    _plans: dict = field(default_factory=dict)  # num_reqs -> (step, acceptance.requests, ranking)

    def __post_init__(self):
        if self.mode == "flex" and self.cost is None:
            raise ValueError("the flex policy needs a cost model")
        if self.acceptance is None:
            self.acceptance = Acceptance(self.max_drafts)

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(a for a in DRAFTING if a != "parallel" or self.allow_parallel)

    # ---- measurements -----------------------------------------------------------------
    def observe(self, tokens_emitted: int, outcomes=(), step_s: float | None = None) -> None:
        """Score the previous decision with the step that just finished.

        outcomes: (proposed, accepted) drafts per request that the finished step verified.
        step_s: what the decision cost, measured by the engine: the busy time of
          the step that just finished (forward + sampling) plus the draft pass
          that followed the decision. None: wall time since the decision (this
          object's clock). NaN: not a like-for-like decode step (it carried
          prefill chunks): its outcomes count, its time does not. Wall time
          would also count idle gaps between requests, which in a server made
          "plain step" estimates seconds long.
        """
        now = self.clock()
        self.acceptance.update(outcomes)
        if self._last is not None and tokens_emitted > 0:
            t0, n, dec, d = self._last
            dt, b = (now - t0) if step_s is None else step_s, bucket_of(n)
            if dt > 0 and dec.arm == "off":
                self.t_off.setdefault(b, _Ema()).update(dt, self.alpha)
            elif dt > 0 and self.cost is not None and b in self.t_off:
                extra = self._model_extra(dec.arm, n, d)
                if extra > 0:
                    ratio = min(max((dt - self.t_off[b].value) / extra, 0.1), 50.0)
                    for key in ((dec.arm, b), (dec.arm, None)):
                        self.corr.setdefault(key, _Ema()).update(ratio, self.alpha)
        self._last = None

    def _model_extra(self, arm: str, n: int, d: float) -> float:
        groups = min(d + 1.0, self.max_groups or d + 1.0)
        return self.cost.step_s(arm, n, d, groups) - self.cost.step_s("off", n)

    def _corr(self, arm: str, b: int) -> float:
        for key in ((arm, b), (arm, None)):
            e = self.corr.get(key)
            if e is not None and e.n >= 2:
                return e.value
        return 1.0

    def predict(self, num_reqs: int) -> list[tuple[float, float, Decision]]:
        """(goodput tok/s, step seconds, decision) for every option at this batch, best first."""
        b = bucket_of(num_reqs)
        t0 = self.t_off[b].value
        out = [(num_reqs / t0, t0, Decision("off", 0))]
        for arm in self.candidates:
            c = self._corr(arm, b)
            for k in range(1, self.max_drafts + 1):
                t = t0 + c * self._model_extra(arm, num_reqs, self.acceptance.drafts(k))
                out.append((num_reqs * self.acceptance.tokens(k) / t, t, Decision(arm, k)))
        return sorted(out, key=lambda x: -x[0])

    # ---- decisions ----------------------------------------------------------------------
    def decide(self, num_reqs: int) -> Decision:
        """The arm and verify-length cap for the next step."""
        self.steps += 1
        self._since_draft += 1
        if self.mode != "flex":
            dec = Decision(self.mode, 0 if self.mode == "off" else self.max_drafts)
        else:
            dec = self._flex(num_reqs)
        if dec.arm != "off":
            self._since_draft = 0
        self.chosen[dec.arm] += 1
        self._last = (self.clock(), num_reqs, dec, self.acceptance.drafts(dec.max_drafts))
        return dec

    def _ranked(self, n: int) -> list[tuple[float, float, Decision]]:
        """predict(n), reused for up to `replan_every` steps while no draft was
        verified: the inputs then only move by EMA noise, and re-ranking 2 arms x
        k options every step is the largest Python cost of an "off" step."""
        hit = self._plans.get(n)
        if hit is not None and self.steps - hit[0] < self.replan_every and hit[1] == self.acceptance.requests:
            return hit[2]
        ranked = self.predict(n)
        self._plans[n] = (self.steps, self.acceptance.requests, ranked)
        return ranked

    def _flex(self, n: int) -> Decision:
        b = bucket_of(n)
        if b not in self.t_off or self.t_off[b].n < 2:
            return Decision("off", 0)  # measure the baseline first: plain steps are safe
        ranked = self._ranked(n)
        g_off, t_off = n / self.t_off[b].value, self.t_off[b].value
        g_best, _, best = ranked[0]
        if best.arm != "off":
            # drafting wins: now and then a plain step keeps T_off current
            return Decision("off", 0) if self.steps % self.explore_every == 0 else best
        # off wins: probe with the best sequential option, rarely enough that the
        # predicted loss stays under probe_budget of the time
        probe = next(((g, t, d) for g, t, d in ranked if d.arm == "sequential"), None)
        if probe is None:
            return best
        g_p, t_p, dec = probe
        loss = t_p * (1.0 - g_p / g_off)  # seconds lost vs plain for the same tokens
        interval = max(self.explore_every, math.ceil(loss / (t_off * self.probe_budget)))
        return dec if self._since_draft >= interval else best

    def summary(self) -> dict:
        acc = self.acceptance
        return {
            "steps": self.steps,
            "chosen": dict(self.chosen),
            "plain_step_ms": {b: round(e.value * 1e3, 2) for b, e in sorted(self.t_off.items())},
            "cost_correction": {a: round(e.value, 2) for (a, b), e in self.corr.items() if b is None},
            "tokens_per_request_step": round(acc.tokens(self.max_drafts), 3),
            "accepted_per_position": [round(x, 3) for x in acc.accepted],
        }
