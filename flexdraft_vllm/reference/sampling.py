"""Lossless verification of drafts (reference; the Triton kernel matches it).

Terms (as in vLLM's rejection sampler):
  accepted token  a draft that passed verification and is emitted as is.
  recovered token emitted at the first rejected position, sampled from the
                  residual max(p - q, 0) normalised (greedy: the target argmax).
  bonus token     emitted after the last draft when every draft was accepted,
                  sampled from the target row after the last draft.
Every step emits (accepted drafts) + 1 tokens.

Randomness is passed in, so kernel and reference agree exactly:
  uniforms  [N, K]      draft i accepted iff u_i * q(d_i) <= p(d_i)   (i.e. u < p/q)
  exp_noise [N, K+1, V] Exp(1) noise; sampling from a distribution r is
                        argmax(r / noise) (the exponential-race / Gumbel trick).

Sentinel: PLACEHOLDER (-1) pads unused draft / output slots. A draft id outside
[0, V) is always rejected, so a garbage draft can never be emitted.
"""

from __future__ import annotations

import torch

PLACEHOLDER = -1


def target_probs(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """[N, R, V] probabilities; rows with temperature 0 become one-hot argmax."""
    greedy = temperature <= 0
    t = torch.where(greedy, torch.ones_like(temperature), temperature)
    p = torch.softmax(logits.float() / t[:, None, None], dim=-1)
    if greedy.any():
        onehot = torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        p = torch.where(greedy[:, None, None], onehot, p)
    return p


def _sample(r: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    # rows that are all zero / NaN fall back to argmax of noise-free r -> id 0 at worst, always in range
    r = torch.nan_to_num(r, nan=0.0).clamp_min(0)
    return (r / noise).argmax(-1)


def rejection_sample(
    target_logits: torch.Tensor,  # [N, K+1, V] row i predicts the token after candidate i
    draft_ids: torch.Tensor,  # [N, K] int, PLACEHOLDER-padded
    num_drafts: torch.Tensor,  # [N] int, drafts actually proposed (<= K)
    draft_probs: torch.Tensor | None,  # [N, K, V] q; None = one-hot drafts (greedy drafting)
    temperature: torch.Tensor,  # [N] float, 0 = greedy
    uniforms: torch.Tensor,  # [N, K]
    exp_noise: torch.Tensor,  # [N, K+1, V]
) -> tuple[torch.Tensor, torch.Tensor]:  # out [N, K+1] (PLACEHOLDER-padded), num_emitted [N]
    N, K1, V = target_logits.shape
    K = K1 - 1
    p = target_probs(target_logits, temperature)
    greedy = temperature <= 0
    out = torch.full((N, K1), PLACEHOLDER, dtype=torch.long, device=target_logits.device)
    n_out = torch.zeros(N, dtype=torch.long, device=target_logits.device)
    for b in range(N):
        nb = int(num_drafts[b])
        for i in range(nb + 1):
            if i == nb:  # all drafts accepted: bonus
                tok = int(p[b, i].argmax()) if greedy[b] else int(_sample(p[b, i], exp_noise[b, i]))
                out[b, i] = tok
                break
            d = int(draft_ids[b, i])
            valid = 0 <= d < V
            pd = float(p[b, i, d]) if valid else 0.0
            if draft_probs is None:
                q = torch.zeros(V, device=p.device)
                if valid:
                    q[d] = 1.0
            else:
                q = draft_probs[b, i].float()
            qd = float(q[d]) if valid else 0.0
            if greedy[b]:
                accept = valid and d == int(p[b, i].argmax())
            else:
                accept = valid and qd > 0 and float(uniforms[b, i]) * qd <= pd
            if accept:
                out[b, i] = d
                continue
            if greedy[b]:
                tok = int(p[b, i].argmax())
            else:
                resid = (p[b, i] - q).clamp_min(0)
                if float(resid.sum()) <= 0:  # p == q exactly: residual empty, p itself is exact
                    resid = p[b, i]
                tok = int(_sample(resid, exp_noise[b, i]))
            out[b, i] = tok
            break
        n_out[b] = int((out[b] != PLACEHOLDER).sum())
    return out, n_out
