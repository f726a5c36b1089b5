"""Prompt lookup beside FlexDraft (vllm_integration.lookup): the vectorised
matcher against a brute-force statement of vLLM's ngram rule, and the config
checks."""

from __future__ import annotations

import numpy as np
import pytest

from flexdraft_vllm.config import FlexDraftConfigError
from flexdraft_vllm.vllm_integration.lookup import lookup_drafts, lookup_drafts_ref
from tiny_models import make_tiny_target


def test_matches_the_rule_on_random_sequences():
    """Longest n in [min, max] whose last n tokens occur earlier, earliest such
    occurrence, the (up to) k tokens after it; small vocabularies make matches,
    overlaps and short continuations common."""
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(400):
        L = int(rng.integers(1, 40))
        tokens = rng.integers(0, int(rng.integers(2, 6)), size=L).astype(np.int32)
        min_n, max_n = sorted(int(x) for x in rng.integers(1, 5, size=2))
        k = int(rng.integers(1, 8))
        max_len = L + int(rng.integers(0, 10))
        got = lookup_drafts(tokens, min_n, max_n, k, max_len)
        want = lookup_drafts_ref(tokens, min_n, max_n, k, max_len)
        assert got.tolist() == want.tolist(), (tokens.tolist(), min_n, max_n, k, max_len)
        hits += len(want) > 0
    assert 100 < hits < 400  # both outcomes exercised


def test_examples():
    t = np.array([5, 1, 2, 3, 9, 1, 2], dtype=np.int32)
    assert lookup_drafts(t, 2, 4, 3, 100).tolist() == [3, 9, 1]  # "1 2" occurred at 1..2
    assert lookup_drafts(t, 3, 4, 3, 100).tolist() == []  # "9 1 2" did not
    assert lookup_drafts(t, 2, 4, 3, 8).tolist() == [3]  # room for one draft below max_model_len


def test_config_checks():
    from flexdraft_vllm.config import FlexDraftConfig

    base = FlexDraftConfig.for_target(make_tiny_target().cfg, split_layer=2, block_size=4)
    assert (base.prompt_lookup_max, base.prompt_lookup_min) == (4, 2)  # on by default, vLLM ngram's range
    assert base.with_runtime({"prompt_lookup_max": 0}).prompt_lookup_max == 0  # 0: off
    with pytest.raises(FlexDraftConfigError, match="prompt_lookup_max=1 must be 0"):
        base.with_runtime({"prompt_lookup_max": 1})
    with pytest.raises(FlexDraftConfigError, match="prompt_lookup_min=0"):
        base.with_runtime({"prompt_lookup_min": 0})
    with pytest.raises(FlexDraftConfigError, match="must be an integer"):
        base.with_runtime({"prompt_lookup_max": 2.5})
