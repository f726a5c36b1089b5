"""Reading real-token K/V back from vLLM's paged cache layouts."""

from __future__ import annotations

import pytest
import torch

from flexdraft_vllm.reference.attention import batched_block_attention, block_attention
from flexdraft_vllm.vllm_integration import paged_kv


def _cpu_cache(nb=24, hkv=3, bs=16, d=8):
    """A CPU_ATTN cache whose entries encode (position-independent) page/slot/head ids."""
    torch.manual_seed(0)
    return torch.randn(nb, hkv, bs, 2 * d)


def test_cpu_layout_gather_follows_the_block_table():
    cache = _cpu_cache()
    nb, hkv, bs, d2 = cache.shape
    d = d2 // 2
    row = torch.tensor([7, 3, 11, 0])
    k, v = paged_kv.gather_cpu_layout(cache, row, 37)
    assert k.shape == (37, hkv, d)
    pages = cache.view(nb, hkv, 2 * bs, d)  # per page and head: bs key rows, then bs value rows
    for pos in (0, 15, 16, 36):
        page, slot = int(row[pos // bs]), pos % bs
        torch.testing.assert_close(k[pos], pages[page, :, slot])
        torch.testing.assert_close(v[pos], pages[page, :, bs + slot])


def test_flash_layout_gather_follows_the_block_table():
    """vLLM 0.32 FLASH_ATTN: [pages, Hkv, page_size, 2D] read as transpose(1, 2).split(D, -1)."""
    torch.manual_seed(0)
    cache = torch.randn(10, 2, 4, 16)
    row = torch.tensor([9, 2, 5])
    k, v = paged_kv.gather_flash_layout(cache, row, 10)
    kc, vc = cache.transpose(1, 2).split(8, dim=-1)  # what the backend reads: [pages, page_size, Hkv, D]
    for pos in (0, 3, 4, 9):
        torch.testing.assert_close(k[pos], kc[int(row[pos // 4]), pos % 4])
        torch.testing.assert_close(v[pos], vc[int(row[pos // 4]), pos % 4])


def test_split_layout_gather_follows_the_block_table():
    torch.manual_seed(0)
    cache = torch.randn(2, 10, 4, 2, 8)  # [2, pages, page_size, Hkv, D]
    row = torch.tensor([9, 2, 5])
    k, v = paged_kv.gather(cache, row, 10)
    for pos in (0, 3, 4, 9):
        torch.testing.assert_close(k[pos], cache[0, int(row[pos // 4]), pos % 4])
        torch.testing.assert_close(v[pos], cache[1, int(row[pos // 4]), pos % 4])


def test_unknown_layout_is_a_clear_error():
    with pytest.raises(NotImplementedError, match="layout"):
        paged_kv.gather(torch.zeros(3, 3, 3), torch.tensor([0]), 1)


def test_batched_gather_and_attention_equal_the_per_request_reference():
    """N requests x G groups (parallel mode: group g sees one more key than g-1)."""
    cache = _cpu_cache(d=64)
    nb, hkv, bs, _ = cache.shape
    N, G, B, Hq, D = 5, 3, 8, 9, 64
    torch.manual_seed(1)
    table = torch.stack([torch.randperm(nb)[:6] for _ in range(N)])
    ctx = torch.tensor([1, 14, 17, 50, 88])[:, None] + torch.arange(G)[None]  # page boundaries, mid-page ends
    q, k, v = torch.randn(N, G, B, Hq, D), torch.randn(N, G, B, hkv, D), torch.randn(N, G, B, hkv, D)
    kc, vc = paged_kv.gather_batch_cpu_layout(cache, table, int(ctx.max()))
    got = batched_block_attention(q, k, v, kc, vc, ctx, D ** -0.5)
    for r in range(N):
        kr, vr = paged_kv.gather_cpu_layout(cache, table[r], int(ctx[r].max()))
        want = block_attention(q[r], k[r], v[r], kr, vr, ctx[r], D ** -0.5)
        torch.testing.assert_close(got[r], want, atol=1e-5, rtol=1e-5)


def test_batched_attention_ignores_keys_past_each_context():
    cache = _cpu_cache(d=64)
    N, B, Hq, D = 2, 4, 9, 64
    table = torch.tensor([[1, 2, 3], [4, 5, 6]])
    ctx = torch.tensor([10, 20])
    q, k, v = torch.randn(N, 1, B, Hq, D), torch.randn(N, 1, B, 3, D), torch.randn(N, 1, B, 3, D)
    ctx = ctx[:, None]
    kc, vc = paged_kv.gather_batch_cpu_layout(cache, table, 20)
    a = batched_block_attention(q, k, v, kc, vc, ctx, 0.125)
    kc2, vc2 = kc.clone(), vc.clone()
    kc2[0, 10:] = float("nan")
    vc2[0, 10:] = float("nan")
    b = batched_block_attention(q, k, v, kc2.nan_to_num(1e4), vc2.nan_to_num(1e4), ctx, 0.125)
    torch.testing.assert_close(a, b)
    c = batched_block_attention(q, k, v, kc2, vc2, ctx, 0.125)  # NaN in padding (unwritten pages)
    torch.testing.assert_close(a, c)


def test_cpu_isa_packing_is_decoded_through_vllms_own_write_op():
    """vLLM's CPU attention stores K in an ISA-specific packed order; reading
    the cache as plain rows gave wrong drafts (caught by the e2e reference test)."""
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    nb, hkv, bs, d = 5, 3, 16, 64
    isa = _get_attn_isa(torch.float32, bs, d)
    kv = torch.zeros(nb, hkv, bs, 2 * d)
    kc, vc = kv.view(nb, hkv, 2 * bs, d).chunk(2, dim=2)
    T = 37
    key, val = torch.randn(T, hkv, d), torch.randn(T, hkv, d)
    table = torch.tensor([3, 1, 4])
    slots = table[torch.arange(T) // bs] * bs + torch.arange(T) % bs
    ops.cpu_attn_reshape_and_cache(key, val, kc, vc, slots, isa)
    perms = paged_kv.cpu_block_permutations(isa, bs, d, torch.float32)
    kinds = tuple(paged_kv.packing_kind(p, bs, d) for p in perms)  # what the proposer uses
    for pk in (perms, kinds):
        k, v = paged_kv.gather_cpu_layout(kv, table, T, pk)
        assert torch.equal(k, key) and torch.equal(v, val)
        kb, vb = paged_kv.gather_batch_cpu_layout(kv, table[None], T, pk)
        assert torch.equal(kb[0, :T], key) and torch.equal(vb[0, :T], val)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_cpu_attention_equals_the_reference(dtype):
    """cpu_block_attention (torch SDPA, GQA without repeats) against
    batched_block_attention: N requests x G groups, ctx ends mid-page and on
    page boundaries, NaN in keys no block may see. Queries and block K/V in
    `dtype`, the cache in float32 (the proposer's bf16 draft pass); bound: the
    reference's own error when fed the same rounded inputs, i.e. float32 math."""
    cache = _cpu_cache(d=64)
    nb, hkv, bs, _ = cache.shape
    N, G, B, Hq, D = 4, 3, 8, 9, 64
    torch.manual_seed(2)
    table = torch.stack([torch.randperm(nb)[:6] for _ in range(N)])
    ctx = torch.tensor([1, 16, 33, 70])[:, None] + torch.arange(G)[None]
    q, k, v = (torch.randn(N, G, B, h, D).to(dtype) for h in (Hq, hkv, hkv))
    kc, vc = paged_kv.gather_batch_cpu_layout(cache, table, int(ctx.max()))
    kc[0, 3:], vc[0, 3:] = float("nan"), float("nan")  # past request 0's every context
    got = paged_kv.cpu_block_attention(q, k, v, kc, vc, ctx, D ** -0.5)
    want = batched_block_attention(q.float(), k.float(), v.float(), kc, vc, ctx, D ** -0.5)
    assert got.dtype == dtype and not got.isnan().any()
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: rounding of the output only
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def test_block_mask_is_dropped_when_every_block_sees_every_key():
    """One context length for all blocks (a sequential pass at batch 1): no key
    mask at all, and the same result as the reference's masked attention."""
    cache = _cpu_cache(d=64)
    nb, hkv, bs, _ = cache.shape
    N, G, B, Hq, D = 1, 1, 8, 9, 64
    torch.manual_seed(4)
    table = torch.randperm(nb)[:6][None]
    ctx = torch.tensor([[37]])
    q, k, v = (torch.randn(N, G, B, h, D) for h in (Hq, hkv, hkv))
    kc, vc = paged_kv.gather_batch_cpu_layout(cache, table, 37)
    mask = paged_kv.CpuBlockMask(ctx, B, q.device)
    assert mask.mask is None and mask.seen is None and mask.T == 37
    got = mask.attend(q, k, v, kc, vc, D ** -0.5)
    want = batched_block_attention(q, k, v, kc, vc, ctx, D ** -0.5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_named_packings_unpack_as_views_equal_to_the_gather():
    """packing_kind names the row-major and transposed (vec16 K) packings; both
    unpack as views, equal to the permutation gather they replace."""
    bs, d = 16, 8
    i = torch.arange(bs * d)
    rows, cols = i.clone(), (i % d) * bs + i // d
    assert paged_kv.packing_kind(rows, bs, d) == "rows" and paged_kv.packing_kind(cols, bs, d) == "cols"
    other = torch.randperm(bs * d, generator=torch.Generator().manual_seed(0))
    assert paged_kv.packing_kind(other, bs, d) is other
    pages = torch.randn(3, 2, 2 * bs, d)
    for perm in (rows, cols, other):
        kind = paged_kv.packing_kind(perm, bs, d)
        k1, v1 = paged_kv.unpack_cpu_pages(pages, perm, perm)
        k2, v2 = paged_kv.unpack_cpu_pages(pages, kind, kind)
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
