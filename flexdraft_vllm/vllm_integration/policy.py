"""The Flex policy: how to draft for the next step, decided from measurements.

Arms (what the engine does for step t+1, decided when step t's tokens are in):
  parallel    step t+1's verify forward also runs G = n+1 mask groups per
              request through the deep layers; its drafts come out of that
              same forward (one pass over the weights per step)
  sequential  after step t+1's verify, a separate deep-layers-only draft
              pass with one block per request
  off         no drafts: plain decoding

FlexDraft only pays when the extra rows ride on weight reads the target does
anyway (memory-bound regime); once the batch is compute-bound, drafting costs
more than it saves, and parallel's G*B mask rows per request cost more than
sequential's B. Where those crossovers lie depends on the machine, model and
batch composition, so the policy measures them on the running engine instead
of trusting a table:

  * batches are bucketed by number of decoding requests (powers of two);
  * per bucket and arm it keeps an EMA of goodput = tokens emitted per
    second of wall time between consecutive steps;
  * it explores each arm `warmup` steps per bucket, then exploits the best
    arm, re-exploring the others in turn every `explore_every` steps (so a
    changed workload is noticed). Cost of exploring ~1/explore_every of steps.

The decision made at step t is scored by the step t+1 it shapes (that step
verifies t's drafts), which is how `observe` attributes measurements.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

ARMS = ("parallel", "sequential", "off")


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
    allow_parallel: bool = True  # False where the model cannot host mask rows (compiled graphs)
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
                self._bucket(bucket)[arm].update(tokens_emitted / dt, self.alpha)
        self._last = None

    @property
    def candidates(self) -> tuple[str, ...]:
        return tuple(a for a in ARMS if a != "parallel" or self.allow_parallel)

    def _bucket(self, b: int) -> dict:
        return self.arms.setdefault(b, {a: _Arm() for a in self.candidates})

    def decide(self, num_reqs: int) -> str:
        """The arm ('parallel', 'sequential' or 'off') for the next step."""
        self.steps += 1
        if self.mode != "flex":
            arm = self.mode
        else:
            b = bucket_of(num_reqs)
            st = self._bucket(b)
            arms = self.candidates
            under = [a for a in arms if st[a].n < self.warmup]
            if under:
                arm = under[0]
            else:
                best = max(arms, key=lambda a: st[a].ema)
                if self.steps % self.explore_every == 0:
                    others = [a for a in arms if a != best]
                    arm = others[(self.steps // self.explore_every) % len(others)]
                else:
                    arm = best
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
