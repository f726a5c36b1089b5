"""Calibrated rejection sampling for FlexDraft: drafts and their verify length from
calibrated draft logits, then lossless verification against the target.

Two stages, each a launcher with a readable PyTorch reference beside it; the
launchers run Triton on CUDA tensors and the reference elsewhere (_backend rule).

1. `calibrated_drafts(draft_logits, bias, rule, tau, min_conf, max_len)`
     x          = draft_logits + bias (fp32). bias is the "full" calibrator's vocab
                  bias fc2(silu(fc1(cat(embed(bonus), normed)))); the "tied" calibrator
                  folds its correction into the logits (lm_head(normed + c)): bias=None.
     argmax_ids = argmax x (first maximum). NaN logits count as -inf, +inf as the
                  largest float; a row without a finite logit gets id 0, conf 0.
     conf       = max softmax(x) (= 1 / sum exp(x - max x)).
     num_drafts = flexdraft_vllm.reference.confidence.verify_length(conf, ...) exactly:
                  cumprod rule in fp64, min rule in fp32, clamped to [1, min(K, max_len)].
     draft_ids  = argmax_ids with PLACEHOLDER past num_drafts.
   Exact vs the reference: argmax_ids, and num_drafts given the same conf; conf
   itself agrees to fp32 rounding (the kernel's one-pass online sum adds in a
   different order than torch.softmax).

2. `rejection_sample(target_logits, draft_ids, num_drafts, draft_probs, temperature,
   uniforms, exp_noise)` == flexdraft_vllm.reference.sampling.rejection_sample,
   bit for bit, given the same uniforms / noise:
     greedy (temperature <= 0): accept d_i iff d_i == argmax target row i; the
       first mismatch emits the target argmax; all accepted -> argmax of row n.
     random: p = softmax(logits / T) (computed by torch in the launcher, the same
       ops as the reference, so the same bits), accept d_i iff
       u_i * q(d_i) <= p(d_i) in fp64 (q one-hot when draft_probs is None); the
       first rejection emits argmax(r / noise) with r = max(p - q, 0) (r = p when
       that is all zero); all accepted -> bonus argmax(p / noise) of row n.
     PLACEHOLDER pads out; num_emitted = accepted + 1. A draft id outside [0, V)
     is always rejected; argmax follows torch (first NaN, else first maximum) and
     only ever looks at lanes < V, so no output id is ever outside [0, V).
   `generate_random_inputs` draws uniforms / noise, per request from its own
   torch.Generator where one is given (per-request seeds); the kernels only take
   them as inputs, which is what makes kernel == reference exact.

Kernel layout (vLLM v1 rejection sampler style):
  draft_confidence_kernel        grid (N*K,)   one pass over the vocab per draft row
  verify_length_kernel           grid (N,)     K sequential steps per request
  sample_recovered_tokens_kernel grid (N, K+1) the token position i would emit if it
                                               is the first rejection (i < n) or the
                                               bonus (i == n); one vocab pass each
  rejection_sample_kernel        grid (N,)     the sequential accept loop, scalar loads
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from flexdraft_vllm.reference.confidence import draft_confidence, verify_length
from flexdraft_vllm.reference.sampling import PLACEHOLDER, rejection_sample as rejection_sample_ref

from ._backend import next_pow2, want_triton

PLACEHOLDER_TOKEN_ID: tl.constexpr = PLACEHOLDER  # -1: pads draft / output slots
GREEDY_TEMPERATURE: tl.constexpr = 0  # temperature <= this is greedy
NO_INDEX: tl.constexpr = 2**31 - 1  # "no such lane" in index reductions
FLT_MAX: tl.constexpr = 3.4028234663852886e38
RULE_CUMPROD: tl.constexpr = 0
RULE_MIN: tl.constexpr = 1
MAX_BLOCK_V = 8192  # vocab lanes per tile

__all__ = [
    "CalibratedDrafts",
    "PLACEHOLDER",
    "calibrated_drafts",
    "calibrated_drafts_ref",
    "generate_random_inputs",
    "generators_from_seeds",
    "rejection_sample",
    "rejection_sample_ref",
    "verify_length_drafts",
]


class CalibratedDrafts(NamedTuple):
    draft_ids: torch.Tensor  # [N, K] int64, PLACEHOLDER past num_drafts
    num_drafts: torch.Tensor  # [N] int64 in [1, min(K, max_len)] (0 when K == 0)
    conf: torch.Tensor  # [N, K] fp32 max softmax prob of each calibrated draft
    argmax_ids: torch.Tensor  # [N, K] int64 argmax of each calibrated row


# ---- references ----------------------------------------------------------------------------
def calibrated_drafts_ref(
    draft_logits: torch.Tensor,  # [N, K, V] lm_head output of the draft masks
    bias: torch.Tensor | None,  # [N, K, V] calibration vocab bias ("full" calibrator) or None
    rule: str = "cumprod",
    tau: float = 0.01,
    min_conf: float = 0.3,
    max_len: int | None = None,
) -> CalibratedDrafts:
    x = draft_logits.float() if bias is None else draft_logits.float() + bias.float()
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(torch.float32).max, neginf=float("-inf"))
    ids = x.argmax(-1)  # first maximum; all -inf -> 0
    conf = draft_confidence(x)  # 0 for a row with no finite logit
    n = verify_length(conf, rule, tau, min_conf, max_len)
    k = torch.arange(x.shape[1], device=x.device)
    draft_ids = torch.where(k[None, :] < n[:, None], ids, torch.full_like(ids, PLACEHOLDER))
    return CalibratedDrafts(draft_ids, n, conf, ids)


# ---- kernels -------------------------------------------------------------------------------
@triton.jit
def _argmax_update(x, offs, valid, best_val, best_idx, nan_idx):
    # torch.argmax semantics across vocab tiles: the first NaN wins, else the first maximum;
    # only lanes with `valid` (< vocab) are ever candidates.
    is_nan = (x != x) & valid
    nan_idx = tl.minimum(nan_idx, tl.min(tl.where(is_nan, offs, NO_INDEX), axis=0))
    xs = tl.where(valid & (x == x), x, float("-inf"))
    tile_max = tl.max(xs, axis=0)
    tile_idx = tl.min(tl.where(valid & (xs == tile_max), offs, NO_INDEX), axis=0)
    best_idx = tl.where(tile_max > best_val, tile_idx, best_idx)
    best_val = tl.maximum(best_val, tile_max)
    return best_val, best_idx, nan_idx


@triton.jit
def _sanitize_probs(r):
    # torch.nan_to_num(r, nan=0.0).clamp_min(0): NaN -> 0, +inf -> FLT_MAX, negatives -> 0
    r = tl.where(r != r, 0.0, r)
    r = tl.where(r == float("inf"), FLT_MAX, r)
    return tl.where(r < 0.0, 0.0, r)


@triton.jit
def draft_confidence_kernel(
    argmax_ids_ptr,  # [num_rows] int64
    conf_ptr,  # [num_rows] fp32
    logits_ptr,  # [num_rows, V] (row stride stride_l)
    bias_ptr,  # [num_rows, V] (row stride stride_b) or unused
    stride_l,
    stride_b,
    vocab_size,
    HAS_BIAS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.full((), float("-inf"), tl.float32)  # running max
    s = tl.zeros((), tl.float32)  # running sum of exp(x - m)
    best_idx = tl.zeros((), tl.int32)
    for v0 in range(0, vocab_size, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        valid = offs < vocab_size
        x = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf")).to(tl.float32)
        if HAS_BIAS:
            x += tl.load(bias_ptr + row * stride_b + offs, mask=valid, other=0.0).to(tl.float32)
        x = tl.where(valid & (x == x), x, float("-inf"))  # NaN (and lanes >= V) -> -inf
        x = tl.where(x == float("inf"), FLT_MAX, x)
        tile_max = tl.max(x, axis=0)
        tile_idx = tl.min(tl.where(valid & (x == tile_max), offs, NO_INDEX), axis=0)
        best_idx = tl.where(tile_max > m, tile_idx, best_idx)
        m_new = tl.maximum(m, tile_max)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: the sum stays 0
        s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
    conf = tl.where(m == float("-inf"), 0.0, 1.0 / tl.where(s > 0.0, s, 1.0))
    tl.store(argmax_ids_ptr + row, best_idx.to(tl.int64))
    tl.store(conf_ptr + row, conf)


@triton.jit
def verify_length_kernel(
    draft_ids_ptr,  # [N, K] int64 out: argmax ids, PLACEHOLDER past num_drafts
    num_drafts_ptr,  # [N] int64 out
    argmax_ids_ptr,  # [N, K] int64
    conf_ptr,  # [N, K] fp32
    tau_ptr,  # [1] fp64 (a Python float argument would be fp32; the cumprod rule compares in fp64)
    min_conf,  # fp32: torch compares an fp32 conf with a Python float in fp32
    hi,  # upper clamp: min(K, max_len)
    K: tl.constexpr,
    RULE: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    tau = tl.load(tau_ptr)
    prod = tl.full((), 1.0, tl.float64)
    alive = tl.full((), 1, tl.int32)
    n = tl.zeros((), tl.int32)
    for k in tl.static_range(K):
        c = tl.load(conf_ptr + b * K + k)
        if RULE == RULE_CUMPROD:
            prod = prod * c.to(tl.float64)  # sequential, as torch.cumprod on fp64
            keep = prod >= tau
        else:
            keep = c >= min_conf
        alive = alive & keep.to(tl.int32)
        n += alive
    n = tl.minimum(tl.maximum(n, 1), hi)
    for k in tl.static_range(K):
        ids = tl.load(argmax_ids_ptr + b * K + k)
        tl.store(draft_ids_ptr + b * K + k, tl.where(k < n, ids, PLACEHOLDER_TOKEN_ID))
    tl.store(num_drafts_ptr + b, n.to(tl.int64))


@triton.jit
def sample_recovered_tokens_kernel(
    candidate_ids_ptr,  # [N, K+1] int64 out: what position i emits if it is the first rejection / the bonus
    target_logits_ptr,  # [N, K+1, V] (greedy rows: argmax)
    target_probs_ptr,  # [N, K+1, V] fp32 softmax(logits / T) (random rows)
    draft_ids_ptr,  # [N, K]
    draft_probs_ptr,  # [N, K, V] q, or unused when NO_DRAFT_PROBS (one-hot drafts)
    exp_noise_ptr,  # [N, K+1, V] fp32 Exp(1) noise (stride 0 over positions is fine)
    num_drafts_ptr,  # [N] int
    temperature_ptr,  # [N] float
    stride_lb, stride_lk,
    stride_pb, stride_pk,
    stride_db,
    stride_qb, stride_qk,
    stride_nb, stride_nk,
    max_drafts,  # K
    vocab_size,
    NO_DRAFT_PROBS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1)
    nb = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + b).to(tl.int32), 0), max_drafts)
    if pos > nb:  # after the bonus slot: never emitted
        return
    greedy = tl.load(temperature_ptr + b) <= GREEDY_TEMPERATURE
    best_val = tl.full((), float("-inf"), tl.float32)
    best_idx = tl.zeros((), tl.int32)
    nan_idx = tl.full((), NO_INDEX, tl.int32)
    if greedy:
        row = target_logits_ptr + b * stride_lb + pos * stride_lk
        for v0 in range(0, vocab_size, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            valid = offs < vocab_size
            x = tl.load(row + offs, mask=valid, other=float("-inf")).to(tl.float32)
            best_val, best_idx, nan_idx = _argmax_update(x, offs, valid, best_val, best_idx, nan_idx)
        tok = tl.where(nan_idx != NO_INDEX, nan_idx, best_idx)
    else:
        is_draft = pos < nb  # else: the bonus row, sampled from p itself
        d = tl.load(draft_ids_ptr + b * stride_db + pos, mask=is_draft, other=PLACEHOLDER_TOKEN_ID).to(tl.int32)
        p_row = target_probs_ptr + b * stride_pb + pos * stride_pk
        q_row = draft_probs_ptr + b * stride_qb + pos * stride_qk
        n_row = exp_noise_ptr + b * stride_nb + pos * stride_nk
        # argmax of p / noise (the bonus, or the fallback when the residual is all zero) ...
        p_val = tl.full((), float("-inf"), tl.float32)
        p_idx = tl.zeros((), tl.int32)
        p_nan = tl.full((), NO_INDEX, tl.int32)
        # ... and of max(p - q, 0) / noise, with what decides the fallback (resid.sum() <= 0)
        resid_nan = tl.zeros((), tl.int32)
        resid_pos = tl.zeros((), tl.int32)
        for v0 in range(0, vocab_size, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            valid = offs < vocab_size
            p = tl.load(p_row + offs, mask=valid, other=0.0)
            noise = tl.load(n_row + offs, mask=valid, other=1.0)
            vp = tl.math.div_rn(_sanitize_probs(p), noise)  # IEEE division, as torch
            p_val, p_idx, p_nan = _argmax_update(vp, offs, valid, p_val, p_idx, p_nan)
            if is_draft:
                if NO_DRAFT_PROBS:
                    q = tl.where(offs == d, 1.0, 0.0)
                else:
                    q = tl.load(q_row + offs, mask=valid, other=0.0).to(tl.float32)
                r = p - q
                r = tl.where(r < 0.0, 0.0, r)  # clamp_min(0); NaN stays NaN
                resid_nan |= tl.max((valid & (r != r)).to(tl.int32), axis=0)
                resid_pos |= tl.max((valid & (r > 0.0)).to(tl.int32), axis=0)
                vr = tl.math.div_rn(_sanitize_probs(r), noise)
                best_val, best_idx, nan_idx = _argmax_update(vr, offs, valid, best_val, best_idx, nan_idx)
        tok_p = tl.where(p_nan != NO_INDEX, p_nan, p_idx)
        tok_r = tl.where(nan_idx != NO_INDEX, nan_idx, best_idx)
        fallback = (resid_nan == 0) & (resid_pos == 0)  # p == q: the residual is empty, p is exact
        tok = tl.where(is_draft & ~fallback, tok_r, tok_p)
    tl.store(candidate_ids_ptr + b * (max_drafts + 1) + pos, tok.to(tl.int64))


@triton.jit
def rejection_sample_kernel(
    output_ids_ptr,  # [N, K+1] int64, pre-filled with PLACEHOLDER
    num_emitted_ptr,  # [N] int64
    draft_ids_ptr,  # [N, K]
    draft_probs_ptr,  # [N, K, V] or unused when NO_DRAFT_PROBS
    target_probs_ptr,  # [N, K+1, V] fp32 (read at the draft ids only)
    candidate_ids_ptr,  # [N, K+1] int64 from sample_recovered_tokens_kernel
    uniforms_ptr,  # [N, K] fp32 / fp64
    num_drafts_ptr,  # [N] int
    temperature_ptr,  # [N] float
    stride_db,
    stride_qb, stride_qk,
    stride_pb, stride_pk,
    stride_ub,
    max_drafts,  # K
    vocab_size,
    NO_DRAFT_PROBS: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    nb = tl.minimum(tl.maximum(tl.load(num_drafts_ptr + b).to(tl.int32), 0), max_drafts)
    greedy = tl.load(temperature_ptr + b) <= GREEDY_TEMPERATURE
    out_row = output_ids_ptr + b * (max_drafts + 1)
    cand_row = candidate_ids_ptr + b * (max_drafts + 1)
    rejected = False
    emitted = tl.zeros((), tl.int32)
    for pos in range(0, nb):
        if not rejected:
            d = tl.load(draft_ids_ptr + b * stride_db + pos).to(tl.int64)
            valid = (d >= 0) & (d < vocab_size)
            d_safe = tl.where(valid, d, 0)
            cand = tl.load(cand_row + pos)
            if greedy:
                accept = valid & (d == cand)  # cand is the target argmax
            else:
                pd = tl.load(target_probs_ptr + b * stride_pb + pos * stride_pk + d_safe, mask=valid, other=0.0)
                if NO_DRAFT_PROBS:
                    qd = tl.where(valid, 1.0, 0.0).to(tl.float64)
                else:
                    qd = tl.load(draft_probs_ptr + b * stride_qb + pos * stride_qk + d_safe,
                                 mask=valid, other=0.0).to(tl.float32).to(tl.float64)
                u = tl.load(uniforms_ptr + b * stride_ub + pos).to(tl.float64)
                # fp64: the product of two fp32 values is exact, as with the reference's Python floats
                accept = valid & (qd > 0.0) & (u * qd <= pd.to(tl.float64))
            tl.store(out_row + pos, tl.where(accept, d, cand))
            emitted += 1
            rejected = not accept
    if not rejected:  # every draft accepted: the bonus
        tl.store(out_row + nb, tl.load(cand_row + nb))
        emitted += 1
    tl.store(num_emitted_ptr + b, emitted.to(tl.int64))


# ---- launchers -----------------------------------------------------------------------------
def _block_v(vocab: int, block_v: int | None) -> int:
    return block_v if block_v is not None else min(MAX_BLOCK_V, max(16, next_pow2(vocab)))


def verify_length_drafts(
    conf: torch.Tensor,  # [N, K] fp32 confidence of each draft
    argmax_ids: torch.Tensor,  # [N, K] int64 draft ids
    rule: str = "cumprod",
    tau: float = 0.01,
    min_conf: float = 0.3,
    max_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # draft_ids [N, K] (PLACEHOLDER past n), num_drafts [N] int64
    """verify_length_kernel launcher (Triton only: CUDA, or CPU under the interpreter);
    num_drafts == reference.confidence.verify_length(conf, ...) exactly."""
    N, K = conf.shape
    assert argmax_ids.shape == (N, K), "argmax_ids must match conf [N, K]"
    assert conf.dtype == torch.float32 and argmax_ids.dtype == torch.int64, "conf fp32, argmax_ids int64"
    assert rule in ("cumprod", "min"), f"unknown verify rule {rule!r}: use cumprod or min"
    dev = conf.device
    draft_ids = torch.empty_like(argmax_ids)
    n = torch.zeros(N, dtype=torch.int64, device=dev)
    if K == 0 or N == 0:
        return draft_ids, n
    conf, argmax_ids = conf.contiguous(), argmax_ids.contiguous()
    tau_t = torch.full((1,), float(tau), dtype=torch.float64, device=dev)
    hi = K if max_len is None else min(K, int(max_len))
    verify_length_kernel[(N,)](
        draft_ids, n, argmax_ids, conf, tau_t, float(min_conf), hi,
        K=K, RULE=RULE_CUMPROD if rule == "cumprod" else RULE_MIN,
    )
    return draft_ids, n


def calibrated_drafts(
    draft_logits: torch.Tensor,  # [N, K, V] fp32 / fp16 / bf16
    bias: torch.Tensor | None = None,  # [N, K, V] "full" calibrator vocab bias
    rule: str = "cumprod",
    tau: float = 0.01,
    min_conf: float = 0.3,
    max_len: int | None = None,
    *,
    use_triton: bool | None = None,
    block_v: int | None = None,
) -> CalibratedDrafts:
    """Calibrated drafts + confidence verify length; Triton on CUDA, `calibrated_drafts_ref`
    otherwise. No host sync on the Triton path."""
    assert draft_logits.dim() == 3, "draft_logits must be [N, K, V]"
    N, K, V = draft_logits.shape
    assert bias is None or bias.shape == draft_logits.shape, "bias must match draft_logits [N, K, V]"
    assert rule in ("cumprod", "min"), f"unknown verify rule {rule!r}: use cumprod or min"
    tensors = [draft_logits] + ([bias] if bias is not None else [])
    if not want_triton(draft_confidence_kernel, tensors, use_triton):
        return calibrated_drafts_ref(draft_logits, bias, rule, tau, min_conf, max_len)
    dev = draft_logits.device
    ids = torch.empty((N, K), dtype=torch.int64, device=dev)
    conf = torch.empty((N, K), dtype=torch.float32, device=dev)
    if K == 0 or N == 0:
        return CalibratedDrafts(ids.clone(), torch.zeros(N, dtype=torch.int64, device=dev), conf, ids)
    assert V >= 1, "empty vocabulary"
    logits2 = draft_logits.reshape(N * K, V)
    assert logits2.stride(-1) == 1, "draft_logits: last dimension must be contiguous"
    bias2 = logits2  # unused when HAS_BIAS is False
    if bias is not None:
        bias2 = bias.reshape(N * K, V)
        assert bias2.stride(-1) == 1, "bias: last dimension must be contiguous"
    draft_confidence_kernel[(N * K,)](
        ids, conf, logits2, bias2, logits2.stride(0), bias2.stride(0), V,
        HAS_BIAS=bias is not None, BLOCK_V=_block_v(V, block_v), num_warps=8,
    )
    draft_ids, n = verify_length_drafts(conf, ids, rule, tau, min_conf, max_len)
    return CalibratedDrafts(draft_ids, n, conf, ids)


def rejection_sample(
    target_logits: torch.Tensor,  # [N, K+1, V] row i predicts the token after candidate i
    draft_ids: torch.Tensor,  # [N, K] int, PLACEHOLDER-padded
    num_drafts: torch.Tensor,  # [N] int, drafts actually proposed (clamped to [0, K])
    draft_probs: torch.Tensor | None,  # [N, K, V] q; None = one-hot drafts (argmax drafting)
    temperature: torch.Tensor,  # [N] float, <= 0 = greedy
    uniforms: torch.Tensor,  # [N, K] fp32 / fp64
    exp_noise: torch.Tensor,  # [N, K+1, V] fp32 Exp(1) noise; an expanded [N, 1, V] is fine
    *,
    use_triton: bool | None = None,
    all_greedy: bool = False,  # host-known hint: skip the target softmax
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # out [N, K+1] int64 (PLACEHOLDER-padded), num_emitted [N] int64
    """Lossless verification; Triton on CUDA, the reference otherwise. Same contract as
    flexdraft_vllm.reference.sampling.rejection_sample (bit-exact). No host sync."""
    assert target_logits.dim() == 3, "target_logits must be [N, K+1, V]"
    N, K1, V = target_logits.shape
    K = K1 - 1
    assert K >= 0 and V >= 1, "target_logits must have K+1 >= 1 rows per request and V >= 1"
    assert draft_ids.shape == (N, K), "draft_ids must be [N, K]"
    assert num_drafts.shape == (N,) and temperature.shape == (N,), "num_drafts / temperature must be [N]"
    assert draft_probs is None or draft_probs.shape == (N, K, V), "draft_probs must be [N, K, V]"
    assert uniforms.shape == (N, K), "uniforms must be [N, K]"
    assert exp_noise.shape == (N, K1, V), "exp_noise must be [N, K+1, V]"
    assert exp_noise.dtype == torch.float32, "exp_noise must be fp32 (the reference divides in its dtype)"
    tensors = [target_logits, draft_ids, num_drafts, temperature, uniforms, exp_noise]
    if draft_probs is not None:
        tensors.append(draft_probs)
    if not want_triton(rejection_sample_kernel, tensors, use_triton):
        return rejection_sample_ref(target_logits, draft_ids, num_drafts, draft_probs, temperature, uniforms,
                                    exp_noise)
    dev = target_logits.device
    out = torch.full((N, K1), PLACEHOLDER, dtype=torch.int64, device=dev)
    num_emitted = torch.empty(N, dtype=torch.int64, device=dev)
    if N == 0:
        return out, num_emitted
    for name, t in (("target_logits", target_logits), ("exp_noise", exp_noise), ("draft_probs", draft_probs)):
        assert t is None or t.stride(-1) == 1, f"{name}: last dimension must be contiguous"
    if all_greedy:
        probs = target_logits  # never read
    else:
        # exactly the reference's target_probs (same ops, same bits); greedy rows are not read
        t = torch.where(temperature <= 0, torch.ones_like(temperature), temperature)
        probs = torch.softmax(target_logits.float() / t[:, None, None], dim=-1)
    q = draft_probs if draft_probs is not None else probs  # unused when NO_DRAFT_PROBS
    cand = torch.empty((N, K1), dtype=torch.int64, device=dev)
    sample_recovered_tokens_kernel[(N, K1)](
        cand, target_logits, probs, draft_ids, q, exp_noise, num_drafts, temperature,
        target_logits.stride(0), target_logits.stride(1),
        probs.stride(0), probs.stride(1),
        draft_ids.stride(0),
        q.stride(0), q.stride(1),
        exp_noise.stride(0), exp_noise.stride(1),
        K, V,
        NO_DRAFT_PROBS=draft_probs is None, BLOCK_V=_block_v(V, block_v), num_warps=8,
    )
    rejection_sample_kernel[(N,)](
        out, num_emitted, draft_ids, q, probs, cand, uniforms, num_drafts, temperature,
        draft_ids.stride(0),
        q.stride(0), q.stride(1),
        probs.stride(0), probs.stride(1),
        uniforms.stride(0),
        K, V,
        NO_DRAFT_PROBS=draft_probs is None,
    )
    return out, num_emitted


# ---- randomness ----------------------------------------------------------------------------
def generators_from_seeds(seeds: list[int | None], device: torch.device | str) -> dict[int, torch.Generator]:
    """{request index: generator} for the requests that carry a seed (vLLM's `generators`)."""
    return {i: torch.Generator(device=device).manual_seed(int(s)) for i, s in enumerate(seeds) if s is not None}


def generate_random_inputs(
    num_reqs: int,
    max_drafts: int,  # K
    vocab_size: int,
    generators: dict[int, torch.Generator] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:  # uniforms [N, K] fp64, exp_noise [N, K+1, V] fp32
    """Uniforms and Exp(1) noise for `rejection_sample`; requests with a generator draw
    from it (their K uniforms, then their V noise values), the rest from the global RNG.

    fp64 uniforms (as vLLM): an fp32 uniform is exactly 0.0 often enough to matter. One
    noise row per request, expanded over the K+1 positions: a request samples at most
    one position (its first rejection or its bonus), so sharing the row is still exact
    sampling and costs V instead of (K+1)*V random numbers.
    """
    uniforms = torch.rand((num_reqs, max_drafts), dtype=torch.float64, device=device)
    noise = torch.empty((num_reqs, vocab_size), dtype=torch.float32, device=device).exponential_()
    for i, g in (generators or {}).items():
        uniforms[i].uniform_(generator=g)
        noise[i].exponential_(generator=g)
    return uniforms, noise[:, None, :].expand(num_reqs, max_drafts + 1, vocab_size)
