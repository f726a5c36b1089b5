"""Parallel mode inside vLLM: mask groups ride along the verify forward.

In a step where request r verifies candidates [bonus, d1..dn] (n+1 real rows),
G = n+1 groups of B masks also run through the deep layers of the SAME forward:

  group g     sits at positions ctx_g .. ctx_g+B-1 with ctx_g = start + g + 1
              (start = position of candidate 0), i.e. its slot 0 is where the
              new bonus lands if exactly g drafts are accepted. It attends to
              the paged KV cache [0, ctx_g) - the committed context plus
              candidates 0..g, whose K/V the real rows of this very layer have
              just written - and bidirectionally to its own block.
  after       vLLM verifies; with `a` drafts accepted, group a holds the next
              drafts (slots 1..B-1), calibrated with the new bonus. When G was
              capped below a+1 (max_parallel_groups) no group sits on the new
              bonus and the request takes the sequential pass instead.

The masks' result equals the sequential draft pass run after verification
(same context, same weights): parallel mode only changes WHEN it is computed.
Real rows never see mask rows (masks are a separate stream updated after each
deep layer's real forward), so the target's outputs are untouched (lossless).
Mask K/V live in temporaries; rejected candidates' K/V past ctx_g are masked.

The stream is advanced by forward hooks on the deep decoder layers (module
instances of this engine's model, not patched classes); it needs eager
execution, since a compiled/captured graph would not run Python hooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class GroupPlan:
    """Which requests of a step carry mask groups, and where (CPU numpy/lists).

    Groups are laid out [N, Gmax] (request-major); a request with fewer groups
    repeats its last one as padding, which is computed but never picked."""

    rows: list[int]  # batch row of each request that carries groups (N of them)
    num_groups: list[int]  # G of each request
    group_ctx: np.ndarray  # [N, Gmax] context length ctx_g of each group

    @property
    def max_groups(self) -> int:
        return int(self.group_ctx.shape[1])

    @property
    def num_blocks(self) -> int:
        return int(self.group_ctx.size)


def plan_groups(
    num_computed: np.ndarray,  # [R] tokens already in the KV cache before this step
    num_scheduled: np.ndarray,  # [R] rows of each request in this step (real + drafts)
    num_drafts: np.ndarray,  # [R] drafts n among them (the candidates are the last n+1 rows)
    num_prompt: np.ndarray,  # [R] prompt length
    max_model_len: int,
    max_groups: int | None = None,
) -> GroupPlan | None:
    """Groups for the requests that will have a token sampled this step.

    A request whose prefill chunk stops short of the prompt's end gets nothing
    (its sampled token is discarded); one whose next bonus would leave no room
    for a draft before max_model_len gets nothing either.
    """
    rows, ngroups, first_ctx = [], [], []
    for r in range(len(num_computed)):
        real_end = int(num_computed[r]) + int(num_scheduled[r]) - int(num_drafts[r])  # = position of candidate 0 + 1
        if int(num_scheduled[r]) == 0 or real_end < int(num_prompt[r]) or real_end + 1 >= max_model_len:
            continue
        G = int(num_drafts[r]) + 1
        if max_groups is not None:
            G = min(G, max_groups)
        rows.append(r)
        ngroups.append(G)
        first_ctx.append(real_end)
    if not rows:
        return None
    g = np.arange(max(ngroups))[None, :]
    ctx = np.asarray(first_ctx)[:, None] + np.minimum(g, np.asarray(ngroups)[:, None] - 1)
    return GroupPlan(rows, ngroups, ctx.astype(np.int64))


def pick_groups(plan: GroupPlan, sampled_token_ids: list[list[int]]) -> tuple[list[int], list[int]]:
    """For each planned request with a sampled token: (batch row, flat index
    n * Gmax + a in the stream) of group a, a = drafts accepted this step. A
    request that accepted more drafts than it had groups (max_groups capped G)
    is left out: no group sits on its new bonus, so it needs the sequential
    draft pass."""
    rows, groups = [], []
    for n, (r, G) in enumerate(zip(plan.rows, plan.num_groups)):
        s = sampled_token_ids[r] if r < len(sampled_token_ids) else []
        a = len(s) - 1
        if a < 0 or a >= G:
            continue
        rows.append(r)
        groups.append(n * plan.max_groups + a)
    return rows, groups


class MaskStream:
    """The mask rows of one step, advanced one deep layer at a time."""

    def __init__(self, plan: GroupPlan, block_table: torch.Tensor, h0: torch.Tensor, block_size: int):
        dev = h0.device
        self.plan = plan
        self.block_table = block_table  # [R, max_blocks] this step's rows (read at every layer)
        self.rows = torch.as_tensor(plan.rows, device=dev)  # [N]
        self.ctx = torch.as_tensor(plan.group_ctx, device=dev)  # [N, Gmax]
        flat = self.ctx.reshape(-1)  # [V], V = N * Gmax blocks, request-major
        self.positions = flat[:, None] + torch.arange(block_size, device=dev)[None]  # [V, B]
        self.h = h0.expand(plan.num_blocks, block_size, -1)  # [V, B, hidden]
        self.normed: torch.Tensor | None = None  # [V, B, hidden] after the last deep layer
        self.attend_for = None  # layer -> attend callback (set by the proposer)
