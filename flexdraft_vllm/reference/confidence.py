"""Verification length from draft confidence.

p_i = max softmax probability of calibrated draft i (drafts in order).
  cumprod rule (default): keep the longest prefix whose running product of
                          p_i stays >= tau.
  min rule:               keep the longest prefix whose every p_i >= min_conf.
The result is clamped to [1, K]: one draft is always worth verifying because
its row is the bonus row anyway (verification of one draft costs one row).
"""

from __future__ import annotations

import torch


def verify_length(
    conf: torch.Tensor,  # [N, K] confidence of each draft (K = drafts available)
    rule: str = "cumprod",
    tau: float = 0.01,
    min_conf: float = 0.3,
    max_len: int | None = None,
) -> torch.Tensor:  # [N] int64 in [1, min(K, max_len)]
    N, K = conf.shape
    if K == 0:
        return torch.zeros(N, dtype=torch.long, device=conf.device)
    if rule == "cumprod":
        keep = torch.cumprod(conf.double(), dim=1) >= tau
    elif rule == "min":
        keep = torch.cumprod((conf >= min_conf).long(), dim=1).bool()
    else:
        raise ValueError(f"unknown verify rule {rule!r}: use cumprod or min")
    # keep is monotone (a prefix), so its count is the prefix length
    n = torch.cumprod(keep.long(), dim=1).sum(dim=1)
    hi = K if max_len is None else min(K, max_len)
    return n.clamp(1, hi)
