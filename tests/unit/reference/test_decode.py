"""reference/decode.py: FlexDraft decoding is lossless.

Greedy: generate_flexdraft (parallel and sequential) equals generate_plain
token for token, batch sizes 1, 3 and 5 with ragged prompts, with the bundled
drafter; generate_plain equals HF `generate`. Because a weak drafter may have
every draft rejected (which would leave the multi-token commit path untested),
the same equality is also checked with "oracle" drafts: the real proposal code
runs, then its drafts are replaced by the true continuation with injected
errors, so steps accept 0..7 drafts.

Random sampling: chi-square goodness of fit of the first two emitted tokens
(joint) against the exact target law computed with HF forwards; FAIL if the
p-value < P_MIN = 1e-3 (fixed seeds: deterministic). Bins with expected count
< 5 are merged. A tiny random Llama (vocab 24) gives power at low cost
(N = 800 per mode, temperature 0.8; sanity tests show that a wrong sampler or
misaligned draft probabilities plugged into the same loop ARE detected). The
real SmolLM2 + bundled drafter is checked with 150 runs of "I think that"
(a plumbing check on the real vocabulary; weak power: few bins), and with 600
runs per mode under @slow. The reference loop costs ~0.1-0.3 s per request on
this CPU, which is what bounds N.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.reference import decode
from flexdraft_vllm.reference.decode import DecodeStats, generate_flexdraft, generate_plain
from flexdraft_vllm.reference.drafter import FlexDraftDrafter

from test_sampling import P_MIN, RESAMPLE_FROM_P, chi2_pvalue

MAX_NEW = 24
CHAT = ["What is the capital of France?", "Give me three tips for better sleep."]


@pytest.fixture(scope="module")
def prompts(tokenizer):
    """Five ragged prompts: chat-templated and raw, 4 to ~170 tokens."""
    from flexdraft_vllm.prompts import load_prompts

    chat = lambda t: tokenizer.apply_chat_template(  # noqa: E731
        [{"role": "user", "content": t}], add_generation_prompt=True, return_dict=False)
    ps = [
        chat(CHAT[0]),
        tokenizer("def fibonacci(n):")["input_ids"],
        chat(load_prompts("humaneval", 1)[0]),
        tokenizer("The quick brown fox")["input_ids"],
        chat(CHAT[1]),
    ]
    assert len({len(p) for p in ps}) == 5
    return ps


@pytest.fixture(scope="module")
def plain(target, prompts):
    return generate_plain(target, prompts, MAX_NEW)


# ---- DecodeStats -----------------------------------------------------------------------------
def test_decode_stats_accounting():
    s = DecodeStats()
    assert s.mean_accepted_length == 0.0
    s.record(n_drafts=3, n_out=3)  # 2 drafts accepted + recovered
    s.record(n_drafts=1, n_out=2)  # all accepted + bonus
    s.record(n_drafts=2, n_out=1)  # nothing accepted
    s.record(n_drafts=0, n_out=1)  # no drafts at all
    assert (s.steps, s.emitted) == (4, 7)
    assert s.mean_accepted_length == 7 / 4
    assert s.proposed_per_pos == [3, 2, 1]
    assert s.accepted_per_pos == [2, 1, 0]


# ---- greedy = plain = HF ------------------------------------------------------------------------
def test_plain_matches_hf_generate_and_is_batch_invariant(target, tokenizer, prompts, plain):
    p = prompts[0]
    with torch.no_grad():
        hf = target.hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)
    hf_new = hf[0, len(p):].tolist()
    alone = generate_plain(target, [p], MAX_NEW, eos_id=tokenizer.eos_token_id)[0]
    assert alone == hf_new
    # the batch-of-5 run (no eos) agrees up to HF's stop
    assert plain[0][: len(hf_new)] == hf_new
    assert all(len(o) == MAX_NEW for o in plain)


CASES = {  # id: (batch indices, runtime overrides)
    "bs1": ([0], {}),
    "bs3-verify3": ([1, 2, 3], {"verify_rule": "min", "min_confidence": 0.0, "max_verify": 3}),  # 3 drafts, 4 groups
    "bs5": ([0, 1, 2, 3, 4], {}),
}


@pytest.fixture(scope="module")
def flex_runs(target, drafter, prompts):
    """run(mode, case, plain_block=False) -> (outputs, stats, proposals), cached per module.
    proposals: {(prompt index, tokens emitted so far): drafts} seen by the loop.
    plain_block: the drafter's bonus_proj removed for the run (a bonus_in_block
    drafter's sequential pass then runs the block a parallel pass runs)."""
    cache = {}

    def run(mode, case, plain_block=False):
        if (mode, case, plain_block) not in cache:
            idx, runtime = CASES[case]
            which = {tuple(prompts[i]): i for i in idx}
            proposals = {}
            real, base = decode._propose, drafter.config

            def spy(target_, drafter_, r, block, offset, temperature):
                real(target_, drafter_, r, block, offset, temperature)
                proposals[(which[tuple(r.prompt)], len(r.out))] = list(r.drafts)

            bonus_proj = drafter.bonus_proj
            decode._propose, drafter.config = spy, base.with_runtime(runtime)
            if plain_block:
                drafter.bonus_proj = None
            try:
                out, stats = generate_flexdraft(target, drafter, [prompts[i] for i in idx], MAX_NEW, mode=mode)
            finally:
                decode._propose, drafter.config, drafter.bonus_proj = real, base, bonus_proj
            cache[(mode, case, plain_block)] = (out, stats, proposals)
        return cache[(mode, case, plain_block)]

    return run


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
@pytest.mark.parametrize("case", list(CASES))
def test_greedy_flexdraft_equals_plain(flex_runs, drafter, plain, mode, case):
    idx, runtime = CASES[case]
    out, stats, _ = flex_runs(mode, case)
    for i, o in zip(idx, out):
        assert o == plain[i], f"request {i} diverges at token {next(j for j, (a, b) in enumerate(zip(o, plain[i])) if a != b)}"
    assert stats.steps > 0 and 1.0 <= stats.mean_accepted_length <= drafter.config.block_size
    assert stats.emitted >= len(idx) * (MAX_NEW - 1)  # the first token comes from the prefill
    if "max_verify" in runtime:
        assert stats.proposed_per_pos == [stats.steps] * 3  # every step verified exactly 3 drafts


