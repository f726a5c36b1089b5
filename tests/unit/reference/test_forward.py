"""reference/forward.py on the real SmolLM2 target.

Real rows are checked against HF transformers' own forward; the mask path is
checked against an independent oracle that takes the real K/V from HF's
DynamicCache and applies RoPE with HF's apply_rotary_pos_emb. The drafter
here has every weight perturbed away from the target's, so swapping frozen
and tuned projectors (or mask and real K/V) cannot go unnoticed.
"""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_vllm.reference.forward import RequestCache, draft_pass, step_forward

TEXTS = [
    "The capital of France is",
    "def add(a, b):\n    \"\"\"Add two numbers and return the result.\"\"\"\n",
    "Once upon a time, in a small village by the sea,",
]


@pytest.fixture(scope="module")
def noisy_drafter(target):
    cfg = FlexDraftConfig.for_target(target.cfg, split_layer=22, block_size=4)
    d = FlexDraftDrafter(cfg, target)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * (0.02 + 0.1 * p.detach().abs().mean()))
    return d.eval()


@pytest.fixture(scope="module")
def prompts(tokenizer):
    return [tokenizer(t)["input_ids"] for t in TEXTS]


def hf_logits(target, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return target.hf(torch.tensor([ids])).logits[0]


def hf_kv(target, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        pkv = target.hf(torch.tensor([ids]), use_cache=True).past_key_values
    return [(lay.keys[0].transpose(0, 1), lay.values[0].transpose(0, 1)) for lay in pkv.layers]  # [T, Hkv, D]


def oracle_block(target, drafter, kv, ctx: int) -> torch.Tensor:
    """[B, h] final-normed hidden of one mask block in the bonus slot ctx."""
    cfg = drafter.config
    B, H, Hkv, D = cfg.block_size, target.num_heads, target.num_kv_heads, target.head_dim
    pos = torch.arange(ctx, ctx + B)
    h = drafter.mask_embedding.detach().expand(B, -1).clone()
    with torch.no_grad():
        for l in cfg.deep_layers:
            layer, proj = target.layers[l], drafter.mask_attn[l - cfg.split_layer]
            x = layer.input_layernorm(h)
            q = proj.q_proj(x).view(B, H, D).transpose(0, 1)[None]
            k = proj.k_proj(x).view(B, Hkv, D).transpose(0, 1)[None]
            v = proj.v_proj(x).view(B, Hkv, D).transpose(0, 1)[None]
            cos, sin = target.rotary_emb(x, pos[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            keys = torch.cat([kv[l][0][:ctx].transpose(0, 1)[None], k], 2)  # every mask sees all of these
            vals = torch.cat([kv[l][1][:ctx].transpose(0, 1)[None], v], 2)
            a = torch.nn.functional.scaled_dot_product_attention(q, keys, vals, enable_gqa=True, scale=target.scale)
            h = h + proj.o_proj(a[0].transpose(0, 1).reshape(B, -1))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return target.norm(h)


# ---- RequestCache ---------------------------------------------------------------------
def test_request_cache_commit(target):
    c = RequestCache()
    assert c.length == 0
    k, v = c.layer_kv(3, target)
    assert k.shape == (0, 3, 64) and v.shape == (0, 3, 64)
    new = [torch.full((5, 3, 64), float(l)) for l in range(2)]
    c.commit(new, [x + 10 for x in new], 3)
    assert c.length == 3
    c.commit([x + 100 for x in new], [x + 200 for x in new], 2)
    assert c.length == 5
    assert c.k[1][:3].eq(1).all() and c.k[1][3:].eq(101).all() and c.v[0][3:].eq(200).all()


# ---- real rows = HF ----------------------------------------------------------------------
def test_prefill_ragged_batch_matches_hf(target, prompts):
    assert len({len(p) for p in prompts}) == 3
    out = step_forward(target, None, [RequestCache() for _ in prompts], [torch.tensor(p) for p in prompts])
    for p, lg, k in zip(prompts, out.logits, out.new_k):
        assert lg.shape == (len(p), 49152) and len(k) == 30 and k[0].shape == (len(p), 3, 64)
        torch.testing.assert_close(lg, hf_logits(target, p), rtol=1e-4, atol=1e-3)
    assert out.mask_hidden == [None, None, None]


def test_incremental_steps_with_partial_commits_match_hf(target, prompts):
    """Prefill, then multi-token candidate steps committing only a prefix of
    the candidates (rejected K/V must be dropped), ragged across requests."""
    caches = [RequestCache() for _ in prompts]
    seqs = [p[:4] for p in prompts]  # committed tokens
    out = step_forward(target, None, caches, [torch.tensor(s) for s in seqs])
    for c, k, v, s in zip(caches, out.new_k, out.new_v, seqs):
        c.commit(k, v, len(s))
    plan = [  # per step and request: (candidates, how many to commit)
        [([1070, 2203], 2), ([30, 31, 32, 33, 34], 3), ([7, 8, 9], 1)],
        [([906], 1), ([40, 41, 42], 3), ([11, 12], 2)],
    ]
    for step in plan:
        cands = [torch.tensor(cand) for cand, _ in step]
        out = step_forward(target, None, caches, cands)
        for r, ((cand, m), c) in enumerate(zip(step, caches)):
            torch.testing.assert_close(out.logits[r], hf_logits(target, seqs[r] + list(cand))[-len(cand):],
                                       rtol=1e-4, atol=1e-3)
            c.commit(out.new_k[r], out.new_v[r], m)
            seqs[r] = seqs[r] + list(cand[:m])
            assert c.length == len(seqs[r])
    # the caches hold exactly HF's K/V of the committed sequences
    for c, s in zip(caches, seqs):
        kv = hf_kv(target, s)
        for l in (0, 29):
            torch.testing.assert_close(c.k[l], kv[l][0], rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(c.v[l], kv[l][1], rtol=1e-4, atol=1e-4)


# ---- masks are invisible to real rows ------------------------------------------------------
def test_masks_do_not_change_real_rows(target, noisy_drafter, prompts):
    def run(with_masks: bool):
        caches = [RequestCache() for _ in prompts]
        anchors = [[len(p) - 1] for p in prompts] if with_masks else None
        out = step_forward(target, noisy_drafter if with_masks else None, caches,
                           [torch.tensor(p) for p in prompts], anchors)
        for c, k, v, p in zip(caches, out.new_k, out.new_v, prompts):
            c.commit(k, v, len(p))
        cands = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
        anchors = [[0, 1, 2], [0], [0, 1]] if with_masks else None
        return out, step_forward(target, noisy_drafter if with_masks else None, caches, cands, anchors)

    for a, b in zip(run(True), run(False)):
        for x, y in zip(a.logits, b.logits):
            assert torch.equal(x, y)
        for kx, ky in zip(a.new_k, b.new_k):
            assert all(torch.equal(p, q) for p, q in zip(kx, ky))
        for vx, vy in zip(a.new_v, b.new_v):
            assert all(torch.equal(p, q) for p, q in zip(vx, vy))
    masked = run(True)[1]
    assert [m.shape for m in masked.mask_hidden] == [(3, 4, 576), (1, 4, 576), (2, 4, 576)]


# ---- the mask path = independent oracle ------------------------------------------------------
def test_prefill_block_matches_oracle(target, noisy_drafter, prompts):
    out = step_forward(target, noisy_drafter, [RequestCache() for _ in prompts],
                       [torch.tensor(p) for p in prompts], anchors=[[len(p) - 1] for p in prompts])
    for p, mh in zip(prompts, out.mask_hidden):
        torch.testing.assert_close(mh[0], oracle_block(target, noisy_drafter, hf_kv(target, p), len(p)),
                                   rtol=1e-4, atol=1e-4)


def test_parallel_groups_match_oracle(target, noisy_drafter, prompts):
    """Group g of a verify step sees the cache + candidates 0..g (bonus slot
    right after candidate g), never candidates after g."""
    caches = [RequestCache() for _ in prompts[:2]]
    pre = step_forward(target, None, caches, [torch.tensor(p) for p in prompts[:2]])
    for c, k, v, p in zip(caches, pre.new_k, pre.new_v, prompts[:2]):
        c.commit(k, v, len(p))
    cands = [[100, 200, 300], [400, 500]]
    out = step_forward(target, noisy_drafter, caches, [torch.tensor(c) for c in cands], anchors=[[0, 1, 2], [1]])
    for r, (p, cand, groups) in enumerate(zip(prompts[:2], cands, [[0, 1, 2], [1]])):
        kv = hf_kv(target, p + cand)
        for gi, g in enumerate(groups):
            want = oracle_block(target, noisy_drafter, kv, len(p) + g + 1)
            torch.testing.assert_close(out.mask_hidden[r][gi], want, rtol=1e-4, atol=1e-4)


def test_draft_pass_matches_oracle_and_parallel(target, noisy_drafter, prompts):
    caches = [RequestCache() for _ in prompts]
    out = step_forward(target, noisy_drafter, caches, [torch.tensor(p) for p in prompts],
                       anchors=[[len(p) - 1] for p in prompts])
    for c, k, v, p in zip(caches, out.new_k, out.new_v, prompts):
        c.commit(k, v, len(p))
    blocks = draft_pass(target, noisy_drafter, caches)
    for p, blk, par in zip(prompts, blocks, out.mask_hidden):
        assert blk.shape == (1, 4, 576)
        torch.testing.assert_close(blk[0], oracle_block(target, noisy_drafter, hf_kv(target, p), len(p)),
                                   rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(blk, par, rtol=1e-5, atol=1e-5)  # sequential block == parallel block
