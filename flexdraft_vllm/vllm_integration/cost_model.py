"""Start-up cost model: what a forward costs on THIS machine, by number of rows.

FlexDraft trades extra rows (drafts to verify, mask rows in the deep layers)
for fewer steps. Whether that pays depends on where the machine turns from
memory-bound (extra rows ride on weight reads the step does anyway) to
compute-bound (every row costs its FLOPs). That knee depends on the device,
the model and the dtype, so it is measured when the engine loads, on the
target's own weights:

  layer_s(R)  one decoder layer's weight work (qkv, o projections, MLP) on R rows
  head_s(R)   the LM head on R rows
  draft_head_s(R)  the draft head on R rows (the LM head, or its draft-vocabulary slice)

A step's weight work is then L*layer_s(rows) + head_s(rows) for the real rows,
plus (L - split)*layer_s(mask rows) for mask rows (their projectors have the
target's shapes) and draft_head_s for the draft logits. Per-step overheads that are
not weight work (scheduler, attention, Python) are not in the model; the
policy learns them online (policy.py). Between measured row counts the model
interpolates linearly; beyond the largest it extrapolates with the last slope
(compute-bound: linear in rows).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

ROWS = (1, 4, 16, 64, 256, 1024)


@dataclass(frozen=True)
class CostModel:
    rows: tuple[int, ...]  # measured row counts, ascending
    layer_s: tuple[float, ...]  # seconds of one layer's weight work for rows[i] rows
    head_s: tuple[float, ...]  # seconds of the LM head for rows[i] rows
    num_layers: int
    num_deep: int  # layers a mask row runs through
    block_size: int  # B mask rows per block
    draft_head_s: tuple[float, ...] | None = None  # seconds of the draft head (None: same as head_s)

    def __post_init__(self):
        assert len(self.rows) >= 2 and list(self.rows) == sorted(self.rows) and self.rows[0] >= 1
        assert len(self.layer_s) == len(self.head_s) == len(self.rows)
        assert self.draft_head_s is None or len(self.draft_head_s) == len(self.rows)

    def _at(self, ys: tuple[float, ...], r: float) -> float:
        if r <= 0:
            return 0.0
        xs = self.rows
        if r <= xs[0]:
            return ys[0]
        for i in range(1, len(xs)):
            if r <= xs[i] or i == len(xs) - 1:
                slope = max(0.0, (ys[i] - ys[i - 1]) / (xs[i] - xs[i - 1]))
                return ys[i - 1] + slope * (r - xs[i - 1])
        raise AssertionError("unreachable")

    def forward_s(self, rows: float) -> float:
        """Weight work of a full forward plus logits over `rows` rows."""
        return self.num_layers * self._at(self.layer_s, rows) + self._at(self.head_s, rows)

    def step_s(self, arm: str, batch: int, drafts: float = 0.0, groups: float = 1.0) -> float:
        """Modelled weight work of one step of `batch` decoding requests.

        drafts: mean drafts verified per request (0 for "off"); groups: mask
        groups per request riding in the verify forward (parallel only).
        """
        t = self.forward_s(batch * (1.0 + drafts))
        if arm == "off":
            return t
        masks = batch * self.block_size * (groups if arm == "parallel" else 1.0)
        draft_head = self.head_s if self.draft_head_s is None else self.draft_head_s
        return t + self.num_deep * self._at(self.layer_s, masks) + self._at(draft_head, batch * (self.block_size - 1))


def _time(fn: Callable[[], object], min_s: float = 0.01, max_reps: int = 20) -> float:
    fn()  # warm-up (allocations, kernel selection)
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_s or reps >= max_reps:
            return dt / reps


@torch.inference_mode()
def measure(layer_work: Callable[[torch.Tensor], object], head_work: Callable[[torch.Tensor], object],
            hidden_size: int, *, num_layers: int, num_deep: int, block_size: int,
            device: torch.device, dtype: torch.dtype, rows: tuple[int, ...] = ROWS,
            draft_head_work: Callable[[torch.Tensor], object] | None = None) -> CostModel:
    """Time layer_work / head_work / draft_head_work (callables over an [R, hidden]
    tensor; no draft_head_work: the draft head is head_work) at each R in rows."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    layer_s, head_s, draft_head_s = [], [], []
    for r in rows:
        x = torch.randn(r, hidden_size, device=device, dtype=dtype) * 0.1

        def run_layer(x=x):
            layer_work(x)
            sync()

        def run_head(x=x):
            head_work(x)
            sync()

        def run_draft_head(x=x):
            draft_head_work(x)
            sync()

        layer_s.append(_time(run_layer))
        head_s.append(_time(run_head))
        if draft_head_work is not None:
            draft_head_s.append(_time(run_draft_head))
    return CostModel(tuple(rows), tuple(layer_s), tuple(head_s), num_layers, num_deep, block_size,
                     tuple(draft_head_s) if draft_head_work is not None else None)
