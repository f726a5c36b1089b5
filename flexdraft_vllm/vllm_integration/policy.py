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
  time(off)       = T_off[bucket]            measured (lower quartile of recent plain steps)
  time(arm, k)    = T_off + s * verify(n, k) + c[arm] * mask(arm, n, k)

where verify() and mask() are the start-up cost model's weight work of the
extra verify rows and of the mask rows (cost_model.py, measured on this
machine). s prices verify rows as measured (steps that verified only
prompt-lookup drafts; until there are some, 1: the model's own figure),
and c[arm] >= 0 corrects the mask part with what drafting steps actually took
beyond their verify rows (overheads the model does not see: the draft pass's
Python, attention gathers). The two are apart because they scale apart: a
draft pass costs about the same for 1 or 7 drafts, a verify row costs per
row, and one factor over both made every row look as dear as the pass.
Acceptance is a property of the
drafter and the text, not of the batch, and it differs between requests (code
that repeats itself against free chat): it is learned per request, starting
from the estimate over all requests and replaced by the request's own verified
steps after a few of them; a batch is predicted from the mean of its
requests' estimates (at batch 1, exactly the running request's). Step times
are kept per batch bucket (powers of two). The policy picks the best
prediction, so an arm the model shows to lose is never tried at that batch
size, e.g. drafting at a compute-bound batch 64 with a weak drafter.

Prompt-lookup drafts (opt-in, lookup.py) have their own estimates and need no
draft pass: each lookup draft is verified while its expected tokens pay for
its verify row (`lookup_caps`), whatever arm FlexDraft's own drafts take.

