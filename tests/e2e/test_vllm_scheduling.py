"""FlexDraft under vLLM's scheduler features, greedy, against plain vLLM:
preemption (a KV cache too small for the batch), chunked prefill (prompts
longer than the token budget, interleaved with decodes that carry drafts) and
prefix caching (requests that reuse cached blocks). Output must stay token-
identical, and each feature must demonstrably have been exercised."""

from __future__ import annotations

import pytest

from llm_helpers import make_llm, metric, shutdown, spec_metrics

MAX_TOKENS = 64
# SmolLM2-135M: 30 layers x 2 (K,V) x 3 kv heads x 64 dims x 4 bytes (fp32)
KV_BYTES_PER_TOKEN = 30 * 2 * 3 * 64 * 4
PREAMBLE = (
    "You are a careful assistant. Answer briefly and precisely. Prefer short sentences, "
    "give one example when it helps, and never invent facts. If a question is about code, "
    "answer with a small Python function and one sentence of explanation. "
) * 3


@pytest.fixture(scope="module")
def prompt_sets(target_dir):
    from flexdraft_vllm.prompts import apply_chat_template, load_prompts

    mixed = apply_chat_template(str(target_dir), load_prompts("mixed", 16))
    questions = [p for p in load_prompts("chat", 8)]
    shared = apply_chat_template(str(target_dir), [PREAMBLE + q for q in questions])
    return {"mixed": mixed, "shared": shared}


def _greedy(llm, prompts):
    from vllm import SamplingParams

    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.fixture(scope="module")
def plain(target_dir, prompt_sets):
    llm = make_llm(target_dir, max_model_len=512)
    res = {k: _greedy(llm, v) for k, v in prompt_sets.items()}
    shutdown(llm)
    return res


def _assert_same(got, want, what):
    bad = [i for i, (g, w) in enumerate(zip(got, want)) if g != w]
    assert not bad, f"{what}: {len(bad)} of {len(want)} outputs differ from plain vLLM (e.g. #{bad[0]})"


def test_preemption_keeps_outputs_identical(target_dir, prompt_sets, plain):
    # room for 1024 tokens: 16 requests of ~50-150 prompt + 64 new tokens (plus up to 7 draft
    # slots each) cannot all stay resident
    # parallel: mask groups in the verify forward, plus the sequential pass after each (re)prefill
    llm = make_llm(target_dir, flexdraft={"mode": "parallel"}, max_model_len=512, max_num_seqs=16,
                   kv_cache_memory_bytes=1024 * KV_BYTES_PER_TOKEN)
    try:
        got = _greedy(llm, prompt_sets["mixed"])
        preempted = metric(llm, "vllm:num_preemptions")
        drafted = spec_metrics(llm).get("num_draft_tokens", 0)
    finally:
        shutdown(llm)
    assert preempted > 0, "the small KV cache caused no preemption: the test did not test anything"
    assert drafted > 0
    _assert_same(got, plain["mixed"], "after preemption")


def test_chunked_prefill_and_prefix_caching(target_dir, prompt_sets, plain):
    budget = 64  # every shared-preamble prompt (~150 tokens) is prefilled in >= 3 chunks
    llm = make_llm(target_dir, flexdraft={"mode": "flex"}, max_model_len=512, max_num_seqs=8,
                   enable_chunked_prefill=True, max_num_batched_tokens=budget, enable_prefix_caching=True)
    try:
        tok = llm.get_tokenizer()
        longest = max(len(tok(p, add_special_tokens=False).input_ids) for p in prompt_sets["shared"])
        assert longest > 2 * budget
        first = _greedy(llm, prompt_sets["shared"])
        hits_before = metric(llm, "vllm:prefix_cache_hits")
        second = _greedy(llm, prompt_sets["shared"])
        hits = metric(llm, "vllm:prefix_cache_hits") - hits_before
        mixed = _greedy(llm, prompt_sets["mixed"])
        drafted = spec_metrics(llm).get("num_draft_tokens", 0)
    finally:
        shutdown(llm)
    assert hits > 0, "second pass over the same prompts hit no cached prefix"
    assert drafted > 0
    _assert_same(first, plain["shared"], "chunked prefill (shared preamble)")
    _assert_same(second, plain["shared"], "prefix-cache hits")
    _assert_same(mixed, plain["mixed"], "chunked prefill (mixed prompts)")
