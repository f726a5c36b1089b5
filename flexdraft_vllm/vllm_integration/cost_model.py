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
  mask_layer_s(R)  one deep layer's weight work for R mask rows (their projectors and
                   the shared MLP, in the draft dtype; default: layer_s)

A step's weight work is then L*layer_s(rows) + head_s(rows) for the real rows,
plus (L - split)*mask_layer_s(mask rows) for mask rows and draft_head_s for
the draft logits. Per-step overheads that are
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
    mask_layer_s: tuple[float, ...] | None = None  # seconds of a deep layer for mask rows (None: layer_s)

    def __post_init__(self):
        assert len(self.rows) >= 2 and list(self.rows) == sorted(self.rows) and self.rows[0] >= 1
        assert len(self.layer_s) == len(self.head_s) == len(self.rows)
        assert self.draft_head_s is None or len(self.draft_head_s) == len(self.rows)
        assert self.mask_layer_s is None or len(self.mask_layer_s) == len(self.rows)

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

    def step_s(self, arm: str, batch: int, drafts: float = 0.0, groups: float = 1.0,
               masked: float | None = None, block: int | None = None) -> float:
        """Modelled weight work of one step of `batch` decoding requests.

        drafts: mean drafts verified per request (0 for "off"); groups: mask
        groups per request riding in the verify forward (parallel only);
        masked: requests that run mask blocks (default: all of them; fewer when
        some took prompt-lookup drafts, which need no draft pass); block: masks
        per block (default block_size; the proposer trims a block to its verify
        cap + 1).
        """
        t = self.forward_s(batch * (1.0 + drafts))
        masked = batch if masked is None else masked
        if arm == "off" or masked <= 0:
            return t
        block = self.block_size if block is None else block
        masks = masked * block * (groups if arm == "parallel" else 1.0)
        draft_head = self.head_s if self.draft_head_s is None else self.draft_head_s
        mask_layer = self.layer_s if self.mask_layer_s is None else self.mask_layer_s
        return t + self.num_deep * self._at(mask_layer, masks) + self._at(draft_head, masked * (block - 1))

    def row_s(self, rows: float) -> float:
        """Weight work one more row adds to a forward of `rows` rows (a verified draft)."""
        return self.forward_s(rows + 1) - self.forward_s(rows)


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
            draft_head_work: Callable[[torch.Tensor], object] | None = None,
            mask_layer_work: Callable[[torch.Tensor], object] | None = None) -> CostModel:
    """Time layer_work / head_work / draft_head_work / mask_layer_work (callables
    over an [R, hidden] tensor; the optional ones default to head_work and
    layer_work) at each R in rows."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    works = {"layer": layer_work, "head": head_work, "draft_head": draft_head_work, "mask_layer": mask_layer_work}
    times: dict[str, list[float]] = {k: [] for k, w in works.items() if w is not None}
    for r in rows:
        x = torch.randn(r, hidden_size, device=device, dtype=dtype) * 0.1
        for name in times:
            def run(x=x, work=works[name]):
                work(x)
                sync()

            times[name].append(_time(run))
    opt = lambda k: tuple(times[k]) if k in times else None  # noqa: E731
    return CostModel(tuple(rows), tuple(times["layer"]), tuple(times["head"]), num_layers, num_deep, block_size,
                     opt("draft_head"), opt("mask_layer"))