Staying current costs little: while drafting wins, every `explore_every`-th
step runs plain (no lookup drafts either) to refresh T_off; while "off" wins,
a sequential probe runs as often as keeps its loss under `probe_budget` of the
time (at most every `probe_every` steps), so acceptance keeps being measured
(a more predictable request or workload is noticed) without a measurable
cost; near break-even that is often. A probe drafts for at most
`probe_requests` of the batch's requests, a different few each time
(`probe_sample`): acceptance needs a sample, not the whole batch, and a full
probe at a large batch is one very slow step (batch 64 on a 2-core CPU:
0.61-0.67 s against 0.14-0.15 s for a plain step, ~3% of a 128-step run
lost in one step that stalls every request; a probe of 8: 0.19-0.22 s).
The loss a probe is charged is the larger
of the predicted one and what past probes at this batch size actually lost
(their step time minus plain steps' time for the same tokens): where the model
misjudges break-even (a draft pass's fixed cost it cannot see), the measured
loss keeps probes rare. Positions past the chosen cap are never verified, so
every `widen_every`-th drafting step and every probe raise the cap by
`widen_by` (`_widened`): a cap too low for the drafter is noticed.

The decision made at step t is scored by the step t+1 it shapes (that step
verifies t's drafts), which is how `observe` attributes measurements.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

from flexdraft_vllm.config import trimmed_block
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
    arm: str  # one of ARMS: how FlexDraft drafts for the next step
    max_drafts: int  # FlexDraft drafts per request at most (0 when arm == "off")
    lookup: bool = True  # prompt-lookup drafts allowed (False: a true plain step, e.g. a T_off refresh)
    probe: bool = False  # drafting only to keep acceptance measured while "off" is predicted to win
    widened: bool = False  # the cap raised past the best one, to measure the positions beyond it
    requests: int | None = None  # FlexDraft drafts for this many of the batch's requests (None: all): a probe's sample


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

    @classmethod
    def shrunk_to(cls, prior: "Acceptance", rate: float, prior_weight: int) -> "Acceptance":
        """A new estimate that starts as `prior` (e.g. one request's estimate
        starting from its source's), worth `prior_weight` outcomes."""
        acc = cls(len(prior.accepted), rate=rate, prior_weight=prior_weight)
        acc.proposed, acc.accepted = list(prior.proposed), list(prior.accepted)
        return acc

    def update(self, outcomes, cap: int | None = None) -> None:
        """outcomes: (drafts proposed, drafts accepted) per request that drafted;
        cap: the verify-length cap they were drafted under. Positions at or past
        the cap say nothing about the drafter (the cap cut them, not the
        confidence rule) and keep their estimate; were they pulled to 0, a cap
        once chosen could never be raised again."""
        for d, a in outcomes:
            if d <= 0:
                continue
            a = min(a, d)
            self.requests += 1
            r = max(self.rate, 1.0 / (self.requests + self.prior_weight))
            for j in range(min(len(self.proposed), cap if cap is not None else len(self.proposed))):
                self.proposed[j] += r * (float(j < d) - self.proposed[j])
                self.accepted[j] += r * (float(j < a) - self.accepted[j])

    def tokens(self, k: int) -> float:
        """Expected tokens per request per step with at most k drafts (bonus included)."""
        return 1.0 + sum(self.accepted[:k])

    def drafts(self, k: int) -> float:
        """Expected drafts verified per request with at most k drafts."""
        return sum(self.proposed[:k])


def probe_sample(rows: list, m: int, turn: int) -> list:
    """The m of `rows` a probe drafts for: a window that moves by m per probe
    (turn = probes so far), so each request is sampled in turn."""
    if m >= len(rows):
        return list(rows)
    start = (turn * m) % len(rows)
    return (rows[start:] + rows[:start])[:m]


def mean_of(estimates: list[Acceptance]) -> Acceptance:
    """The batch's estimate: per-position means of its requests' estimates (so
    tokens(k) and drafts(k) are per-request means over the batch)."""
    if len(estimates) == 1:
        return estimates[0]
    out = Acceptance(len(estimates[0].accepted))
    n = float(len(estimates))
    out.proposed = [sum(col) / n for col in zip(*(e.proposed for e in estimates))]
    out.accepted = [sum(col) / n for col in zip(*(e.accepted for e in estimates))]
    return out


class _Recent:
    """A measured figure: a quantile `q` of its last `window` samples (the
    median for cost corrections and probe losses; a low quantile of more
    samples for plain step times, see below).

    Step times on a shared machine come in bursts: in a 2-core `vllm serve`
    (the API server beside the engine) plain steps at batch 4 took 46-50 ms,
    with runs of ~10 steps at 70-95 ms, and the first two 82-84 ms. A mean
    (the EMA this replaced) keeps a burst sample until enough others dilute
    it; it priced plain steps at 71-82 ms for that server's first hundred
    steps, so drafting (parallel mode included, at 100 ms for 1.5x the
    tokens) looked like a gain. Bursts only ever slow a step, so for plain
    steps a low quantile is the estimate: with the median of 8, a burst that
    filled the window just before drafting started (batch 4 offline: plain
    33-36 ms, 8 samples at 37-48 ms) priced plain steps at 43 ms, and while
    drafting wins plain steps are sampled only every `explore_every` steps,
    so it stuck: drafting ran 82 of 84 steps at 0.82x plain.
    """

    __slots__ = ("window", "q", "samples", "value", "n")

    def __init__(self, window: int = 8, q: float = 0.5):
        self.window, self.q = window, q
        self.samples: list[float] = []
        self.value: float | None = None
        self.n = 0  # samples seen, all of them

    def update(self, x: float) -> None:
        self.samples.append(x)
        if len(self.samples) > self.window:
            del self.samples[0]
        xs = sorted(self.samples)
        pos = self.q * (len(xs) - 1)  # linear interpolation between order statistics
        i = int(pos)
        self.value = xs[i] if i + 1 >= len(xs) else xs[i] + (pos - i) * (xs[i + 1] - xs[i])
        self.n += 1


@dataclass
class _Pending:
    """The last decision, waiting for the step that scores it (see observe)."""
    t0: float  # clock when it was made
    num_reqs: int
    dec: Decision
    drafts: float  # drafts verified per request: forecast, then what was scheduled (drafted)
    masked: int  # requests that ran mask blocks


@dataclass
class FlexPolicy:
    mode: str = "flex"  # flex | sequential | parallel | off
    max_drafts: int = 7
    cost: CostModel | None = None  # required for mode "flex"
    allow_parallel: bool = True  # False where the model cannot host mask rows (compiled graphs)
    max_groups: int | None = None  # cap on G in parallel mode
    explore_every: int = 50  # while drafting wins, every explore_every-th step is plain (refreshes T_off)
    widen_every: int = 8  # every widen_every-th drafting step (the first included) and every probe
    widen_by: int = 2  # ... verifies up to widen_by drafts past the best cap (see _widened)
    probe_every: int = 4  # while off wins, probes at most this often, however cheap they are predicted to be
    probe_budget: float = 0.01
    probe_requests: int = 8  # a probe drafts for at most this many requests (see probe_sample)
    replan_every: int = 8  # steps a ranking is reused while nothing was verified (keeps "off" steps cheap)
    window: int = 8  # samples behind each measured correction and probe loss (their median)
    plain_window: int = 16  # plain step times: the last 16 ...
    plain_q: float = 0.25  # ... at their lower quartile (bursts only slow steps)
    min_plain: int = 4  # plain steps measured at a batch size before anything else runs there
    request_rate: float = 0.1  # a request's own estimate: EMA over ~1/request_rate of its verified steps
    request_prior: int = 4  # ... starting from its source's estimate, worth this many of its outcomes
    clock: callable = time.perf_counter
    acceptance: Acceptance | None = None  # FlexDraft's drafts, over all requests
    lookup: Acceptance | None = None  # prompt-lookup drafts, over all requests
    per_request: dict = field(default_factory=dict)  # (source, request id) -> Acceptance
    t_off: dict = field(default_factory=dict)  # bucket -> _Recent plain step seconds
    corr: dict = field(default_factory=dict)  # (arm, bucket or None) -> _Recent measured/modelled extra time
    probe_loss: dict = field(default_factory=dict)  # bucket -> _Recent seconds a probe lost against plain steps
    steps: int = 0
    chosen: dict = field(default_factory=lambda: {a: 0 for a in ARMS})
    _since_draft: int = 0
    _drafting: int = 0  # drafting decisions taken (paces widened caps)
    _last: _Pending | None = None
    _plans: dict = field(default_factory=dict)  # num_reqs -> (step, version, ranking)
    _live: tuple = ()  # the request ids of the last decision
    _version: int = 0  # bumped when an estimate or the live set changes (invalidates _plans, _est)
    _est: tuple | None = None  # (_version, the live batch's estimate)
    _lookup_caps: dict = field(default_factory=dict)  # request id -> the lookup cap of its pending drafts

    def __post_init__(self):
        if self.mode == "flex" and self.cost is None:
            raise ValueError("the flex policy needs a cost model")
        if self.acceptance is None:
            self.acceptance = Acceptance(self.max_drafts)
        if self.lookup is None:
            self.lookup = Acceptance(self.max_drafts, prior=0.7)

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(a for a in DRAFTING if a != "parallel" or self.allow_parallel)

    # ---- measurements -----------------------------------------------------------------
    def observe(self, tokens_emitted: int, outcomes=(), step_s: float | None = None, lookup_outcomes=()) -> None:
        """Score the previous decision with the step that just finished.

        outcomes: (proposed, accepted) FlexDraft drafts per request that the
          finished step verified, optionally (proposed, accepted, request id):
          with the id the request's own estimate learns too.
        lookup_outcomes: the same for prompt-lookup drafts (their own estimates).
        step_s: what the decision cost, measured by the engine: the busy time of
          the step that just finished (forward + sampling) plus the draft pass
          that followed the decision. None: wall time since the decision (this
          object's clock). NaN: not a like-for-like decode step (it carried
          prefill chunks): its outcomes count, its time does not. Wall time
          would also count idle gaps between requests, which in a server made
          "plain step" estimates seconds long.
        """
        now = self.clock()
        cap = self._last.dec.max_drafts if self._last is not None and self._last.dec.arm != "off" else None
        self._learn("draft", self.acceptance, outcomes, lambda rid: cap)
        self._learn("lookup", self.lookup, lookup_outcomes, self._lookup_caps.get)
        self._lookup_caps = {}
        if self._last is not None and tokens_emitted > 0:
            last = self._last
            t0, n, dec, d, masked = last.t0, last.num_reqs, last.dec, last.drafts, last.masked
            dt, b = (now - t0) if step_s is None else step_s, bucket_of(n)
            if dt > 0 and dec.probe and b in self.t_off:
                # what the probe cost beyond plain steps emitting the same tokens
                lost = dt - self.t_off[b].value * tokens_emitted / max(n, 1)
                self.probe_loss.setdefault(b, _Recent(self.window)).update(lost)
            if dt > 0 and dec.arm == "off" and d == 0:  # a true plain step (no lookup drafts either)
                self.t_off.setdefault(b, _Recent(self.plain_window, self.plain_q)).update(dt)
            elif (dt > 0 and self.cost is not None and b in self.t_off and (masked > 0 or dec.arm == "off")
                  and dec.requests is None):
                # an "off" step that verified lookup drafts prices verify rows; a
                # drafting step, what its mask rows cost beyond its verify rows. Not a
                # probe of a few requests: a draft pass's fixed cost (Python per layer)
                # over a few blocks would make the whole batch's pass look dear
                verify, mask = self._model_extra(dec.arm, n, d, masked, dec.max_drafts)
                if dec.arm == "off":
                    arm, extra, paid = "lookup", verify, 0.0
                else:
                    arm, extra, paid = dec.arm, mask, self._row_scale(b, n) * verify
                if extra > 0:
                    ratio = min(max((dt - self.t_off[b].value - paid) / extra, 0.1), 50.0)
                    for key in ((arm, b), (arm, None)):
                        self.corr.setdefault(key, _Recent(self.window)).update(ratio)
        self._last = None

    def _learn(self, source: str, overall: Acceptance, outcomes, cap_of) -> None:
        """cap_of(request id or None): the cap the request's drafts were made under.

        The overall estimate is where a new request starts, so it learns from
        each request's first `request_prior` outcomes only: requests judged
        good keep drafting and poor ones stop after a few, and counting every
        outcome made the start of a new request as optimistic as the good ones
        (at batch 1, first-draft acceptance 0.74 for a 50/50 mix of 0.9 and 0.1)."""
        outcomes = [o for o in outcomes if o[0] > 0]
        if not outcomes:
            return
        for o in outcomes:
            rid = o[2] if len(o) > 2 else None
            cap = cap_of(rid)
            acc = None if rid is None else self.per_request.get((source, rid))
            if acc is None or acc.requests < self.request_prior:
                overall.update([o[:2]], cap)
            if rid is not None:
                if acc is None:
                    acc = self.per_request[(source, rid)] = Acceptance.shrunk_to(overall, self.request_rate,
                                                                                  self.request_prior)
                acc.update([o[:2]], cap)
        self._version += 1

    def drafted(self, drafts: int, masked: int) -> None:
        """What the last decision actually scheduled: `drafts` drafts in all
        (FlexDraft's and prompt lookup's) and `masked` requests that ran mask
        blocks. Its step time is then scored against these, not the forecast."""
        if self._last is not None:
            self._last.drafts, self._last.masked = drafts / max(self._last.num_reqs, 1), masked

    def _model_extra(self, arm: str, n: int, d: float, masked: float | None = None,
                     cap: int | None = None) -> tuple[float, float]:
        """Modelled extra seconds over a plain step: (verify rows, mask rows).
        cap: the decision's verify cap; a mask block is trimmed to cap + 1."""
        groups = min(d + 1.0, self.max_groups or d + 1.0)
        block = None if cap is None else trimmed_block(self.cost.block_size, cap)
        verified = self.cost.step_s("off", n, d)
        return verified - self.cost.step_s("off", n), self.cost.step_s(arm, n, d, groups, masked, block) - verified

    def _corr(self, arm: str, b: int, default: float = 1.0) -> float:
        """What `arm`'s modelled extra time was measured to cost (this batch
        bucket, else any). A drafting arm not yet measured borrows the other
        drafting arm's figure: what the model cannot see (Python per layer and
        per draft slot, attention gathers) is the same code in both, and the
        model's own figure (1) made parallel mode look nearly free on a CPU,
        where its steps took 1.9x a plain step's time for 1.5x the tokens:
        a 2-core `vllm serve` at concurrency 4 chose it from its fourth step
        on, 74 times in its first 300 steps."""
        keys = [(arm, b), (arm, None)]
        if arm in DRAFTING:
            other = next(a for a in DRAFTING if a != arm)
            keys += [(other, b), (other, None)]
        for key in keys:
            e = self.corr.get(key)
            if e is not None and e.n >= 2:
                return e.value
        return default

    def _row_scale(self, b: int, n: int) -> float:
        """Measured / modelled cost of verify rows: learned from steps that verified
        only prompt-lookup drafts; until then 1, the model's own figure: a row's
        weight work is what the model timed, and a step's fixed overheads
        (scheduling, Python) do not grow with its rows (scaling rows as the
        plain step is to its model priced them at twice what they cost here)."""
        return self._corr("lookup", b, 1.0)

    def estimate(self, req_ids=None) -> Acceptance:
        """FlexDraft's acceptance for this batch: the mean of its requests' own
        estimates (a request not yet verified counts with the overall one).
        For the live batch it is kept until an estimate or the batch changes
        (`_version`): a drafting step needs it twice (predict, then decide)."""
        if not req_ids or not self.per_request:
            return self.acceptance
        live = tuple(req_ids) == self._live
        if live and self._est is not None and self._est[0] == self._version:
            return self._est[1]
        acc = mean_of([self.per_request.get(("draft", r), self.acceptance) for r in req_ids])
        if live:
            self._est = (self._version, acc)
        return acc

    def predict(self, num_reqs: int, req_ids=None) -> list[tuple[float, float, Decision]]:
        """(goodput tok/s, step seconds, decision) for every option at this batch, best first."""
        b = bucket_of(num_reqs)
        t0 = self.t_off[b].value
        acc = self.estimate(req_ids)
        out = [(num_reqs / t0, t0, Decision("off", 0))]
        s = self._row_scale(b, num_reqs)
        for arm in self.candidates:
            c = self._corr(arm, b)
            for k in range(1, self.max_drafts + 1):
                verify, mask = self._model_extra(arm, num_reqs, acc.drafts(k), cap=k)
                t = t0 + s * verify + c * mask
                out.append((num_reqs * acc.tokens(k) / t, t, Decision(arm, k)))
        return sorted(out, key=lambda x: -x[0])

    def lookup_caps(self, num_reqs: int, req_ids) -> list[int]:
        """Prompt-lookup drafts worth verifying, per request of req_ids (None: a
        request without an id, judged by the overall estimate): draft j is kept
        while what it is expected to add (its acceptance given it was proposed,
        times the plain step's time per token) pays for its verify row: the cost
        model's row times what lookup's rows were measured to cost against it.
        Lookup drafts need no draft pass, so that row is their whole cost."""
        b = bucket_of(num_reqs)
        if self.mode != "flex" or b not in self.t_off:
            return [self.max_drafts] * len(req_ids)
        per_token = self.t_off[b].value / num_reqs
        row = self.cost.row_s(num_reqs) * self._row_scale(b, num_reqs)  # the same for every request
        caps = []
        for rid in req_ids:
            acc = self.per_request.get(("lookup", rid), self.lookup)
            k = 0
            while k < self.max_drafts and acc.accepted[k] / max(acc.proposed[k], 1e-3) * per_token >= row:
                k += 1
            if rid is not None:
                self._lookup_caps[rid] = k  # scores the outcome under the cap it was drafted with
            caps.append(k)
        return caps

    # ---- decisions ----------------------------------------------------------------------
    def decide(self, num_reqs: int, req_ids=None) -> Decision:
        """The arm and verify-length cap for the next step.

        req_ids: the ids of the num_reqs requests; with them the decision uses
        their own acceptance estimates (and forgets requests that left)."""
        self.steps += 1
        self._since_draft += 1
        if req_ids is not None:
            self._track(tuple(req_ids))
        if self.mode != "flex":
            dec = Decision(self.mode, 0 if self.mode == "off" else self.max_drafts, lookup=self.mode != "off")
        else:
            dec = self._flex(num_reqs, req_ids)
        if dec.arm != "off":
            self._since_draft = 0
        self.chosen[dec.arm] += 1
        m = 0 if dec.arm == "off" else num_reqs if dec.requests is None else dec.requests  # requests drafting
        d = self.estimate(req_ids).drafts(dec.max_drafts) * m / max(num_reqs, 1) if m else 0.0
        self._last = _Pending(self.clock(), num_reqs, dec, d, m)
        return dec

    def _track(self, live: tuple) -> None:
        if live == self._live:
            return
        self._live = live
        self._version += 1
        if len(self.per_request) > 4 * len(live) + 16:  # forget requests that finished
            keep = set(live)
            self.per_request = {k: v for k, v in self.per_request.items() if k[1] in keep}

    def _ranked(self, n: int, req_ids=None) -> list[tuple[float, float, Decision]]:
        """predict(n), reused for up to `replan_every` steps while no draft was
        verified and the batch kept its requests: the inputs then only move by
        EMA noise, and re-ranking 2 arms x k options every step is the largest
        Python cost of an "off" step."""
        hit = self._plans.get(n)
        if hit is not None and self.steps - hit[0] < self.replan_every and hit[1] == self._version:
            return hit[2]
        ranked = self.predict(n, req_ids)
        self._plans[n] = (self.steps, self._version, ranked)
        return ranked

    def _flex(self, n: int, req_ids=None) -> Decision:
        b = bucket_of(n)
        if b not in self.t_off or self.t_off[b].n < self.min_plain:
            return Decision("off", 0, lookup=False)  # measure the baseline first: plain steps are safe
        ranked = self._ranked(n, req_ids)
        t_off = self.t_off[b].value
        best = ranked[0][2]
        if best.arm != "off":
            # drafting wins: now and then a plain step keeps T_off current
            if self.steps % self.explore_every == 0:
                return Decision("off", 0, lookup=False)
            self._drafting += 1
            return self._widened(best) if self._drafting % self.widen_every == 1 else best
        # off wins: probe with the best sequential option, rarely enough that the
        # predicted loss stays under probe_budget of the time (often when it is
        # near break-even, so a request whose drafts do better is noticed)
        probe = next(((g, t, d) for g, t, d in ranked if d.arm == "sequential"), None)
        if probe is None:
            return best
        g_p, t_p, dec = probe
        m = min(n, self.probe_requests)
        # seconds lost vs plain steps emitting the same tokens, as predicted
        loss = t_p * (1.0 - g_p * t_off / n) if m == n else self._probe_loss(n, m, dec.max_drafts, req_ids)
        measured = self.probe_loss.get(b)
        if measured is not None:  # ... and as past probes here lost it
            loss = max(loss, measured.value)
        interval = max(self.probe_every, math.ceil(max(loss, 0.0) / (t_off * self.probe_budget)))
        if self._since_draft < interval:
            return best
        return replace(self._widened(dec), probe=True, requests=m if m < n else None)

    def _probe_loss(self, n: int, m: int, k: int, req_ids=None) -> float:
        """Predicted seconds a sequential step drafting k for m of the n requests
        loses against plain steps emitting the same tokens (for m = n this is
        t * (1 - goodput / plain goodput) of predict()'s option)."""
        b = bucket_of(n)
        t0, acc = self.t_off[b].value, self.estimate(req_ids)
        verify, mask = self._model_extra("sequential", n, acc.drafts(k) * m / n, masked=m, cap=k)
        t = t0 + self._row_scale(b, n) * verify + self._corr("sequential", b) * mask
        return t - t0 * (n + m * (acc.tokens(k) - 1.0)) / n

    def _widened(self, dec: Decision) -> Decision:
        """dec with its cap raised by widen_by (at most max_drafts).

        Positions at or past a cap are never verified, so their estimates keep
        whatever they were (the prior, or a few poor early requests) and the
        cap they argue for never rises: measured at batch 1 with a drafter
        whose second draft is accepted 0.29 of the time, flex kept 0.12 (its
        positions 4-7 still the prior 0.5**j) and capped at 1-2 drafts, 1.0x
        plain, where sequential with all 7 ran 1.4x. A widened step verifies
        the next positions, so each cap is tried against measured figures; it
        costs widen_by verify rows per request on one drafting step in
        widen_every."""
        k = min(self.max_drafts, dec.max_drafts + self.widen_by)
        return replace(dec, max_drafts=k, widened=True) if k > dec.max_drafts else dec

    def summary(self) -> dict:
        acc = self.acceptance
        out = {
            "steps": self.steps,
            "chosen": dict(self.chosen),
            "plain_step_ms": {b: round(e.value * 1e3, 2) for b, e in sorted(self.t_off.items())},
            "cost_correction": {a: round(e.value, 2) for (a, b), e in self.corr.items() if b is None},
            "probe_loss_ms": {b: round(e.value * 1e3, 2) for b, e in sorted(self.probe_loss.items())},
            "tokens_per_request_step": round(acc.tokens(self.max_drafts), 3),
            "accepted_per_position": [round(x, 3) for x in acc.accepted],
        }
        if self.lookup.requests:  # only once lookup drafts were verified (else it is the prior)
            out["lookup_accepted_per_position"] = [round(x, 3) for x in self.lookup.accepted]
        return out
