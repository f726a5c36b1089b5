"""Calibrated rejection sampling: Triton kernels (interpreted on CPU) == references.

Verification is compared bit for bit with flexdraft_vllm.reference.sampling.
rejection_sample given the same uniforms / noise; calibration gives the same
argmax ids and, from the kernel's own confidences, exactly reference
verify_length's lengths (the confidences match the reference's to fp32 rounding).
Batches mix greedy and random requests (per-request temperatures), k = 0, 1 and
max, invalid / PLACEHOLDER draft ids, NaN rows, zero rows and the p == q
fallback, over vocab sizes whose last tile is full, nearly empty or nearly full.
"""

from __future__ import annotations

import pytest
import torch

from flexdraft_kernels import _backend
from flexdraft_kernels import rejection_sampler as RS
from flexdraft_vllm.reference.confidence import verify_length
from flexdraft_vllm.reference.sampling import PLACEHOLDER

for _k in (RS.draft_confidence_kernel, RS.verify_length_kernel, RS.sample_recovered_tokens_kernel,
           RS.rejection_sample_kernel):
    if not _backend.is_interpreted(_k):  # see conftest.py
        raise RuntimeError("flexdraft_kernels was imported without TRITON_INTERPRET=1: kernels would not run on CPU")

# the interpreter's numpy division warns on x/0 (zero noise is part of the test)
pytestmark = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning", "ignore:invalid value:RuntimeWarning")

VOCABS = [100, 8191, 8193, 49152, 151936]
TEMPS = [0.0, 0.6, 1.0, 1.8]  # cycled over requests: greedy and random mixed


