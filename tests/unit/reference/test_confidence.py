"""reference/confidence.py: verification length from draft confidence."""

from __future__ import annotations

import pytest
import torch

from flexdraft_vllm.reference.confidence import VerifyCut, draft_confidence, verify_length


def brute(conf_row, rule, tau, min_conf, max_len):
    K = len(conf_row)
    if K == 0:
        return 0
    n, prod = 0, 1.0
    for p in conf_row:
        if rule == "cumprod":
            prod *= p
            if prod < tau:
                break
        elif p < min_conf:
            break
        n += 1
    hi = K if max_len is None else min(K, max_len)
    return max(1, min(n, hi))


def test_cumprod_rule_examples():
    conf = torch.tensor([
        [0.9, 0.9, 0.9, 0.9],  # products .9 .81 .729 .6561 -> all 4 kept at tau .5
        [0.9, 0.5, 0.99, 0.99],  # .9 .45 -> 1
        [0.3, 0.99, 0.99, 0.99],  # .3 < .5 -> 0 kept -> clamped to 1
        [0.8, 0.8, 0.8, 0.1],  # .8 .64 .512 .0512 -> 3
    ])
    assert verify_length(conf, "cumprod", tau=0.5).tolist() == [4, 1, 1, 3]


def test_cumprod_stops_at_first_failure_even_if_later_drafts_are_confident():
    # a prefix rule: once the product falls below tau it never recovers
    conf = torch.tensor([[0.9, 0.01, 1.0, 1.0, 1.0]])
    assert verify_length(conf, "cumprod", tau=0.05).tolist() == [1]


def test_cumprod_boundary_is_inclusive():
    conf = torch.tensor([[0.5, 0.5, 0.5]], dtype=torch.float64)
    assert verify_length(conf, "cumprod", tau=0.25).tolist() == [2]  # .5, .25 kept; .125 not


def test_default_tau_is_the_method_default():
    # tau = 0.01: product .5^6 = .0156 kept, .5^7 = .0078 not
    conf = torch.full((1, 7), 0.5)
    assert verify_length(conf).tolist() == [6]


def test_min_rule_examples():
    conf = torch.tensor([
        [0.9, 0.4, 0.31, 0.3],  # all >= .3 -> 4
        [0.9, 0.29, 0.9, 0.9],  # stops at .29 -> 1
        [0.1, 0.9, 0.9, 0.9],  # first fails -> 0 -> clamp 1
        [0.35, 0.35, 0.2, 0.9],  # 2
    ])
    assert verify_length(conf, "min", min_conf=0.3).tolist() == [4, 1, 1, 2]


def test_rules_differ():
    # many moderately confident drafts: min rule keeps all, cumprod does not
    conf = torch.full((1, 7), 0.5)
    assert verify_length(conf, "min", min_conf=0.4).item() == 7
    assert verify_length(conf, "cumprod", tau=0.1).item() == 3


def test_clamped_to_one_and_to_k():
    conf = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert verify_length(conf, "cumprod", tau=0.01).tolist() == [1, 3]
    assert verify_length(conf, "min", min_conf=0.3).tolist() == [1, 3]
    # tau=0 keeps everything, including zero-confidence drafts
    assert verify_length(conf, "cumprod", tau=0.0).tolist() == [3, 3]


@pytest.mark.parametrize("rule", ["cumprod", "min"])
def test_max_len_caps(rule):
    conf = torch.ones(2, 7)
    assert verify_length(conf, rule, max_len=3).tolist() == [3, 3]
    assert verify_length(conf, rule, max_len=1).tolist() == [1, 1]
    assert verify_length(conf, rule, max_len=100).tolist() == [7, 7]  # a cap above K is K


@pytest.mark.parametrize("rule", ["cumprod", "min"])
def test_no_drafts_gives_zero(rule):
    out = verify_length(torch.empty(3, 0), rule)
    assert out.tolist() == [0, 0, 0] and out.dtype == torch.long


def test_unknown_rule_is_a_clear_error():
    with pytest.raises(ValueError, match="cumprod or min"):
        verify_length(torch.ones(1, 2), "product")


@pytest.mark.parametrize("rule", ["cumprod", "min"])
def test_matches_brute_force_on_random_inputs(rule):
    gen = torch.Generator().manual_seed(0)
    for K in (1, 2, 5, 7):
        conf = torch.rand(64, K, generator=gen) ** 0.3  # skewed to high confidence
        for max_len in (None, 1, 3):
            got = verify_length(conf, rule, tau=0.2, min_conf=0.6, max_len=max_len)
            want = [brute(row.tolist(), rule, 0.2, 0.6, max_len) for row in conf]
            assert got.tolist() == want, (K, max_len)
            assert got.dtype == torch.long


@pytest.mark.parametrize("rule", ["cumprod", "min"])
def test_verify_cut_stops_only_where_nothing_more_would_be_verified(rule):
    """Computing slots only until VerifyCut says stop gives the same verify
    length as computing all of them, and it does stop early."""
    gen = torch.Generator().manual_seed(1)
    early = 0
    for N in (1, 3, 16):
        for max_len in (None, 2, 5):
            conf = torch.rand(N, 7, generator=gen) ** 0.5
            cut = VerifyCut(rule, tau=0.2, min_conf=0.6, max_len=max_len)
            k = next((j + 1 for j in range(7) if cut.push(conf[:, j])), 7)
            want = verify_length(conf, rule, 0.2, 0.6, max_len)
            assert verify_length(conf[:, :k], rule, 0.2, 0.6, max_len).tolist() == want.tolist()
            assert int(want.max()) <= k
            early += k < 7
    assert early >= 5


def test_draft_confidence():
    x = torch.tensor([[0.0, 0.0], [float("nan"), float("nan")], [float("-inf"), 1.0]])
    assert draft_confidence(x).tolist() == [0.5, 0.0, 1.0]