@pytest.mark.parametrize("case", list(CASES))
def test_parallel_and_sequential_propose_the_same_drafts(flex_runs, case):
    """With uncapped groups, the parallel block chosen after verification sees
    exactly the context of the sequential draft pass (cache + accepted tokens,
    bonus slot next): same drafts, same verify lengths, same statistics.
    Catches a wrong group / offset / anchor in parallel mode, which the
    greedy-equality tests cannot see (wrong drafts are still lossless).
    A bonus_in_block drafter (the bundled one) starts a sequential block from
    the bonus, which a parallel pass cannot know: the comparison runs its
    sequential pass with the plain block."""
    _, s_par, p_par = flex_runs("parallel", case)
    _, s_seq, p_seq = flex_runs("sequential", case, plain_block=True)
    # floating point near-ties may flip a rare draft (and shift later steps): allow 5%
    common = p_par.keys() & p_seq.keys()
    assert len(common) >= 0.9 * max(len(p_par), len(p_seq))
    same = sum(p_par[k] == p_seq[k] for k in common)
    assert same >= 0.95 * len(common), f"{len(common) - same} of {len(common)} proposals differ"
    assert abs(s_par.steps - s_seq.steps) <= 0.05 * s_seq.steps + 1


def oracle_propose(reference: dict[tuple, list[int]], seed: int, wrong_rate: float = 0.35):
    """Wrap decode._propose: run it, then replace its drafts by the true
    continuation (1..num_drafts of them) with an occasional wrong token."""
    real = decode._propose
    rng = random.Random(seed)

    def _propose(target, drafter, r, block, offset, temperature):
        real(target, drafter, r, block, offset, temperature)
        ref = reference[tuple(r.prompt)]
        k = rng.randint(1, drafter.config.num_drafts)
        d = (ref[len(r.out): len(r.out) + k] + [0] * k)[:k]
        if rng.random() < wrong_rate:
            j = rng.randrange(k)
            d[j] = (d[j] + 1) % 49152
        r.drafts, r.q = d, None

    return _propose


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_greedy_equals_plain_with_oracle_drafts(target, drafter, prompts, plain, monkeypatch, mode):
    ref = {tuple(p): o for p, o in zip(prompts, plain)}
    monkeypatch.setattr(decode, "_propose", oracle_propose(ref, seed=3))
    out, stats = generate_flexdraft(target, drafter, prompts, MAX_NEW, mode=mode)
    assert out == plain
    assert stats.mean_accepted_length > 2.0  # multi-token steps really happened
    assert max(i for i, a in enumerate(stats.accepted_per_pos) if a) >= 5