# ---- verification ---------------------------------------------------------------------------
def make_batch(N, K, V, seed, with_draft_probs, specials=True, logits_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    scale = torch.tensor([0.5, 2.0, 6.0])[torch.arange(N) % 3]  # flat .. peaked targets
    logits = (torch.randn(N, K + 1, V, generator=g) * scale[:, None, None]).to(logits_dtype)
    temperature = torch.tensor([TEMPS[(i + seed) % len(TEMPS)] for i in range(N)])
    num_drafts = torch.tensor([min([0, 1, K][i % 3], K) if i < 3 else int(torch.randint(0, K + 1, (1,), generator=g))
                               for i in range(N)])
    if with_draft_probs:
        q_logits = logits[:, :K].float() + torch.randn(N, K, V, generator=g)
        draft_probs = torch.softmax(q_logits, -1)
        pick = draft_probs
    else:
        draft_probs = None
        pick = torch.softmax(logits[:, :K].float(), -1)
    # drafts: mostly sampled (accepted often), some argmax, some junk
    draft_ids = torch.multinomial(pick.reshape(N * K, V), 1, generator=g).view(N, K) if K else \
        torch.empty(N, 0, dtype=torch.long)
    if K:
        junk = torch.rand(N, K, generator=g)
        draft_ids = torch.where(junk < 0.15, logits[:, :K].float().argmax(-1), draft_ids)
        draft_ids = torch.where((junk > 0.9) & (junk < 0.93), torch.full_like(draft_ids, -1), draft_ids)
        draft_ids = torch.where((junk > 0.93) & (junk < 0.96), torch.full_like(draft_ids, V), draft_ids)
        draft_ids = torch.where(junk > 0.96, torch.full_like(draft_ids, V + 12345), draft_ids)
        # past num_drafts: PLACEHOLDER, as the proposer pads
        k = torch.arange(K)
        draft_ids = torch.where(k[None] < num_drafts[:, None], draft_ids, torch.full_like(draft_ids, PLACEHOLDER))
    uniforms = torch.rand(N, K, generator=g, dtype=torch.float64)
    exp_noise = torch.empty(N, K + 1, V).exponential_(generator=g)
    if specials and N >= 6 and K >= 1:
        logits[4] = float("nan")  # NaN target rows (request 4)
        exp_noise[5, :, :7] = 0.0  # zero noise -> inf / NaN scores (request 5)
        if draft_probs is not None:
            draft_probs[3, 0] = 0.0  # a zero draft row: q(d) = 0 -> rejected
        if N >= 8:  # p == q with p(d) = 0: the residual is empty, fallback to p (request 7, random)
            temperature[7] = 1.0
            num_drafts[7] = max(1, int(num_drafts[7]))
            logits[7, 0, 3] = float("-inf")
            draft_ids[7, 0] = 3
            if draft_probs is not None:
                draft_probs[7, 0] = torch.softmax(logits[7, 0].float(), -1)
    return logits, draft_ids, num_drafts, draft_probs, temperature, uniforms, exp_noise


def check_rejection(batch, block_v=None):
    logits, draft_ids, num_drafts, draft_probs, temperature, uniforms, exp_noise = batch
    V = logits.shape[-1]
    out, n = RS.rejection_sample(*batch, use_triton=True, block_v=block_v)
    ref_out, ref_n = RS.rejection_sample_ref(*batch)
    assert out.dtype == torch.int64 and n.dtype == torch.int64
    assert torch.equal(n, ref_n), (n, ref_n)
    assert torch.equal(out, ref_out), (out, ref_out)
    # structure: n tokens in [0, V), then PLACEHOLDER
    k = torch.arange(out.shape[1])
    filled = k[None] < n[:, None]
    assert ((out >= 0) & (out < V))[filled].all()
    assert (out[~filled] == PLACEHOLDER).all()
    assert ((n >= 1) & (n <= num_drafts.clamp(0, out.shape[1] - 1) + 1)).all()
    return out, n


@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("with_q", [False, True], ids=["onehot", "draft_probs"])
def test_rejection_matches_reference(V, with_q):
    N, K = (8, 4) if V <= 8193 else (6, 3)
    check_rejection(make_batch(N, K, V, seed=V % 97 + with_q, with_draft_probs=with_q))


@pytest.mark.parametrize("K", [0, 1])
@pytest.mark.parametrize("V", [100, 8193])
def test_rejection_k0_k1(K, V):
    for with_q in (False, True):
        check_rejection(make_batch(6, K, V, seed=K + V, with_draft_probs=with_q))


def test_rejection_small_tiles_and_low_precision_logits():
    # many vocab tiles with a ragged tail (100 = 3*32 + 4), bf16 target logits
    check_rejection(make_batch(8, 3, 100, seed=1, with_draft_probs=True, logits_dtype=torch.bfloat16), block_v=32)
    check_rejection(make_batch(8, 3, 100, seed=2, with_draft_probs=False, logits_dtype=torch.float16), block_v=32)


def test_rejection_all_greedy_hint_and_greedy_semantics():
    N, K, V = 6, 3, 100
    batch = list(make_batch(N, K, V, seed=3, with_draft_probs=False, specials=False))
    batch[4] = torch.zeros(N)  # all greedy
    logits, draft_ids, num_drafts = batch[0], batch[1], batch[2]
    argmax = logits.argmax(-1)
    draft_ids[:, :] = argmax[:, :K]  # every draft is the target argmax: all accepted
    draft_ids[1, 1] = (argmax[1, 1] + 1) % V  # ... except request 1's second
    num_drafts[:] = K
    out, n = RS.rejection_sample(*batch, use_triton=True, all_greedy=True)
    assert torch.equal((out, n)[0], RS.rejection_sample_ref(*batch)[0])
    assert n.tolist() == [K + 1, 2] + [K + 1] * (N - 2)
    assert torch.equal(out[0], argmax[0])  # drafts then the bonus = argmax of row K
    assert out[1].tolist() == [int(argmax[1, 0]), int(argmax[1, 1]), -1, -1]


def test_rejection_nan_and_garbage_never_escape_vocab():
    N, K, V = 6, 3, 8193
    g = torch.Generator().manual_seed(9)
    logits = torch.full((N, K + 1, V), float("nan"))
    logits[1] = float("-inf")
    logits[2] = 0.0  # uniform
    logits[3, :, -1] = float("inf")  # +inf in the tail tile
    draft_ids = torch.tensor([[-1, V, 2**40], [0, 1, 2], [V - 1, 5, -7], [V - 1, V - 1, V - 1],
                              [3, 3, 3], [-1, -1, -1]])
    num_drafts = torch.tensor([3, 3, 2, 3, 1, 3])
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.0, 0.0, 2.0])
    for draft_probs in (None, torch.full((N, K, V), float("nan")), torch.zeros(N, K, V)):
        uniforms = torch.rand(N, K, generator=g, dtype=torch.float64)
        noise = torch.empty(N, K + 1, V).exponential_(generator=g)
        check_rejection((logits, draft_ids, num_drafts, draft_probs, temperature, uniforms, noise))


