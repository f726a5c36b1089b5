"""Prompt lookup beside FlexDraft (opt-in: FlexDraftConfig.prompt_lookup_max > 0).

Ours, not the paper's. Outputs of small models and of code or extraction
tasks repeat their context: when a request's last n tokens occurred earlier
in its prompt or output, the tokens that followed them are good drafts (vLLM's
"ngram" method; accepted length 2.9 on the benchmark prompts, against ~1.7 for
the mask block). With lookup on, such a request takes those drafts and skips
the draft pass; every other request is drafted by FlexDraft as before. Drafts
are proposals only: the output is unchanged either way (vLLM verifies them
against the target, one-hot, as all FlexDraft drafts).

Rule (vLLM's ngram proposer's): the longest n in [min_n, max_n] for which
the last n tokens occur earlier (overlaps allowed); among equal n the earliest
occurrence; drafts are the (up to) k tokens after it, no more than fit below
max_model_len. Not vLLM's numba matcher itself: importing numba/llvmlite into
the engine process breaks vLLM 0.32's kernel-override scan
(triton_utils.dispatcher._rebind_kernels trips over llvmlite's library
proxy) for any engine started later in the same process.
"""

from __future__ import annotations

import numpy as np


def lookup_drafts(
    tokens: np.ndarray,  # [L] int: the request's tokens so far (prompt, output, the new bonus last)
    min_n: int,
    max_n: int,
    k: int,
    max_model_len: int,
) -> np.ndarray:  # [<= k] drafts (empty: no match)
    assert 1 <= min_n <= max_n and k >= 0
    t = np.asarray(tokens)
    L = t.shape[0]
    k = min(k, max_model_len - L)
    if L < max(2, min_n) or k <= 0:
        return t[:0]
    ends = np.flatnonzero(t[: L - 1] == t[L - 1])  # earlier positions of the last token: candidate match ends
    if ends.size == 0:
        return t[:0]
    n = np.ones(ends.size, dtype=np.int64)  # match length ending at each candidate, grown backwards
    alive = np.ones(ends.size, dtype=bool)
    for j in range(1, max_n):
        at = ends - j
        alive &= (at >= 0) & (t[np.maximum(at, 0)] == t[L - 1 - j])
        if not alive.any():
            break
        n += alive
    best = int(n.max())
    if best < min_n:
        return t[:0]
    e = int(ends[np.argmax(n == best)])  # the earliest of the longest
    return t[e + 1 : e + 1 + k]


def lookup_drafts_ref(tokens: np.ndarray, min_n: int, max_n: int, k: int, max_model_len: int) -> np.ndarray:
    """The same rule by brute force (tests)."""
    t = [int(x) for x in tokens]
    L = len(t)
    k = min(k, max_model_len - L)
    if L < min_n or k <= 0:
        return np.empty(0, dtype=tokens.dtype)
    for n in range(min(max_n, L - 1), min_n - 1, -1):
        suffix = t[L - n:]
        for start in range(0, L - n):  # earliest occurrence first, not the suffix itself
            if t[start:start + n] == suffix:
                return np.asarray(t[start + n:start + n + k], dtype=tokens.dtype)
    return np.empty(0, dtype=tokens.dtype)