def test_oracle_drafts_with_capped_groups_and_verify(target, drafter, prompts, plain, monkeypatch):
    """Parallel mode with fewer groups than accepted drafts (the block offset
    path) and a verify cap."""
    monkeypatch.setattr(drafter, "config", drafter.config.with_runtime({"max_parallel_groups": 2, "max_verify": 5}))
    ref = {tuple(p): o for p, o in zip(prompts, plain)}
    monkeypatch.setattr(decode, "_propose", oracle_propose(ref, seed=4, wrong_rate=0.2))
    out, stats = generate_flexdraft(target, drafter, prompts[:3], MAX_NEW, mode="parallel")
    assert out == plain[:3]
    assert len(stats.proposed_per_pos) <= 5 and stats.mean_accepted_length > 2.0


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_eos_and_max_new_tokens_inside_an_accepted_run(target, drafter, prompts, plain, monkeypatch, mode):
    """EOS (or the token budget) falling in the middle of accepted drafts:
    output stops exactly where plain decoding stops."""
    ref = {tuple(p): o for p, o in zip(prompts, plain)}
    monkeypatch.setattr(decode, "_propose", oracle_propose(ref, seed=5, wrong_rate=0.0))
    eos = plain[3][9]  # some token plain decoding emits mid-way
    want = []
    for o in plain[1:4]:
        want.append(o[: o.index(eos) + 1] if eos in o[:17] else o[:17])
    out, _ = generate_flexdraft(target, drafter, prompts[1:4], 17, mode=mode, eos_id=eos)
    assert out == want
    assert any(len(w) < 17 for w in want) and any(len(w) == 17 for w in want)


# ---- random sampling: the target law is preserved ---------------------------------------------
def exact_two_token_law(target, prompt: list[int], temperature: float, t1_candidates=None):
    """{(t1, t2): P} for t1 in t1_candidates (default: whole vocab), exact."""
    with torch.no_grad():
        p1 = torch.softmax(target.hf(torch.tensor([prompt])).logits[0, -1].double() / temperature, -1)
        cands = list(range(p1.numel())) if t1_candidates is None else list(t1_candidates)
        ext = torch.tensor([prompt + [a] for a in cands])
        p2 = torch.softmax(target.hf(ext).logits[:, -1].double() / temperature, -1)
    return p1, {a: p1[a] * p2[i] for i, a in enumerate(cands)}


def joint_pvalue(samples: list[list[int]], p1, cond: dict, n_min: float = 5.0) -> float:
    """Chi-square of (t1, t2) samples; bins = pairs with expected >= n_min, plus 'other'."""
    n = len(samples)
    bins, probs = {}, []
    for a, row in cond.items():
        for b in torch.nonzero(row * n >= n_min).squeeze(-1).tolist():
            bins[(a, b)] = len(probs)
            probs.append(float(row[b]))
    other = len(probs)
    probs.append(max(0.0, 1.0 - sum(probs)))
    ids = torch.tensor([bins.get((s[0], s[1]), other) for s in samples])
    assert len(probs) >= 4, f"too few bins ({len(probs)}) for a meaningful test"
    return chi2_pvalue(ids, np.array(probs))


def exact_law(target, prompt: list[int], temperature: float, n_tokens: int, n: int, n_min: float = 5.0) -> dict:
    """{(t1..t_n_tokens): P}, exact, for every sequence whose expected count in
    n samples is >= n_min (prefixes below that are not expanded: no bin needs them)."""
    law = {(): 1.0}
    with torch.no_grad():
        for _ in range(n_tokens):
            pre = list(law)
            logits = target.hf(torch.tensor([prompt + list(s) for s in pre])).logits[:, -1].double()
            probs = torch.softmax(logits / temperature, -1)
            law = {s + (b,): law[s] * float(probs[i, b]) for i, s in enumerate(pre)
                   for b in torch.nonzero(law[s] * probs[i] * n >= n_min).squeeze(-1).tolist()}
    return law


def law_pvalue(samples: list[list[int]], law: dict) -> float:
    """Chi-square of whole-sequence samples against `law`'s bins plus 'other'."""
    bins = {s: i for i, s in enumerate(law)}
    probs = list(law.values()) + [max(0.0, 1.0 - sum(law.values()))]
    assert len(probs) >= 4, f"too few bins ({len(probs)}) for a meaningful test"
    ids = torch.tensor([bins.get(tuple(s), len(law)) for s in samples])
    return chi2_pvalue(ids, np.array(probs))