def test_rejection_num_drafts_out_of_range_is_clamped():
    N, K, V = 3, 2, 100
    batch = list(make_batch(N, K, V, seed=4, with_draft_probs=False, specials=False))
    batch[2] = torch.tensor([-3, 7, 2])
    out, n = RS.rejection_sample(*batch, use_triton=True)
    batch[2] = batch[2].clamp(0, K)
    ref_out, ref_n = RS.rejection_sample_ref(*batch)
    assert torch.equal(out, ref_out) and torch.equal(n, ref_n)


def test_per_request_seeds_and_expanded_noise():
    N, K, V = 4, 3, 8191
    seeds = [11, None, 12, 11]
    u1, z1 = RS.generate_random_inputs(N, K, V, RS.generators_from_seeds(seeds, "cpu"))
    u2, z2 = RS.generate_random_inputs(N, K, V, RS.generators_from_seeds(seeds, "cpu"))
    assert u1.dtype == torch.float64 and z1.dtype == torch.float32 and z1.shape == (N, K + 1, V)
    assert z1.stride(1) == 0  # one noise row per request, expanded
    for i in (0, 2, 3):  # seeded rows reproduce; equal seeds give equal draws
        assert torch.equal(u1[i], u2[i]) and torch.equal(z1[i], z2[i])
    assert torch.equal(u1[0], u1[3]) and not torch.equal(u1[0], u1[2])
    assert not torch.equal(z1[1], z2[1])  # the unseeded request uses the global RNG
    batch = list(make_batch(N, K, V, seed=5, with_draft_probs=False, specials=False))
    batch[4] = torch.tensor([1.0, 0.8, 1.3, 1.0])
    batch[5], batch[6] = u1, z1
    out1, _ = check_rejection(tuple(batch))
    batch[5], batch[6] = u2, z2
    out2, _ = check_rejection(tuple(batch))
    assert torch.equal(out1[[0, 2, 3]], out2[[0, 2, 3]])


def test_rejection_dispatch_rule():
    batch = make_batch(4, 2, 100, seed=6, with_draft_probs=False, specials=False)
    out, n = RS.rejection_sample(*batch)  # CPU tensors -> reference
    ref = RS.rejection_sample_ref(*batch)
    assert torch.equal(out, ref[0]) and torch.equal(n, ref[1])


# ---- calibration + verify length ----------------------------------------------------------
def check_calibration(logits, bias, rule="cumprod", tau=0.01, min_conf=0.3, max_len=None, block_v=None):
    got = RS.calibrated_drafts(logits, bias, rule, tau, min_conf, max_len, use_triton=True, block_v=block_v)
    ref = RS.calibrated_drafts_ref(logits, bias, rule, tau, min_conf, max_len)
    N, K, V = logits.shape
    assert torch.equal(got.argmax_ids, ref.argmax_ids)
    assert ((got.argmax_ids >= 0) & (got.argmax_ids < V)).all()
    # conf: the kernel's one-pass sum and torch's softmax add in different orders; judge both
    # against fp64 (on CPU torch's own error reaches ~4e-5 relative at V=151936, the kernel's ~1e-7)
    x = logits.float() if bias is None else logits.float() + bias.float()
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max).double()
    truth = torch.softmax(x, -1).amax(-1).nan_to_num(0.0)
    err_kernel, err_torch = (got.conf.double() - truth).abs(), (ref.conf.double() - truth).abs()
    assert (err_kernel <= 2 * err_torch + 1e-6 * truth + 1e-12).all(), (err_kernel.max(), err_torch.max())
    assert torch.equal(got.num_drafts, verify_length(got.conf, rule, tau, min_conf, max_len))
    assert torch.equal(got.num_drafts, ref.num_drafts)
    assert torch.equal(got.draft_ids, ref.draft_ids)
    return got


