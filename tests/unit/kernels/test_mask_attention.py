"""Paged mask attention: Triton kernel (interpreted on CPU) vs references.

Accuracy rule: against an fp64 dense truth, the kernel's max error must be at
most 2x the error of torch's own attention in the same precision (SDPA on the
gathered, contiguous K/V) plus a few ulps; the fp32 `mask_attention_ref` must
agree likewise. Pages past a block's context are poisoned with NaN and block
table entries past the used pages point far outside the cache, so any read
past the context shows up as NaN or a crash; the cache is compared bitwise
before and after (nothing is written).
"""

from __future__ import annotations

import math

import pytest
import torch

from flexdraft_kernels import _backend
from flexdraft_kernels import mask_attention as M

if not _backend.is_interpreted(M.mask_attention_kernel):  # see conftest.py
    raise RuntimeError("flexdraft_kernels was imported without TRITON_INTERPRET=1: the kernel would not run on CPU")

BAD_PAGE = 1 << 30  # block-table entries past the used pages: far outside the cache


# ---- case construction ------------------------------------------------------------------
class Case:
    def __init__(self, ctxs, B, Hq, Hkv, D, page, dtype, seed=0, spare_pages=2):
        """ctxs[r] = context lengths of request r's query blocks (ragged; [] = no blocks)."""
        g = torch.Generator().manual_seed(seed)
        rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        self.B, self.Hq, self.Hkv, self.D, self.page, self.dtype = B, Hq, Hkv, D, page, dtype
        R = len(ctxs)
        need = [math.ceil(max(c, default=0) / page) for c in ctxs]
        num_pages = sum(need) + spare_pages
        self.key_cache = rnd(num_pages, page, Hkv, D).to(dtype)
        self.value_cache = rnd(num_pages, page, Hkv, D).to(dtype)
        perm = torch.randperm(num_pages, generator=g)
        self.block_table = torch.full((R, max(need, default=0) + 1), BAD_PAGE, dtype=torch.int32)
        used, at = set(), 0
        for r, n in enumerate(need):
            self.block_table[r, :n] = perm[at : at + n].int()
            used.update(perm[at : at + n].tolist())
            # poison the slots of the last page past the request's longest context
            T = max(ctxs[r], default=0)
            if n and T % page:
                last = int(perm[at + n - 1])
                self.key_cache[last, T % page :] = float("nan")
                self.value_cache[last, T % page :] = float("nan")
            at += n
        for p in range(num_pages):  # pages nobody owns
            if p not in used:
                self.key_cache[p] = float("nan")
                self.value_cache[p] = float("nan")
        self.blk_req = torch.tensor([r for r, c in enumerate(ctxs) for _ in c], dtype=torch.int64)
        self.blk_ctx = torch.tensor([x for c in ctxs for x in c], dtype=torch.int64)
        G = len(self.blk_req)
        self.q = rnd(G * B, Hq, D).to(dtype)
        self.k_blk = rnd(G * B, Hkv, D).to(dtype)
        self.v_blk = rnd(G * B, Hkv, D).to(dtype)
        self.scale = 1.0 / math.sqrt(D)

    def args(self):
        return (self.q, self.k_blk, self.v_blk, self.key_cache, self.value_cache, self.block_table,
                self.blk_req, self.blk_ctx, self.scale, self.B)

    def gathered(self, g, dtype):
        """Block g's keys/values as dense [T + B, Hkv, D]: context then own block."""
        r, n, B = int(self.blk_req[g]), int(self.blk_ctx[g]), self.B
        kc = M.gather_paged(self.key_cache, self.block_table[r], n)
        vc = M.gather_paged(self.value_cache, self.block_table[r], n)
        k = torch.cat([kc, self.k_blk[g * B : (g + 1) * B]]).to(dtype)
        v = torch.cat([vc, self.v_blk[g * B : (g + 1) * B]]).to(dtype)
        return k, v

    def dense(self, dtype, sdpa: bool):
        """fp64 truth (sdpa=False, dtype=float64) or torch SDPA in `dtype` (sdpa=True)."""
        B, rep = self.B, self.Hq // self.Hkv
        out = torch.empty(self.q.shape, dtype=dtype)
        for g in range(len(self.blk_req)):
            k, v = self.gathered(g, dtype)
            k, v = k.repeat_interleave(rep, 1).transpose(0, 1), v.repeat_interleave(rep, 1).transpose(0, 1)
            q = self.q[g * B : (g + 1) * B].to(dtype).transpose(0, 1)  # [Hq, B, D]
            if sdpa:
                o = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=self.scale)
            else:
                o = torch.softmax(q @ k.transpose(1, 2) * self.scale, -1) @ v
            out[g * B : (g + 1) * B] = o.transpose(0, 1)
        return out


