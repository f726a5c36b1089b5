"""Parallel mode's bookkeeping: which groups a step carries and which one a
request's outcome picks (the math of the groups is the drafter's, tested
against the reference in tests/e2e)."""

from __future__ import annotations

import numpy as np

from flexdraft_vllm.vllm_integration.parallel import pick_groups, plan_groups


def _plan(**kw):
    args = dict(num_computed=np.array([100, 40, 7, 0, 50]),
                num_scheduled=np.array([4, 1, 5, 16, 0]),
                num_drafts=np.array([3, 0, 0, 0, 0]),
                num_prompt=np.array([20, 30, 12, 32, 10]),
                max_model_len=1024)
    args.update(kw)
    return plan_groups(**args)


def test_groups_sit_on_every_possible_next_bonus():
    p = _plan()
    # row 0 decodes with 3 drafts: candidates at 100..103, next bonus at 101..104
    # row 1 decodes without drafts; row 2 finishes its prompt (7+5 = 12);
    # row 3 is a partial prefill chunk (16 < 32) and row 4 is not scheduled
    assert p.rows == [0, 1, 2] and p.num_groups == [4, 1, 1] and p.max_groups == 4
    # padding groups repeat the request's last real group
    assert p.group_ctx.tolist() == [[101, 102, 103, 104], [41, 41, 41, 41], [12, 12, 12, 12]]


def test_cap_and_max_model_len():
    p = _plan(max_groups=2)
    assert p.num_groups == [2, 1, 1] and p.group_ctx.tolist()[0] == [101, 102]
    p = _plan(max_model_len=42)  # row 0 (bonus at 101+) has no room, row 1's bonus at 41 neither
    assert p.rows == [2]
    assert _plan(num_scheduled=np.zeros(5, dtype=int)) is None


def test_the_outcome_picks_group_a():
    p = _plan(max_groups=3)
    sampled = [[5, 6], [7], [], [9], []]  # row 0 accepted 1 draft; row 2 was discarded
    rows, groups = pick_groups(p, sampled)
    assert rows == [0, 1] and groups == [1, 3]  # flat index n * Gmax + a, Gmax = 3
    assert p.group_ctx.reshape(-1)[groups[0]] == 100 + 1 + 1  # slot 0 on the new bonus (position 102)
    rows, _ = pick_groups(p, [[1, 2, 3, 4], [7], [8], [], []])  # accepted 3 > capped G-1 = 2
    assert rows == [1, 2]
