"""Prompt lookup beside FlexDraft (opt-in: FlexDraftConfig.prompt_lookup_max > 0).

Ours, not the paper's. Outputs of small models and of code or extraction
tasks repeat their context: when a request's last n tokens occurred earlier
in its prompt or output, the tokens that followed them are good drafts (vLLM's
"ngram" method; accepted length 2.9 on the benchmark prompts, against ~1.7 for
the mask block). With lookup on, such a request takes those drafts and skips
the draft pass; every other request is drafted by FlexDraft as before. Drafts
are proposals only: the output is unchanged either way (vLLM verifies them
against the target, one-hot, as all FlexDraft drafts).

Rule (vLLM's ngram proposer, whose matcher is reused): the longest n in
[min_n, max_n] for which the last n tokens occur earlier; among equal n the
earliest occurrence; drafts are the (up to) k tokens after it.
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
    from vllm.v1.spec_decode.ngram_proposer import _find_longest_matched_ngram_and_propose_tokens

    assert 1 <= min_n <= max_n and k >= 0
    return _find_longest_matched_ngram_and_propose_tokens(
        origin_tokens=np.ascontiguousarray(tokens), min_ngram=min_n, max_ngram=max_n,
        max_model_len=max_model_len, k=k)


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