def max_err(x, truth):
    return float((x.double() - truth).abs().max()) if x.numel() else 0.0


def check_accuracy(case: Case, out: torch.Tensor):
    assert out.dtype == case.dtype and out.shape == case.q.shape
    assert torch.isfinite(out).all(), "NaN/inf in the output: a poisoned (past-context) slot was read"
    truth = case.dense(torch.float64, sdpa=False)
    torch_err = max_err(case.dense(case.dtype, sdpa=True), truth)
    eps = 4 * torch.finfo(case.dtype).eps * float(truth.abs().max().clamp_min(1e-3)) if truth.numel() else 0
    ref_err = max_err(M.mask_attention_ref(*case.args()), truth)
    kern_err = max_err(out, truth)
    assert ref_err <= 2 * torch_err + eps, (ref_err, torch_err, eps)
    assert kern_err <= 2 * torch_err + eps, f"kernel err {kern_err:.3g} vs torch {case.dtype} err {torch_err:.3g}"
    return kern_err, torch_err


def run_kernel(case: Case, **kw):
    kc0, vc0 = case.key_cache.clone(), case.value_cache.clone()
    out = M.mask_attention(*case.args(), use_triton=True, **kw)
    # bitwise (NaN-safe): nothing was written to the cache
    assert torch.equal(case.key_cache.view(torch.uint8), kc0.view(torch.uint8))
    assert torch.equal(case.value_cache.view(torch.uint8), vc0.view(torch.uint8))
    return out


# ---- tests --------------------------------------------------------------------------------
RAGGED = [[0, 5], [16, 17, 37], [], [3]]  # ctx 0, mid-page, exact page, a request without blocks

CASES = [  # B, Hq, Hkv, D, page, dtype, num_splits, block_n
    (4, 4, 2, 64, 16, torch.float32, 1, 16),
    (8, 8, 2, 128, 16, torch.bfloat16, 3, 16),
    (1, 3, 1, 64, 8, torch.float16, 1, 16),
    (8, 9, 3, 80, 16, torch.float32, 2, 32),  # SmolLM2-like GQA, non-power-of-2 head dim
    (4, 9, 3, 64, 16, torch.bfloat16, 1, 32),
    (1, 4, 4, 128, 16, torch.float32, 4, 16),
    (8, 2, 2, 64, 8, torch.float16, 2, 16),
]


@pytest.mark.parametrize("B,Hq,Hkv,D,page,dtype,splits,block_n", CASES,
                         ids=[f"B{c[0]}-H{c[1]}/{c[2]}-D{c[3]}-p{c[4]}-{str(c[5])[6:]}-s{c[6]}" for c in CASES])
def test_kernel_matches_reference(B, Hq, Hkv, D, page, dtype, splits, block_n):
    case = Case(RAGGED, B, Hq, Hkv, D, page, dtype, seed=B * 100 + D)
    out = run_kernel(case, num_splits=splits, block_n=block_n)
    check_accuracy(case, out)


def test_more_splits_than_tiles_and_long_context():
    # 7 splits over 3 tiles: empty splits carry weight 0 in the merge
    case = Case([[40], [0]], 4, 4, 2, 64, 16, torch.float32, seed=3)
    check_accuracy(case, run_kernel(case, num_splits=7, block_n=16))


def test_no_read_past_context():
    # one block per request, so everything past each context is NaN or an invalid page
    case = Case([[1], [9], [16], [0]], 4, 4, 2, 64, 8, torch.float32, seed=5, spare_pages=3)
    for splits in (1, 2):
        out = run_kernel(case, num_splits=splits, block_n=16)
        check_accuracy(case, out)


