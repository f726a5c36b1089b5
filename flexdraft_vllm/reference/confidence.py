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


def draft_confidence(
    logits: torch.Tensor,  # [..., V] calibrated draft logits
) -> torch.Tensor:  # [...] fp32 max softmax probability; 0 for a row with no finite logit
    """p_i of one draft. NaN logits count as -inf, so a broken row gets
    confidence 0 (it is never worth verifying) instead of poisoning the rule."""
    x = torch.nan_to_num(logits.float(), nan=float("-inf"), posinf=torch.finfo(torch.float32).max,
                         neginf=float("-inf"))
    dead = x.amax(-1) == float("-inf")
    return torch.where(dead, torch.zeros((), device=x.device), torch.softmax(x, -1).amax(-1))


def kept_prefix(
    conf: torch.Tensor,  # [N, K] confidence of each draft
    rule: str = "cumprod",
    tau: float = 0.01,
    min_conf: float = 0.3,
) -> torch.Tensor:  # [N] int64 in [0, K]: drafts the rule keeps, before any clamp
    if rule == "cumprod":
        keep = torch.cumprod(conf.double(), dim=1) >= tau
    elif rule == "min":
        keep = torch.cumprod((conf >= min_conf).long(), dim=1).bool()
    else:
        raise ValueError(f"unknown verify rule {rule!r}: use cumprod or min")
    # keep is monotone (a prefix), so its count is the prefix length
    return torch.cumprod(keep.long(), dim=1).sum(dim=1)


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
    n = kept_prefix(conf, rule, tau, min_conf)
    hi = K if max_len is None else min(K, max_len)
    return n.clamp(1, hi)


class VerifyCut:
    """verify_length, one draft slot at a time: `push(conf_k)` returns True once
    no row can keep another draft (every row's prefix already broke, or
    max_len slots are in). Slots after that would be trimmed anyway, so a
    drafter that stops computing them (chain calibration computes slots one by
    one) changes no draft and no verify length."""

    def __init__(self, rule: str = "cumprod", tau: float = 0.01, min_conf: float = 0.3, max_len: int | None = None):
        if rule not in ("cumprod", "min"):
            raise ValueError(f"unknown verify rule {rule!r}: use cumprod or min")
        self.rule, self.tau, self.min_conf, self.max_len = rule, tau, min_conf, max_len
        self.slots = 0
        self.prod: torch.Tensor | None = None  # [N] fp64 running product of confidences (cumprod rule)
        self.alive: torch.Tensor | None = None  # [N] bool: the row's kept prefix reaches the last slot

    def push(self, conf: torch.Tensor) -> bool:  # conf [N]: confidence of the next slot
        """O(1) per slot: the kept prefix of kept_prefix, carried as a running
        product and a still-unbroken flag per row."""
        self.slots += 1
        if self.rule == "cumprod":
            self.prod = conf.double() if self.prod is None else self.prod * conf.double()
            keep = self.prod >= self.tau
        else:
            keep = conf >= self.min_conf
        self.alive = keep if self.alive is None else self.alive & keep
        return (self.max_len is not None and self.slots >= self.max_len) or not bool(self.alive.any())
