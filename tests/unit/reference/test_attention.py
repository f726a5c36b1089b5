"""reference/attention.py against an explicit, loop-based masked softmax.

The oracle below is written independently of the implementation: per query
row and per query head it builds the list of visible keys (GQA: query head h
reads kv head h // rep, the HF repeat_kv layout), softmaxes in float64 and
sums values. No repeat_interleave, no einsum, no -inf fill.
"""

from __future__ import annotations

import math

import pytest
import torch

from flexdraft_vllm.reference.attention import block_attention, causal_attention


def _oracle_row(q_row, keys, values, scale):
    # q_row [D]; keys/values: list of [D] tensors that this row may see
    s = torch.stack([torch.dot(q_row.double(), k.double()) * scale for k in keys])
    w = torch.softmax(s, 0)
    return sum(wi * v.double() for wi, v in zip(w, values))


def oracle_block(q, k_blk, v_blk, k_ctx, v_ctx, ctx_lens, scale):
    G, B, Hq, D = q.shape
    rep = Hq // k_ctx.shape[1]
    out = torch.zeros(G, B, Hq, D, dtype=torch.float64)
    for g in range(G):
        c = int(ctx_lens[g])
        for b in range(B):
            for h in range(Hq):
                kv = h // rep
                keys = [k_ctx[t, kv] for t in range(c)] + [k_blk[g, j, kv] for j in range(B)]
                vals = [v_ctx[t, kv] for t in range(c)] + [v_blk[g, j, kv] for j in range(B)]
                out[g, b, h] = _oracle_row(q[g, b, h], keys, vals, scale)
    return out


def oracle_causal(q, k, v, scale):
    n, Hq, D = q.shape
    T = k.shape[0]
    rep = Hq // k.shape[1]
    out = torch.zeros(n, Hq, D, dtype=torch.float64)
    for i in range(n):
        last = T - n + i
        for h in range(Hq):
            kv = h // rep
            out[i, h] = _oracle_row(q[i, h], [k[t, kv] for t in range(last + 1)], [v[t, kv] for t in range(last + 1)], scale)
    return out


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen)


@pytest.mark.parametrize(
    "G,B,Hq,Hkv,D,T,ctx",
    [
        (3, 4, 6, 2, 8, 10, [0, 5, 10]),  # GQA rep=3, ctx=0 and ctx=T
        (2, 3, 4, 4, 16, 7, [7, 2]),  # MHA
        (1, 2, 4, 1, 8, 0, [0]),  # MQA, empty context: block only
        (4, 8, 9, 3, 64, 37, [30, 31, 32, 33]),  # SmolLM2 head layout, parallel-mode groups
    ],
)
def test_block_attention_matches_explicit_masked_softmax(G, B, Hq, Hkv, D, T, ctx):
    gen = torch.Generator().manual_seed(G * 100 + T)
    q = _rand(G, B, Hq, D, gen=gen)
    kb, vb = _rand(G, B, Hkv, D, gen=gen), _rand(G, B, Hkv, D, gen=gen)
    kc, vc = _rand(T, Hkv, D, gen=gen), _rand(T, Hkv, D, gen=gen)
    ctx_lens = torch.tensor(ctx)
    scale = D**-0.5
    got = block_attention(q, kb, vb, kc, vc, ctx_lens, scale)
    assert got.shape == (G, B, Hq, D) and got.dtype == q.dtype
    want = oracle_block(q, kb, vb, kc, vc, ctx_lens, scale)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_block_attention_is_causal_to_real_keys_and_bidirectional_in_block():
    gen = torch.Generator().manual_seed(1)
    G, B, H, D, T = 2, 4, 2, 8, 9
    q = _rand(G, B, H, D, gen=gen)
    kb, vb = _rand(G, B, H, D, gen=gen), _rand(G, B, H, D, gen=gen)
    kc, vc = _rand(T, H, D, gen=gen), _rand(T, H, D, gen=gen)
    ctx = torch.tensor([3, 6])
    base = block_attention(q, kb, vb, kc, vc, ctx, 0.3)

    # real keys at or after a block's ctx are invisible to that block
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[3:] += 5.0
    vc2[3:] -= 7.0
    out = block_attention(q, kb, vb, kc2, vc2, ctx, 0.3)
    torch.testing.assert_close(out[0], base[0])  # ctx 3: unaffected
    assert not torch.allclose(out[1], base[1])  # ctx 6 sees positions 3..5

    # the LAST mask of a block changes the FIRST mask's output (bidirectional),
    # and blocks never see each other
    kb2, vb2 = kb.clone(), vb.clone()
    kb2[0, B - 1] += 3.0
    vb2[0, B - 1] += 3.0
    out = block_attention(q, kb2, vb2, kc, vc, ctx, 0.3)
    assert not torch.allclose(out[0, 0], base[0, 0])
    torch.testing.assert_close(out[1], base[1])


def test_block_attention_rejects_context_beyond_keys():
    q = torch.zeros(1, 2, 1, 4)
    kv = torch.zeros(1, 2, 1, 4)
    ctx_kv = torch.zeros(3, 1, 4)
    with pytest.raises(AssertionError):
        block_attention(q, kv, kv, ctx_kv, ctx_kv, torch.tensor([4]), 1.0)


def test_block_attention_keeps_low_precision_dtype():
    gen = torch.Generator().manual_seed(2)
    q = _rand(1, 3, 4, 8, gen=gen).bfloat16()
    kb, vb = _rand(1, 3, 2, 8, gen=gen).bfloat16(), _rand(1, 3, 2, 8, gen=gen).bfloat16()
    kc, vc = _rand(5, 2, 8, gen=gen).bfloat16(), _rand(5, 2, 8, gen=gen).bfloat16()
    got = block_attention(q, kb, vb, kc, vc, torch.tensor([5]), 8**-0.5)
    assert got.dtype == torch.bfloat16
    want = oracle_block(q.float(), kb.float(), vb.float(), kc.float(), vc.float(), torch.tensor([5]), 8**-0.5)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("n,T,Hq,Hkv", [(1, 1, 2, 2), (1, 12, 6, 2), (5, 5, 4, 1), (4, 11, 9, 3)])
def test_causal_attention_matches_explicit(n, T, Hq, Hkv):
    gen = torch.Generator().manual_seed(n * 31 + T)
    D = 8
    q = _rand(n, Hq, D, gen=gen)
    k, v = _rand(T, Hkv, D, gen=gen), _rand(T, Hkv, D, gen=gen)
    got = causal_attention(q, k, v, 1 / math.sqrt(D))
    torch.testing.assert_close(got.double(), oracle_causal(q, k, v, 1 / math.sqrt(D)), rtol=1e-5, atol=1e-5)


def test_causal_attention_new_rows_do_not_see_later_rows():
    gen = torch.Generator().manual_seed(3)
    q = _rand(3, 2, 8, gen=gen)
    k, v = _rand(7, 2, 8, gen=gen), _rand(7, 2, 8, gen=gen)
    base = causal_attention(q, k, v, 0.5)
    k2, v2 = k.clone(), v.clone()
    k2[-1] += 4.0
    v2[-1] += 4.0  # only the last new row (absolute index 6) may change
    out = causal_attention(q, k2, v2, 0.5)
    torch.testing.assert_close(out[:2], base[:2])
    assert not torch.allclose(out[2], base[2])
