"""The start-up cost model: measured on real matmuls, interpolated between row counts."""

from __future__ import annotations

import pytest
import torch

from flexdraft_vllm.vllm_integration.cost_model import CostModel, measure

MODEL = CostModel(rows=(1, 64, 128, 1024), layer_s=(1e-4, 1e-4, 2e-4, 16e-4), head_s=(1e-4, 1e-4, 2e-4, 16e-4),
                  num_layers=30, num_deep=10, block_size=8)


def test_interpolates_and_extrapolates_with_the_last_slope():
    assert MODEL._at(MODEL.layer_s, 32) == pytest.approx(1e-4)
    assert MODEL._at(MODEL.layer_s, 96) == pytest.approx(1.5e-4)
    assert MODEL._at(MODEL.layer_s, 2048) == pytest.approx(32e-4)
    assert MODEL.forward_s(0) == 0.0 and MODEL.forward_s(1) == pytest.approx(31e-4)


def test_drafting_only_adds_work():
    off = MODEL.step_s("off", 64)
    seq = MODEL.step_s("sequential", 64, 3)
    par = MODEL.step_s("parallel", 64, 3, 4)
    assert off < seq < par
    # sequential: 64*(1+3) real rows + one block of 8 masks per request in the 10 deep layers + 7 draft logits
    expect = 30 * MODEL._at(MODEL.layer_s, 256) + MODEL._at(MODEL.head_s, 256) \
        + 10 * MODEL._at(MODEL.layer_s, 512) + MODEL._at(MODEL.head_s, 448)
    assert seq == pytest.approx(expect)
    # a block trimmed to the verify cap + 1 (3 drafts: 4 masks) costs its own rows only
    trimmed = 30 * MODEL._at(MODEL.layer_s, 256) + MODEL._at(MODEL.head_s, 256) \
        + 10 * MODEL._at(MODEL.layer_s, 256) + MODEL._at(MODEL.head_s, 192)
    assert MODEL.step_s("sequential", 64, 3, block=4) == pytest.approx(trimmed) and trimmed < seq
    assert MODEL.step_s("parallel", 64, 3, 4, block=4) < par


def test_measure_times_the_given_work():
    """Each work runs on [R, hidden] inputs at every R (no timing asserted:
    wall-clock comparisons flake on a loaded CI machine)."""
    w = torch.randn(256, 256)
    seen = {"layer": set(), "head": set()}

    def work(name):
        def f(x):
            seen[name].add(tuple(x.shape))
            return x @ w
        return f

    m = measure(work("layer"), work("head"), 256, num_layers=4, num_deep=2, block_size=4,
                device=torch.device("cpu"), dtype=torch.float32, rows=(1, 64, 2048))
    assert m.rows == (1, 64, 2048) and all(t > 0 for t in m.layer_s + m.head_s)
    assert seen["layer"] == seen["head"] == {(1, 256), (64, 256), (2048, 256)}


def test_rejects_unsorted_rows():
    with pytest.raises(AssertionError):
        CostModel(rows=(4, 1), layer_s=(1.0, 1.0), head_s=(1.0, 1.0), num_layers=1, num_deep=1, block_size=2)


def test_mask_rows_cost_their_own_measured_layer_work():
    """draft_dtype makes a mask row's deep layer cheaper than a real row's: the
    step model must use mask_layer_s for the masks and layer_s for the rest."""
    cheap = CostModel(rows=MODEL.rows, layer_s=MODEL.layer_s, head_s=MODEL.head_s, num_layers=30, num_deep=10,
                      block_size=8, mask_layer_s=tuple(t / 4 for t in MODEL.layer_s))
    masks = 64 * 8
    saved = 10 * (MODEL._at(MODEL.layer_s, masks) - cheap._at(cheap.mask_layer_s, masks))
    assert MODEL.step_s("sequential", 64, 3) - cheap.step_s("sequential", 64, 3) == pytest.approx(saved)
    assert cheap.step_s("off", 64) == MODEL.step_s("off", 64)
    w = torch.randn(64, 64)
    m = measure(lambda x: x @ w, lambda x: x @ w, 64, num_layers=2, num_deep=1, block_size=2,
                device=torch.device("cpu"), dtype=torch.float32, rows=(1, 8), mask_layer_work=lambda x: x @ w)
    assert m.mask_layer_s is not None and len(m.mask_layer_s) == 2 and m.draft_head_s is None
