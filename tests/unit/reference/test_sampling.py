"""reference/sampling.py: greedy semantics and the lossless law of random sampling.

Statistical tests: chi-square goodness of fit (scipy.stats.chisquare) of the
emitted tokens against the exact target law, V = 8, N = 20 000 draws, fixed
seeds (deterministic). A test FAILS if the p-value is below P_MIN = 1e-3.
Bins whose expected count is below 5 are merged into one. The sanity tests
feed the same harness deliberately wrong samplers (recovered token drawn from
p, or from q, instead of the residual max(p - q, 0)) and require p < 1e-3:
the test has the power to see a real bias.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from flexdraft_vllm.reference.sampling import PLACEHOLDER, rejection_sample, target_probs

P_MIN = 1e-3
N = 20_000
V = 8


# ---------------------------------------------------------------------------- helpers
def _call(sampler, logits, ids, nd, q, temp, gen):
    n, k1, v = logits.shape
    uni = torch.rand(n, k1 - 1, generator=gen)
    noise = torch.empty(n, k1, v).exponential_(generator=gen)
    return sampler(logits, ids, nd, q, temp, uni, noise)


def _check_invariants(out, n_out, ids, nd, v):
    pos = torch.arange(out.shape[1])[None]
    m = n_out[:, None]
    assert ((n_out >= 1) & (n_out <= nd + 1)).all()
    emitted = pos < m
    assert ((out >= 0) & (out < v))[emitted].all()
    assert (out[~emitted] == PLACEHOLDER).all()
    is_draft = pos[:, : ids.shape[1]] < m - 1  # emitted drafts are the drafts themselves
    assert (out[:, : ids.shape[1]][is_draft] == ids[is_draft]).all()


def chi2_pvalue(observed_ids: torch.Tensor, expected_p: np.ndarray) -> float:
    """Goodness of fit of integer samples in [0, len(expected_p)) to expected_p."""
    n = observed_ids.numel()
    obs = np.bincount(observed_ids.numpy(), minlength=len(expected_p)).astype(float)
    assert len(obs) == len(expected_p), "emitted a token outside the support"
    exp = np.asarray(expected_p, dtype=float) * n
    impossible = exp == 0
    assert obs[impossible].sum() == 0, "emitted a token of probability 0"
    obs, exp = obs[~impossible], exp[~impossible]
    small = exp < 5
    if small.any():
        obs = np.append(obs[~small], obs[small].sum())
        exp = np.append(exp[~small], exp[small].sum())
    exp = exp * obs.sum() / exp.sum()  # guard rounding of expected_p
    return float(chisquare(obs, exp).pvalue)


def _dirichlet(rng: np.random.Generator, shape, alpha=1.5) -> torch.Tensor:
    *lead, v = shape
    x = rng.dirichlet([alpha] * v, size=tuple(lead) or None)
    return torch.tensor(x, dtype=torch.float32)


def _draw(probs: torch.Tensor, gen) -> torch.Tensor:
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


# ------------------------------------------------------------------ wrong samplers
def _replace_recovered(sampler_dist):
    """A wrong sampler: the real one, but the token emitted at the first
    rejected position is drawn from sampler_dist(p_row, q_row)."""

    def wrong(logits, ids, nd, q, temp, uni, noise):
        out, n_out = rejection_sample(logits, ids, nd, q, temp, uni, noise)
        p = target_probs(logits, temp)
        g = torch.Generator().manual_seed(12345)
        for b in range(out.shape[0]):
            m = int(n_out[b]) - 1  # accepted drafts
            if m < int(nd[b]):  # a rejection happened at position m
                qrow = torch.nn.functional.one_hot(ids[b, m].clamp(0), p.shape[-1]).float() if q is None else q[b, m]
                out[b, m] = int(_draw(sampler_dist(p[b, m], qrow)[None], g)[0])
        return out, n_out

    return wrong


RESAMPLE_FROM_P = _replace_recovered(lambda p, q: p)
RESAMPLE_FROM_Q = _replace_recovered(lambda p, q: q + 1e-9)


# ----------------------------------------------------------------- the harnesses
def first_token_law(sampler, seed, one_hot, temperature=1.0, K=3):
    """Emit one step for N i.i.d. requests; return (first tokens, exact law)."""
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    p_target = _dirichlet(rng, (K + 1, V))  # rows 0..K (row i+1 only used if draft i accepted)
    logits = (p_target.log() * temperature).expand(N, K + 1, V).contiguous()
    q = _dirichlet(rng, (K, V)).expand(N, K, V).contiguous()
    ids = _draw(q.reshape(-1, V), gen).view(N, K)
    nd = torch.randint(0, K + 1, (N,), generator=gen)  # ragged: 0..K drafts, 0 = bonus only
    for b in range(N):
        ids[b, int(nd[b]):] = PLACEHOLDER
    temp = torch.full((N,), temperature)
    out, n_out = _call(sampler, logits, ids, nd, None if one_hot else q, temp, gen)
    return out, n_out, ids, nd, p_target[0].double().numpy()


def two_token_law(sampler, seed, one_hot):
    """A 2-token target law P(t1) = p0, P(t2 | t1) = P1[t1], speculated with
    K = 2 drafts (d1 ~ q0, d2 ~ Q1[d1]); rows that stop after t1 get a second
    step (one draft) for t2. Returns the joint index t1*V + t2 and its law."""
    gen, rng = torch.Generator().manual_seed(seed), np.random.default_rng(seed)
    p0 = _dirichlet(rng, (V,))
    P1 = _dirichlet(rng, (V, V))  # target row after token a
    p_any = _dirichlet(rng, (V,))  # row after d2 (bonus; its token is never examined)
    q0 = _dirichlet(rng, (V,))
    Q1 = _dirichlet(rng, (V, V))  # draft law of d2 given d1

    d1 = _draw(q0.expand(N, V), gen)
    d2 = _draw(Q1[d1], gen)
    logits = torch.stack([p0.expand(N, V), P1[d1], p_any.expand(N, V)], 1).log()
    q = torch.stack([q0.expand(N, V), Q1[d1]], 1)
    ids = torch.stack([d1, d2], 1)
    nd = torch.full((N,), 2)
    temp = torch.ones(N)
    out, n_out = _call(sampler, logits, ids, nd, None if one_hot else q, temp, gen)
    t1, t2 = out[:, 0].clone(), out[:, 1].clone()

    again = n_out < 2  # only t1 came out: one more step from the context [.., t1]
    idx = again.nonzero().squeeze(-1)
    if len(idx):
        a = t1[idx]
        m = len(idx)
        dd = _draw(Q1[a], gen)
        lg = torch.stack([P1[a], p_any.expand(m, V)], 1).log()
        out2, _ = _call(sampler, lg, dd[:, None], torch.ones(m, dtype=torch.long),
                        None if one_hot else Q1[a][:, None], torch.ones(m), gen)
        t2[idx] = out2[:, 0]
    joint = (p0[:, None] * P1).double().numpy().reshape(-1)
    return t1 * V + t2, joint, float(again.float().mean())


# ------------------------------------------------------------------ greedy semantics
def _greedy_logits(argmaxes: list[list[int]], v: int = 10) -> torch.Tensor:
    lg = torch.zeros(len(argmaxes), len(argmaxes[0]), v)
    for b, row in enumerate(argmaxes):
        for i, a in enumerate(row):
            lg[b, i, a] = 5.0
            lg[b, i, (a + 1) % v] = 2.0  # runner-up, a tempting wrong draft
    return lg


def _greedy(lg, ids, nd):
    n, k1, v = lg.shape
    return rejection_sample(lg, torch.tensor(ids), torch.tensor(nd), None, torch.zeros(n),
                            torch.rand(n, k1 - 1), torch.ones(n, k1, v))


def test_greedy_accepted_recovered_bonus():
    lg = _greedy_logits([[3, 4, 5, 6], [3, 4, 5, 6], [3, 4, 5, 6], [1, 1, 1, 1]])
    out, n = _greedy(lg, [[3, 4, 5], [3, 9, 5], [7, 4, 5], [1, 1, 1]], [3, 3, 3, 3])
    assert out.tolist() == [
        [3, 4, 5, 6],  # all accepted + bonus from row 3
        [3, 4, PLACEHOLDER, PLACEHOLDER],  # d2 wrong -> recovered argmax of row 1, then stop
        [3, PLACEHOLDER, PLACEHOLDER, PLACEHOLDER],  # d1 wrong -> recovered = argmax row 0
        [1, 1, 1, 1],
    ]
    assert n.tolist() == [4, 2, 1, 4]


def test_greedy_ragged_num_drafts_and_placeholder_padding():
    lg = _greedy_logits([[2, 3, 4, 5]] * 3)
    out, n = _greedy(lg, [[2, PLACEHOLDER, PLACEHOLDER], [2, 3, PLACEHOLDER], [PLACEHOLDER] * 3], [1, 2, 0])
    # bonus comes from row num_drafts, not from row K
    assert out.tolist() == [[2, 3, -1, -1], [2, 3, 4, -1], [2, -1, -1, -1]]
    assert n.tolist() == [2, 3, 1]


@pytest.mark.parametrize("bad", [-1, -7, 10, 10**6])
def test_out_of_range_draft_is_rejected(bad):
    lg = _greedy_logits([[2, 3, 4]])
    out, n = _greedy(lg, [[2, bad]], [2])
    assert out.tolist() == [[2, 3, PLACEHOLDER]] and n.tolist() == [2]

    # random sampling: also rejected, with and without draft probabilities
    gen = torch.Generator().manual_seed(0)
    for q in (None, torch.full((1, 2, 10), 0.1)):
        for _ in range(20):
            out, n = _call(rejection_sample, lg, torch.tensor([[2, bad]]), torch.tensor([2]),
                           q, torch.ones(1), gen)
            assert int(n[0]) <= 2  # never accepted past the bad draft
            assert 0 <= int(out[0, int(n[0]) - 1]) < 10


def test_nan_rows_emit_in_range_tokens():
    V_ = 10
    lg = torch.randn(4, 3, V_)
    lg[0] = float("nan")  # whole request garbage
    lg[1, 1] = float("nan")  # one row
    lg[2, 0, 3] = float("nan")  # one entry
    ids = torch.tensor([[1, 2], [1, 2], [3, 4], [5, 6]])
    nd = torch.tensor([2, 2, 2, 2])
    for temp in (torch.zeros(4), torch.ones(4), torch.tensor([0.0, 1.0, 0.5, 0.0])):
        gen = torch.Generator().manual_seed(1)
        out, n = _call(rejection_sample, lg, ids, nd, None, temp, gen)
        for b in range(4):
            m = int(n[b])
            assert 1 <= m <= 3
            assert ((out[b, :m] >= 0) & (out[b, :m] < V_)).all(), (temp, out)


def test_greedy_and_random_rows_mix_in_one_batch():
    lg = _greedy_logits([[2, 3, 4]] * 2)
    gen = torch.Generator().manual_seed(0)
    out, n = _call(rejection_sample, lg, torch.tensor([[2, 9], [2, 9]]), torch.tensor([2, 2]), None,
                   torch.tensor([0.0, 1.0]), gen)
    assert out[0].tolist() == [2, 3, PLACEHOLDER]  # greedy row is exact whatever the noise


def test_random_acceptance_rule_uses_given_uniforms():
    # accept iff u * q(d) <= p(d): p(d) = .3, q(d) = .6 -> accepted iff u <= .5
    p = torch.tensor([0.3, 0.7, 0.0, 0.0]).log()
    lg = torch.stack([p, p])[None].expand(2, 2, 4).contiguous()
    q = torch.tensor([0.6, 0.4, 0.0, 0.0]).expand(2, 1, 4).contiguous()
    noise = torch.ones(2, 2, 4)
    out, n = rejection_sample(lg, torch.tensor([[0], [0]]), torch.tensor([1, 1]), q, torch.ones(2),
                              torch.tensor([[0.49], [0.51]]), noise)
    assert n.tolist() == [2, 1]
    assert out[0, 0] == 0
    assert out[1, 0] == 1  # residual max(p - q, 0) = [0, .3, 0, 0]: only token 1 possible


def test_target_probs_temperature():
    lg = torch.tensor([[[1.0, 2.0, 3.0]], [[1.0, 2.0, 3.0]], [[3.0, 2.0, 1.0]]])
    p = target_probs(lg, torch.tensor([1.0, 0.5, 0.0]))
    torch.testing.assert_close(p[0, 0], torch.softmax(lg[0, 0], -1))
    torch.testing.assert_close(p[1, 0], torch.softmax(lg[1, 0] / 0.5, -1))
    assert p[2, 0].tolist() == [1.0, 0.0, 0.0]


# ------------------------------------------------------------- statistical tests
@pytest.mark.parametrize("one_hot,temperature", [(False, 1.0), (True, 1.0), (False, 0.7)],
                         ids=["q-drafts", "one-hot-drafts", "q-drafts-T0.7"])
def test_first_token_follows_target_law(one_hot, temperature):
    out, n_out, ids, nd, law = first_token_law(rejection_sample, seed=7, one_hot=one_hot, temperature=temperature)
    _check_invariants(out, n_out, ids, nd, V)
    pv = chi2_pvalue(out[:, 0], law)
    assert pv >= P_MIN, f"first emitted token deviates from the target law (p={pv:.2e})"


@pytest.mark.parametrize("one_hot", [False, True], ids=["q-drafts", "one-hot-drafts"])
def test_first_two_tokens_follow_target_law(one_hot):
    joint_ids, law, frac_second_step = two_token_law(rejection_sample, seed=11, one_hot=one_hot)
    assert 0.05 < frac_second_step < 0.95  # both paths (accept d1 / reject d1) are exercised
    pv = chi2_pvalue(joint_ids, law)
    assert pv >= P_MIN, f"(t1, t2) deviates from the target law (p={pv:.2e})"


@pytest.mark.parametrize(
    "wrong,one_hot,check_second",
    [(RESAMPLE_FROM_P, False, True), (RESAMPLE_FROM_P, True, False), (RESAMPLE_FROM_Q, False, False)],
    ids=["recover-from-p", "recover-from-p-one-hot", "recover-from-q"],
)
def test_harness_detects_a_wrong_sampler(wrong, one_hot, check_second):
    """Sanity: the same harness, seeds and threshold flag a biased sampler."""
    out, *_rest, law = first_token_law(wrong, seed=7, one_hot=one_hot)
    assert chi2_pvalue(out[:, 0], law) < P_MIN
    if check_second:
        joint_ids, law2, _ = two_token_law(wrong, seed=11, one_hot=one_hot)
        assert chi2_pvalue(joint_ids, law2) < P_MIN


def test_chi2_helper_flags_impossible_tokens():
    with pytest.raises(AssertionError, match="probability 0"):
        chi2_pvalue(torch.tensor([0, 1, 2, 2]), np.array([0.5, 0.5, 0.0]))
    with pytest.raises(AssertionError, match="outside the support"):
        chi2_pvalue(torch.tensor([0, 1, 3]), np.array([0.5, 0.5, 0.0]))
    assert chi2_pvalue(torch.tensor([0] * 90 + [1] * 10), np.array([0.5, 0.5])) < P_MIN
    assert math.isclose(chi2_pvalue(torch.tensor([0, 1] * 50), np.array([0.5, 0.5])), 1.0)
