"""The Flex policy: whether to draft this step, decided from measurements.

FlexDraft only pays when the verify rows ride on weight reads the target does
anyway (memory-bound regime); once the batch is compute-bound, drafting costs
more than it saves. Where that crossover lies depends on the machine, model
and batch composition, so the policy measures it on the running engine
instead of trusting a table:

  * batches are bucketed by number of decoding requests (powers of two);
  * per bucket and arm ("draft" / "off") it keeps an EMA of goodput =
    tokens emitted per second of wall time between consecutive steps;
  * it explores each arm `warmup` steps per bucket, then exploits the better
    arm, re-exploring the other arm every `explore_every` steps (so a changed
    workload is noticed). Cost of exploring ~1/explore_every of steps.

The decision made at step t is scored by the step t+1 it shapes (that step
verifies t's drafts), which is how `observe` attributes measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

ARMS = ("draft", "off")


def bucket_of(num_reqs: int) -> int:
    b = 1
    while b < num_reqs:
        b *= 2
    return b


@dataclass
class _Arm:
    ema: float | None = None
    n: int = 0

    def update(self, x: float, alpha: float) -> None:
        self.ema = x if self.ema is None else (1 - alpha) * self.ema + alpha * x
        self.n += 1


@dataclass
class FlexPolicy:
    mode: str = "flex"  # flex | sequential | parallel | off
    warmup: int = 4
    explore_every: int = 50
    alpha: float = 0.2
    clock: callable = time.perf_counter
    arms: dict = field(default_factory=dict)  # bucket -> {arm: _Arm}
    steps: int = 0
    chosen: dict = field(default_factory=lambda: {a: 0 for a in ARMS})
    _last: tuple | None = None  # (time, bucket, arm) of the previous decision

    def observe(self, tokens_emitted: int) -> None:
        """Score the previous decision with the step that just finished."""
        now = self.clock()
        if self._last is not None:
            t0, bucket, arm = self._last
            dt = now - t0
            if dt > 0 and tokens_emitted > 0:
                self.arms.setdefault(bucket, {a: _Arm() for a in ARMS})[arm].update(tokens_emitted / dt, self.alpha)
        self._last = None

    def decide(self, num_reqs: int) -> str:
        """'draft' or 'off' for the step about to be scheduled."""
        self.steps += 1
        if self.mode == "off":
            arm = "off"
        elif self.mode != "flex":
            arm = "draft"
        else:
            b = bucket_of(num_reqs)
            st = self.arms.setdefault(b, {a: _Arm() for a in ARMS})
            under = [a for a in ARMS if st[a].n < self.warmup]
            if under:
                arm = under[0]
            else:
                best = max(ARMS, key=lambda a: st[a].ema)
                other = "off" if best == "draft" else "draft"
                arm = other if self.steps % self.explore_every == 0 else best
        self.chosen[arm] += 1
        self._last = (self.clock(), bucket_of(num_reqs), arm)
        return arm

    def summary(self) -> dict:
        return {
            "steps": self.steps,
            "chosen": dict(self.chosen),
            "goodput_tok_s": {b: {a: (round(s.ema, 1) if s.ema else None) for a, s in st.items()}
                              for b, st in sorted(self.arms.items())},
        }