@pytest.mark.parametrize("V", VOCABS)
def test_calibration_matches_reference(V):
    N, K = (5, 4) if V <= 8193 else (3, 4)
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(N, K, V, generator=g) * 4
    bias = torch.randn(N, K, V, generator=g)
    logits[0, 1, V // 3] = 50.0  # a confident draft
    logits[1, 0, [2, V - 1]] = 60.0  # a tie across tiles: the first index wins
    logits[2, 2] = float("nan")  # a NaN row: id 0, conf 0
    logits[0, 3, V // 2] = float("nan")  # a NaN inside a row is ignored
    combos = [(None, "cumprod"), (bias, "min")] + ([(None, "min"), (bias, "cumprod")] if V <= 8193 else [])
    for b, rule in combos:
        check_calibration(logits, b, rule, tau=0.05, min_conf=0.1)
    if V <= 8193:
        check_calibration(logits, None, max_len=2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_calibration_low_precision_and_tiles(dtype):
    g = torch.Generator().manual_seed(2)
    logits = (torch.randn(4, 3, 100, generator=g) * 3).to(dtype)
    logits[1, 1, 40] = logits[1, 1, 90] = 30  # tie in different tiles of 32
    logits[2, 0] = float("-inf")  # dead row
    logits[3, 2, 99] = float("inf")  # +inf in the tail tile
    bias = torch.randn(4, 3, 100, generator=g).to(dtype)
    check_calibration(logits, None, block_v=32)
    check_calibration(logits, bias, "min", block_v=32)


@pytest.mark.parametrize("K", [0, 1, 6])
def test_calibration_k(K):
    logits = torch.randn(3, K, 8193, generator=torch.Generator().manual_seed(K)) * 5
    got = check_calibration(logits, None)
    assert got.draft_ids.shape == (3, K)
    if K <= 1:
        assert (got.num_drafts == K).all()
    else:
        assert ((got.num_drafts >= 1) & (got.num_drafts <= K)).all()


def test_verify_length_kernel_exact_at_boundaries():
    f32 = lambda *v: torch.tensor(v, dtype=torch.float32)  # noqa: E731
    conf = torch.stack([
        f32(0.1, 0.1, 0.9, 0.9),  # fp64 product of fp32(0.1)^2 = 0.0100000003 >= 0.01
        f32(0.5, 0.5, 0.5, 0.5),  # exact powers of two: 0.0625 vs tau
        f32(0.7, 0.7, 0.3, 0.9),  # fp32(0.7) >= 0.7 in fp32 (min rule), not in fp64
        f32(0.0, 1.0, 1.0, 1.0),  # first draft hopeless: clamped to 1
        f32(1.0, 1.0, 1.0, 1.0),
        f32(float("nan"), 1.0, 1.0, 1.0),
        f32(0.9, float("nan"), 1.0, 1.0),
    ])
    ids = torch.arange(conf.numel()).view(conf.shape)
    for rule, tau, min_conf in [("cumprod", 0.01, 0.3), ("cumprod", 0.0625, 0.3), ("cumprod", 0.125, 0.3),
                                ("min", 0.01, 0.7), ("min", 0.01, 0.3), ("min", 0.01, 0.0)]:
        for max_len in (None, 1, 2, 4, 9):
            draft_ids, n = RS.verify_length_drafts(conf, ids, rule, tau, min_conf, max_len)
            want = verify_length(conf, rule, tau, min_conf, max_len)
            assert torch.equal(n, want), (rule, tau, min_conf, max_len, n, want)
            k = torch.arange(4)
            assert torch.equal(draft_ids, torch.where(k[None] < n[:, None], ids, torch.full_like(ids, -1)))


def test_calibration_dispatch_rule():
    logits = torch.randn(2, 3, 100)
    got, ref = RS.calibrated_drafts(logits), RS.calibrated_drafts_ref(logits, None)
    assert all(torch.equal(a, b) for a, b in zip(got, ref))


# ---- larger sweep -----------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("seed", range(4))
def test_sweep(V, seed):
    for with_q in (False, True):
        check_rejection(make_batch(12, 6, V, seed=seed * 7 + with_q, with_draft_probs=with_q))
    logits = torch.randn(8, 6, V, generator=torch.Generator().manual_seed(seed)) * (1 + seed)
    check_calibration(logits, None)
    check_calibration(logits, torch.randn_like(logits), "min")
