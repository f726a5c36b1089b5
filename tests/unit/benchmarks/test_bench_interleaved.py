"""benchmarks/interleaved.py: the parts that need no engine (round order, paired
ratios, summary, table, plot, argument checks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "benchmarks"))

import interleaved as il  # noqa: E402


def test_round_order_rotates_every_slot():
    ms = ["plain", "ngram", "flexdraft-flex"]
    orders = [il.round_order(ms, r) for r in range(3)]
    assert orders[0] == ms and orders[1] == ["ngram", "flexdraft-flex", "plain"]
    assert il.round_order(ms, 3) == ms
    for slot in range(3):  # each method takes each slot once in three rounds
        assert sorted(o[slot] for o in orders) == sorted(ms)


def _cell(tok_s, same=True, policy=None):
    c = {"output_tok_s": tok_s, "same_as_plain": same}
    if policy:
        c["policy"] = {"steps": policy}
    return c


def _results(cells, rounds=3, batches=(1, 4), methods=("plain", "flexdraft-flex")):
    return {"kind": il.KIND, "config": {"methods": list(methods), "batches": list(batches), "rounds": rounds},
            "runs": [], "cells": cells}


def test_ratios_are_paired_by_round():
    # plain drifts 100 -> 80 -> 120; flex is 1.1x plain in every round: the pairs see 1.1 each time,
    # while flex's median over plain's median would not
    cells = {}
    for r, p in enumerate((100.0, 80.0, 120.0)):
        cells[il.cell_key(1, r, "plain")] = _cell(p)
        cells[il.cell_key(1, r, "flexdraft-flex")] = _cell(1.1 * p, policy={"parallel": 0, "sequential": 5,
                                                                                      "off": 3})
    xs = il.paired_ratios(cells, "flexdraft-flex", 1, 3)
    assert xs == pytest.approx([1.1, 1.1, 1.1])
    s = il.summarize(_results(cells))
    assert s["flexdraft-flex"][1]["ratio"] == pytest.approx({"median": 1.1, "min": 1.1, "max": 1.1, "rounds": 3})
    assert s["plain"][1]["tok_s"] == 100.0 and s["flexdraft-flex"][1]["policy"] == ["0/5/3"] * 3
    assert 4 not in s["plain"]  # no cells at batch 4 yet


def test_a_round_without_its_plain_cell_gives_no_ratio():
    cells = {il.cell_key(4, 0, "plain"): _cell(50.0), il.cell_key(4, 0, "flexdraft-flex"): _cell(40.0),
             il.cell_key(4, 1, "flexdraft-flex"): _cell(60.0)}  # round 1's plain cell missing (interrupted)
    assert il.paired_ratios(cells, "flexdraft-flex", 4, 3) == pytest.approx([0.8])
    assert il.ratio_summary([]) is None


def test_table_marks_range_and_lossless_failures(tmp_path):
    cells = {il.cell_key(1, 0, "plain"): _cell(100.0), il.cell_key(1, 1, "plain"): _cell(90.0),
             il.cell_key(1, 0, "flexdraft-flex"): _cell(120.0),
             il.cell_key(1, 1, "flexdraft-flex"): _cell(81.0, same=False)}
    res = _results(cells, rounds=2, batches=(1,))
    md = il.markdown(res)
    assert "| 1 | 95.0 | 1.05x [0.90-1.20] * |" in md  # rounds 1.2x and 0.9x; round 1's output differed
    assert il.summarize(res)["flexdraft-flex"][1]["lossless"] is False
    png = il.plot(res, tmp_path)
    assert png is not None and png.stat().st_size > 0


@pytest.mark.parametrize("argv, msg", [(["--methods", "ngram,flexdraft-flex"], "must include plain"),
                                       (["--methods", "plain,suffix"], "suffix methods"),
                                       (["--rounds", "0"], "--rounds")])
def test_bad_arguments_are_refused_before_any_engine(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        il.main(argv)
    assert msg in str(e.value)
