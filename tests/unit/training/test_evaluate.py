"""flexdraft_vllm/training/evaluate.py: aggregation, tables, resume logic
(with a fake runner: no model)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pytest

from flexdraft_vllm.training.evaluate import aggregate, batches_of, cell_key, evaluate, main, markdown_tables


def rec(steps, emitted, out_tokens, acc, prop, mism=(), seconds=1.0):
    return {"steps": steps, "emitted": emitted, "out_tokens": out_tokens, "accepted_per_pos": list(acc),
            "proposed_per_pos": list(prop), "mismatches": list(mism), "seconds": seconds}


def test_aggregate_sums_and_ratios():
    s = aggregate([rec(10, 25, 24, [6, 3], [10, 8]), rec(5, 9, 9, [2, 1, 1], [5, 5, 2], mism=[7])])
    assert (s["steps"], s["emitted"]) == (15, 34)
    assert s["mean_accepted_length"] == pytest.approx(34 / 15)
    assert s["useful_tokens_per_forward"] == pytest.approx(33 / 15)
    assert s["accepted_per_pos"] == [8, 4, 1] and s["proposed_per_pos"] == [15, 13, 2]
    assert s["acceptance_per_pos"] == pytest.approx([8 / 15, 4 / 13, 0.5])
    assert s["mean_drafts_verified"] == pytest.approx(30 / 15)
    assert s["greedy_equal"] is False and s["mismatches"] == [7]
    assert s["seconds"] == 2.0


def test_aggregate_empty_and_equal():
    s = aggregate([])
    assert s["mean_accepted_length"] is None and s["greedy_equal"] is True and s["acceptance_per_pos"] == []
    s = aggregate([rec(4, 4, 4, [0], [4])])
    assert s["mean_accepted_length"] == 1.0 and s["acceptance_per_pos"] == [0.0] and s["greedy_equal"]


def test_batches_of():
    assert batches_of(5, 2) == [(0, 2), (2, 4), (4, 5)]
    assert batches_of(4, 4) == [(0, 4)]
    assert batches_of(0, 3) == []


def _results(cells):
    return {"cells": {cell_key(c["set"], c["mode"], c["max_verify"]): c for c in cells}}


def test_markdown_tables():
    cells = [
        {"set": "chat", "mode": "parallel", "max_verify": 1, "done": True,
         "summary": aggregate([rec(10, 15, 15, [5], [10])])},
        {"set": "chat", "mode": "parallel", "max_verify": 4, "done": False,
         "summary": aggregate([rec(10, 30, 29, [8, 6, 4, 2], [10, 10, 9, 8], mism=[1])])},
        {"set": "humaneval", "mode": "sequential", "max_verify": 4, "done": True,
         "summary": aggregate([rec(8, 24, 24, [7, 5, 3, 1], [8, 8, 8, 8])])},
    ]
    md = markdown_tables(_results(cells))
    lines = md.splitlines()
    header = next(l for l in lines if l.startswith("| prompts | mode | max verify 1"))
    assert header == "| prompts | mode | max verify 1 | max verify 4 |"
    assert "| chat | parallel | 1.50 | 3.00*~ |" in lines  # mismatch and unfinished marks
    assert "| humaneval | sequential |  | 3.00 |" in lines
    assert any(l.startswith("| chat | parallel | 4 | 3.00 | 2.90 | 3.70 | 0.80 | 0.60 | 0.44 | 0.25 | NO (1) |")
               for l in lines), md
    assert any(l.startswith("| chat | parallel | 1 | 1.50 | 1.50 | 1.00 | 0.50 | - | - | - | yes |") for l in lines), md
    assert markdown_tables({"cells": {}}) == "(no finished cells)"


# ---- the evaluation loop with a fake model ----------------------------------------------------------
@dataclass
class FakeStats:
    steps: int
    emitted: int
    accepted_per_pos: list = field(default_factory=list)
    proposed_per_pos: list = field(default_factory=list)


class FakeRunner:
    """Outputs are the prompt reversed; mode 'sequential' with max verify 2
    corrupts request 1's output (to check mismatch recording)."""

    def __init__(self, fail_after: int | None = None):
        self.calls = []
        self.fail_after = fail_after

    def prompts(self, name, n):
        base = 10 if name == "a" else 20
        return [[base + i, i, 1] for i in range(n)]

    def plain(self, prompts):
        self.calls.append(("plain", len(prompts)))
        return [p[::-1] for p in prompts]

    def flexdraft(self, prompts, mode, mv):
        if self.fail_after is not None and sum(c[0] == "flex" for c in self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(("flex", mode, mv, prompts[0][1]))
        outs = [p[::-1] for p in prompts]
        if mode == "sequential" and mv == 2 and prompts[0][1] == 0 and len(outs) > 1:
            outs[1] = outs[1] + [99]
        return outs, FakeStats(steps=2 * len(prompts), emitted=2 * len(prompts) + mv, accepted_per_pos=[1] * mv,
                               proposed_per_pos=[2] * mv)


def test_evaluate_fills_every_cell_and_records_mismatches(tmp_path):
    out = tmp_path / "r.json"
    r = evaluate(FakeRunner(), out, {"x": 1}, ["a", "b"], ["parallel", "sequential"], [1, 2], n=3, batch_size=2)
    assert set(r["cells"]) == {cell_key(s, m, v) for s in "ab" for m in ("parallel", "sequential") for v in (1, 2)}
    assert all(c["done"] for c in r["cells"].values())
    bad = r["cells"]["a/sequential/mv2"]["summary"]
    assert bad["greedy_equal"] is False and bad["mismatches"] == [1]
    good = r["cells"]["a/parallel/mv2"]["summary"]
    assert good["greedy_equal"] and good["steps"] == 6 and good["emitted"] == 6 + 2 * 2
    assert good["acceptance_per_pos"] == [0.5, 0.5]
    assert json.loads(out.read_text()) == r
    assert r["plain"]["a"]["2"] == [1, 2, 12]


def test_evaluate_resumes_per_batch_and_cell(tmp_path):
    out = tmp_path / "r.json"
    first = FakeRunner(fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        evaluate(first, out, {"x": 1}, ["a"], ["parallel", "sequential"], [1, 2], n=3, batch_size=2)
    saved = json.loads(out.read_text())
    assert saved["cells"]["a/parallel/mv1"]["done"] and not saved["cells"]["a/sequential/mv1"]["done"]
    second = FakeRunner()
    r = evaluate(second, out, {"x": 1}, ["a"], ["parallel", "sequential"], [1, 2], n=3, batch_size=2)
    assert ("plain", 2) not in second.calls  # plain outputs reused
    flex = [c for c in second.calls if c[0] == "flex"]
    assert flex == [("flex", "sequential", 1, 2), ("flex", "sequential", 2, 0), ("flex", "sequential", 2, 2)]
    assert all(c["done"] for c in r["cells"].values())
    # a rerun does nothing
    third = FakeRunner()
    evaluate(third, out, {"x": 1}, ["a"], ["parallel", "sequential"], [1, 2], n=3, batch_size=2)
    assert third.calls == []
    # more cells can be added to the same file
    evaluate(third, out, {"x": 1}, ["a"], ["parallel"], [4], n=3, batch_size=2)
    assert [c[2] for c in third.calls if c[0] == "flex"] == [4, 4]


def test_evaluate_refuses_other_settings(tmp_path):
    out = tmp_path / "r.json"
    evaluate(FakeRunner(), out, {"x": 1, "n": 3}, ["a"], ["parallel"], [1], n=3, batch_size=2)
    with pytest.raises(SystemExit, match="n.*--fresh"):
        evaluate(FakeRunner(), out, {"x": 1, "n": 4}, ["a"], ["parallel"], [1], n=4, batch_size=2)
    r = evaluate(FakeRunner(), out, {"x": 1, "n": 4}, ["a"], ["parallel"], [1], n=4, batch_size=2, fresh=True)
    assert r["meta"]["n"] == 4 and len(r["plain"]["a"]) == 4


def test_cli_rejects_bad_mode():
    with pytest.raises(SystemExit, match="flex"):
        main(["--modes", "parallel,flex", "--n", "1"])