def test_ctx_zero_is_block_only_attention():
    case = Case([[0, 0]], 4, 2, 1, 64, 16, torch.float32, seed=7)
    out = run_kernel(case, num_splits=2, block_n=16)
    q, k, v = case.q.view(2, 4, 2, 64), case.k_blk.view(2, 4, 1, 64), case.v_blk.view(2, 4, 1, 64)
    s = torch.einsum("gbhd,gchd->ghbc", q.double(), k.double()) * case.scale
    want = torch.einsum("ghbc,gchd->gbhd", s.softmax(-1), v.double().expand(-1, -1, 2, -1))
    torch.testing.assert_close(out.view(2, 4, 2, 64).double(), want, atol=1e-5, rtol=1e-5)


def test_empty_batch_and_out_argument():
    case = Case([[]], 4, 2, 1, 64, 16, torch.float32)
    assert M.mask_attention(*case.args(), use_triton=True).shape == (0, 2, 64)
    case = Case([[5, 9]], 4, 2, 1, 64, 16, torch.float32, seed=11)
    out = torch.full_like(case.q, float("nan"))
    res = M.mask_attention(*case.args(), use_triton=True, out=out, num_splits=1, block_n=16)
    assert res.data_ptr() == out.data_ptr()
    check_accuracy(case, out)


def test_dispatch_rule():
    case = Case([[5]], 4, 2, 1, 64, 16, torch.float32)
    ref = M.mask_attention(*case.args())  # CPU tensors, use_triton=None -> reference
    assert torch.equal(ref, M.mask_attention_ref(*case.args()))
    assert torch.equal(M.mask_attention(*case.args(), use_triton=False), ref)


@pytest.mark.parametrize("layout", ["flash", "flash-hnd", "cpu", "split"])
def test_vllm_kv_cache_layouts(layout):
    """mask_attention_for_blocks reads each vLLM layout through strided views (no copy)."""
    case = Case([[13], [0], [21]], 4, 4, 2, 64, 8, torch.float32, seed=13)
    kc, vc = case.key_cache, case.value_cache  # [P, page, Hkv, D]
    P, page, Hkv, D = kc.shape
    if layout == "split":
        kv = torch.stack([kc, vc])  # [2, P, page, Hkv, D]
    elif layout == "cpu":  # [P, Hkv, page, 2D] holding, per page and head, page K rows then page V rows
        kv = torch.cat([kc.transpose(1, 2), vc.transpose(1, 2)], dim=2).reshape(P, Hkv, page, 2 * D)
    else:  # flash: logical [P, Hkv, page, 2D] with [K | V] per slot; NHD (default) or HND physical order
        nhd = torch.cat([kc, vc], dim=-1)  # [P, page, Hkv, 2D]
        kv = nhd.transpose(1, 2) if layout == "flash" else nhd.transpose(1, 2).contiguous()
    lay = layout.split("-")[0]
    kview, vview = M.paged_kv_views(kv, D, lay)
    assert torch.equal(kview.nan_to_num(), kc.nan_to_num()) and torch.equal(vview.nan_to_num(), vc.nan_to_num())
    assert kview.untyped_storage().data_ptr() == kv.untyped_storage().data_ptr()  # a view
    G, B, Hq = len(case.blk_req), case.B, case.Hq
    out = M.mask_attention_for_blocks(
        case.q.view(G, B, Hq, D), case.k_blk.view(G, B, Hkv, D), case.v_blk.view(G, B, Hkv, D),
        kv, case.block_table, case.blk_req, case.blk_ctx, case.scale, layout=lay,
        use_triton=True, num_splits=1, block_n=16,
    )
    check_accuracy(case, out.view(G * B, Hq, D))


# ---- larger sweep -----------------------------------------------------------------------
SWEEP = [
    (B, Hq, Hkv, D, dtype, 1 + 2 * ((B + D + Hq + i) % 2))  # num_splits 1 or 3, alternating
    for B in (1, 4, 8)
    for (Hq, Hkv) in ((4, 4), (8, 2), (9, 3))
    for D in (64, 80, 128)
    for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16))
]


@pytest.mark.slow
@pytest.mark.parametrize("B,Hq,Hkv,D,dtype,splits", SWEEP,
                         ids=[f"B{c[0]}-H{c[1]}/{c[2]}-D{c[3]}-{str(c[4])[6:]}-s{c[5]}" for c in SWEEP])
def test_sweep(B, Hq, Hkv, D, dtype, splits):
    ctxs = [[0, 7], [16, 33, 70], [1], [129]]
    case = Case(ctxs, B, Hq, Hkv, D, 16, dtype, seed=B + Hq + D)
    check_accuracy(case, run_kernel(case, num_splits=splits, block_n=32))