def make_tiny_spec(make_tiny, draft_vocab: list[int] | None = None, calib_anchor: str = "bonus",
                   bonus_in_block: bool = False):
    """A tiny peaked Llama and a drafter whose q is neither p nor useless
    (optionally drafting from a subset of the vocabulary; with calib_anchor
    "chain" the calibrator is randomised too, so anchors move the drafts; with
    bonus_in_block its bonus_proj, so sequential blocks depend on the bonus)."""
    torch.manual_seed(0)
    t = make_tiny(vocab_size=24, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
    cfg = FlexDraftConfig.for_target(t.cfg, split_layer=1, block_size=4, draft_vocab_size=len(draft_vocab or []),
                                     calib_anchor=calib_anchor, bonus_in_block=bonus_in_block)
    d = FlexDraftDrafter(cfg, t)
    if draft_vocab:
        d.set_draft_vocab(torch.tensor(draft_vocab))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        d.mask_embedding.copy_(torch.randn(d.mask_embedding.shape, generator=g))
        for p in d.mask_attn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        if calib_anchor == "chain":
            for p in d.calibrator.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        if bonus_in_block:
            d.bonus_proj.weight.copy_(torch.randn(d.bonus_proj.weight.shape, generator=g) * 0.3)
    return t, d.eval()


# half the vocabulary: drafts can never be the other tokens, whose mass verification must still restore
TINY_DRAFT_VOCAB = list(range(0, 24, 2))


N_TINY = 800
TINY_PROMPT = [1, 5, 9]
TINY_T = 0.8


@pytest.mark.parametrize("draft_vocab", [None, TINY_DRAFT_VOCAB], ids=["full-vocab", "draft-vocab"])
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_sampling_preserves_target_law_tiny(make_tiny, mode, draft_vocab):
    t, d = make_tiny_spec(make_tiny, draft_vocab)
    out, stats = generate_flexdraft(t, d, [TINY_PROMPT] * N_TINY, 2, mode=mode, temperature=TINY_T, seed=1)
    acc = stats.accepted_per_pos[0] / stats.proposed_per_pos[0]
    assert 0.1 < acc < 0.9, acc  # both accept and reject paths carry weight
    p1, cond = exact_two_token_law(t, TINY_PROMPT, TINY_T)
    assert chi2_pvalue(torch.tensor([o[0] for o in out]), p1.numpy()) >= P_MIN
    pv = joint_pvalue(out, p1, cond)
    assert pv >= P_MIN, f"(t1, t2) deviates from the target law (p={pv:.2e})"


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_chain_anchored_sampling_preserves_target_law_tiny(make_tiny, mode):
    """calib_anchor="chain": draft 2 is drawn from a q anchored on draft 1's
    draw, so the law of three emitted tokens is what must hold."""
    t, d = make_tiny_spec(make_tiny, TINY_DRAFT_VOCAB, calib_anchor="chain")
    out, stats = generate_flexdraft(t, d, [TINY_PROMPT] * N_TINY, 3, mode=mode, temperature=TINY_T, seed=2)
    assert stats.accepted_per_pos[1] >= 20  # draft 2 (the chained one) does get accepted
    pv = law_pvalue(out, exact_law(t, TINY_PROMPT, TINY_T, 3, N_TINY))
    assert pv >= P_MIN, f"(t1, t2, t3) deviates from the target law (p={pv:.2e})"


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_bonus_in_block_keeps_the_target_law_and_greedy_output(make_tiny, monkeypatch, mode):
    """A bonus_in_block drafter: sequential blocks start from the sampled bonus
    (parallel ones cannot know it). Drafts move with it; the output must not."""
    t, d = make_tiny_spec(make_tiny, TINY_DRAFT_VOCAB, bonus_in_block=True)
    prompts = [TINY_PROMPT, [2, 3], [7, 11, 13, 4, 6]]
    assert generate_flexdraft(t, d, prompts, 12, mode=mode)[0] == generate_plain(t, prompts, 12)
    out, stats = generate_flexdraft(t, d, [TINY_PROMPT] * N_TINY, 2, mode=mode, temperature=TINY_T, seed=3)
    acc = stats.accepted_per_pos[0] / stats.proposed_per_pos[0]
    assert 0.1 < acc < 0.9, acc
    p1, cond = exact_two_token_law(t, TINY_PROMPT, TINY_T)
    pv = joint_pvalue(out, p1, cond)
    assert pv >= P_MIN, f"(t1, t2) deviates from the target law (p={pv:.2e})"
    if mode == "sequential":  # the bonus reaches the blocks: zeroing bonus_proj changes the drafts
        seen = []
        real = decode._propose

        def spy(target, drafter, r, block, offset, temperature):
            real(target, drafter, r, block, offset, temperature)
            seen.append(list(r.drafts))

        monkeypatch.setattr(decode, "_propose", spy)
        generate_flexdraft(t, d, prompts, 12, mode=mode)
        with_bonus, seen[:] = list(seen), []
        with torch.no_grad():
            d.bonus_proj.weight.zero_()
        generate_flexdraft(t, d, prompts, 12, mode=mode)
        assert seen != with_bonus


@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_greedy_with_a_draft_vocabulary_equals_plain_and_drafts_only_from_it(make_tiny, monkeypatch, mode):
    t, d = make_tiny_spec(make_tiny, TINY_DRAFT_VOCAB)
    proposed = []
    real = decode._propose

    def spy(target, drafter, r, block, offset, temperature):
        real(target, drafter, r, block, offset, temperature)
        proposed.extend(r.drafts)

    monkeypatch.setattr(decode, "_propose", spy)
    prompts = [TINY_PROMPT, [2, 3], [7, 11, 13, 4, 6]]
    out, _ = generate_flexdraft(t, d, prompts, 12, mode=mode)
    assert out == generate_plain(t, prompts, 12)
    assert proposed and set(proposed) <= set(TINY_DRAFT_VOCAB)
    assert set(o for seq in out for o in seq) - set(TINY_DRAFT_VOCAB), "the output itself is not limited"


def test_sampling_law_test_detects_a_wrong_sampler(make_tiny, monkeypatch):
    t, d = make_tiny_spec(make_tiny)
    monkeypatch.setattr(decode, "rejection_sample", RESAMPLE_FROM_P)
    out, _ = generate_flexdraft(t, d, [TINY_PROMPT] * N_TINY, 2, mode="sequential", temperature=TINY_T, seed=1)
    p1, cond = exact_two_token_law(t, TINY_PROMPT, TINY_T)
    assert joint_pvalue(out, p1, cond) < P_MIN


def test_sampling_law_test_detects_misaligned_draft_probs(make_tiny, monkeypatch):
    """Plumbing bug: the q rows handed to verification are not those of the
    drafts they sit next to (off by one position)."""
    t, d = make_tiny_spec(make_tiny)
    real = decode._propose

    def misaligned(target, drafter, r, block, offset, temperature):
        real(target, drafter, r, block, offset, temperature)
        if r.q is not None and r.q.shape[0] > 1:
            r.q = r.q.roll(1, 0)

    monkeypatch.setattr(decode, "_propose", misaligned)
    out, stats = generate_flexdraft(t, d, [TINY_PROMPT] * N_TINY, 2, mode="sequential", temperature=TINY_T, seed=1)
    assert stats.proposed_per_pos[1] > 0  # the bug is live: several drafts per step
    p1, cond = exact_two_token_law(t, TINY_PROMPT, TINY_T)
    assert joint_pvalue(out, p1, cond) < P_MIN


def _real_model_law_test(target, drafter, tokenizer, mode, n, seed):
    prompt = tokenizer("I think that")["input_ids"]
    out, stats = generate_flexdraft(target, drafter, [prompt] * n, 2, mode=mode, temperature=1.0, seed=seed)
    assert all(len(o) == 2 for o in out)
    p1 = torch.softmax(target.hf(torch.tensor([prompt])).logits[0, -1].double(), -1).detach()
    top = torch.nonzero(p1 * n >= 5).squeeze(-1).tolist()
    assert len(top) >= 1
    p1, cond = exact_two_token_law(target, prompt, 1.0, top)
    pv = joint_pvalue(out, p1, cond)
    assert pv >= P_MIN, f"(t1, t2) deviates from the target law (p={pv:.2e}, mode={mode})"
    return stats


def test_sampling_preserves_target_law_real_model(target, drafter, tokenizer):
    stats = _real_model_law_test(target, drafter, tokenizer, "sequential", n=150, seed=0)
    assert stats.proposed_per_pos[0] == 150


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["parallel", "sequential"])
def test_sampling_preserves_target_law_real_model_many_runs(target, drafter, tokenizer, mode):
    _real_model_law_test(target, drafter, tokenizer, mode, n=600, seed=1)
