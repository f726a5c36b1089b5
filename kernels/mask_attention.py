"""Paged mask attention: FlexDraft mask blocks attend to a request's paged KV cache.

Queries are the mask rows of many requests, flattened and ragged:

  q        [total_rows, Hq, D]   query block g is rows [g*B, (g+1)*B)
  blk_req  [num_q_blocks]        block g belongs to block_table row blk_req[g]
  blk_ctx  [num_q_blocks]        block g sees that request's real keys [0, blk_ctx[g])

Block g attends to
  * the first blk_ctx[g] real keys of its request, read from vLLM's paged
    cache (key_cache/value_cache [num_pages, page_size, Hkv, D], any strides
    with a contiguous last dim, so `paged_kv_views` of vLLM's combined
    per-layer tensor work without a copy; position n lives in page
    block_table[req, n // page_size], slot n % page_size), and
  * all B keys of its own block (k_blk/v_blk rows [g*B, (g+1)*B)),
    bidirectionally.
GQA: query head h reads kv head h // (Hq // Hkv). Softmax is fp32.

This is exactly flexdraft_vllm.reference.attention.block_attention per request;
`mask_attention_ref` gathers the pages and calls it. Invariants: nothing is
ever written to the cache; cache positions >= blk_ctx[g] are never read (so
stale or unallocated pages past the context are harmless).

Kernel layout: one program per (query block, group of query heads sharing one
kv head, kv split). Its BLOCK_M rows are (mask row b, head h) pairs, so one
K/V tile load serves every GQA head of the group. The block's own keys are
processed first (split 0 only), so the running max is finite before any
masked context tile and the online softmax needs no -inf guards. With
NUM_SPLITS > 1 the context is cut into NUM_SPLITS ranges (flash-decoding);
partial outputs and log-sum-exps are merged by `mask_attention_reduce_kernel`.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from flexdraft_vllm.reference.attention import block_attention

from ._backend import next_pow2, want_triton

LOG2E = 1.4426950408889634
MAX_ROWS_PER_PROGRAM = 64  # BLOCK_M cap when choosing how many GQA heads share a program


# ---- reference -----------------------------------------------------------------------
def gather_paged(
    cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    block_row: torch.Tensor,  # [max_pages] int: one request's block-table row
    n: int,  # positions to read
) -> torch.Tensor:  # [n, Hkv, D]
    page = cache.shape[1]
    used = (n + page - 1) // page
    return cache[block_row[:used].long()].reshape(used * page, *cache.shape[2:])[:n]


def mask_attention_ref(
    q: torch.Tensor,  # [total_rows, Hq, D]
    k_blk: torch.Tensor,  # [total_rows, Hkv, D]
    v_blk: torch.Tensor,  # [total_rows, Hkv, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    block_table: torch.Tensor,  # [num_reqs, max_pages] int
    blk_req: torch.Tensor,  # [num_q_blocks] int
    blk_ctx: torch.Tensor,  # [num_q_blocks] int
    scale: float,
    block_size: int,
) -> torch.Tensor:  # [total_rows, Hq, D]
    """Gather each request's context from the pages, then block_attention (the reference)."""
    total, Hq, D = q.shape
    G, B = total // block_size, block_size
    out = torch.empty_like(q)
    qb, kb, vb, ob = (t.view(G, B, *t.shape[1:]) for t in (q, k_blk, v_blk, out))
    reqs, ctxs = blk_req.tolist(), blk_ctx.tolist()
    for r in sorted(set(reqs)):
        gs = [g for g in range(G) if reqs[g] == r]
        T = max(ctxs[g] for g in gs)
        kc = gather_paged(key_cache, block_table[r], T)
        vc = gather_paged(value_cache, block_table[r], T)
        idx = torch.tensor(gs, device=q.device)
        lens = torch.tensor([ctxs[g] for g in gs], device=q.device)
        ob[idx] = block_attention(qb[idx], kb[idx], vb[idx], kc, vc, lens, scale)
    return out


# ---- kernels ---------------------------------------------------------------------------
@triton.jit
def _online_update(q, k, v, s_mask, m_i, l_i, acc, scale_log2, IS_FP32: tl.constexpr):
    # one flash-attention step over a key tile; m_i stays finite (see module docstring)
    if IS_FP32:
        s = tl.dot(q, k, input_precision="ieee")
    else:
        s = tl.dot(q, k)
    s = tl.where(s_mask, s * scale_log2, float("-inf"))  # log2 domain
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    if IS_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def mask_attention_kernel(
    out_ptr,  # [total_rows, Hq, D]                  written when NUM_SPLITS == 1
    o_part_ptr,  # [NUM_SPLITS, total_rows, Hq, D] fp32  written when NUM_SPLITS > 1
    lse_part_ptr,  # [NUM_SPLITS, total_rows, Hq] fp32   log2-sum-exp2 of each split
    q_ptr,  # [total_rows, Hq, D]
    k_blk_ptr,  # [total_rows, Hkv, D]
    v_blk_ptr,  # [total_rows, Hkv, D]
    key_cache_ptr,  # [num_pages, page_size, Hkv, D]
    value_cache_ptr,  # [num_pages, page_size, Hkv, D]
    block_table_ptr,  # [num_reqs, max_pages] int
    blk_req_ptr,  # [num_q_blocks] int
    blk_ctx_ptr,  # [num_q_blocks] int
    scale_log2,  # softmax scale * log2(e)
    stride_qt, stride_qh,
    stride_kbt, stride_kbh,
    stride_vbt, stride_vbh,
    stride_kcp, stride_kcs, stride_kch,
    stride_vcp, stride_vcs, stride_vch,
    stride_bt,
    stride_ot, stride_oh,
    total_rows, num_q_heads,
    BLOCK_SIZE: tl.constexpr,  # B: mask rows per query block
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next_pow2(HEAD_DIM)
    HEADS_PER_KV: tl.constexpr,  # Hq // Hkv
    HEADS_PER_PROG: tl.constexpr,  # divides HEADS_PER_KV
    BLOCK_M: tl.constexpr,  # >= BLOCK_SIZE * HEADS_PER_PROG, >= 16
    BLOCK_N: tl.constexpr,  # context keys per tile
    BLOCK_B: tl.constexpr,  # >= BLOCK_SIZE, >= 16
    NUM_SPLITS: tl.constexpr,
    IS_FP32: tl.constexpr,
):
    g = tl.program_id(0)
    h0 = tl.program_id(1) * HEADS_PER_PROG
    split = tl.program_id(2)
    kvh = h0 // HEADS_PER_KV
    req = tl.load(blk_req_ptr + g).to(tl.int64)
    ctx_len = tl.load(blk_ctx_ptr + g).to(tl.int32)

    offs_m = tl.arange(0, BLOCK_M)
    row_b = offs_m // HEADS_PER_PROG  # mask row inside the block
    row_h = h0 + offs_m % HEADS_PER_PROG  # query head
    m_valid = row_b < BLOCK_SIZE
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    tok = g.to(tl.int64) * BLOCK_SIZE + row_b  # flattened row of q / out

    q = tl.load(q_ptr + tok[:, None] * stride_qt + row_h[:, None] * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_valid[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # this split's context range [lo, hi), whole BLOCK_N tiles except the last
    tiles = tl.cdiv(ctx_len, BLOCK_N)
    per_split = tl.cdiv(tiles, NUM_SPLITS)
    lo = split * per_split * BLOCK_N
    hi = tl.minimum(lo + per_split * BLOCK_N, ctx_len)

    if split == 0:  # the block's own B keys: bidirectional, always visible
        offs_b = tl.arange(0, BLOCK_B)
        b_valid = offs_b < BLOCK_SIZE
        kb_row = g.to(tl.int64) * BLOCK_SIZE + offs_b
        kb = tl.load(k_blk_ptr + kb_row[None, :] * stride_kbt + kvh * stride_kbh + offs_d[:, None],
                     mask=b_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_B]
        vb = tl.load(v_blk_ptr + kb_row[:, None] * stride_vbt + kvh * stride_vbh + offs_d[None, :],
                     mask=b_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_B, BLOCK_D]
        m_i, l_i, acc = _online_update(q, kb, vb, b_valid[None, :], m_i, l_i, acc, scale_log2, IS_FP32)

    bt_row = block_table_ptr + req * stride_bt
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_valid = offs_n < hi
        page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_valid, other=0).to(tl.int64)
        slot = (offs_n % PAGE_SIZE).to(tl.int64)
        k = tl.load(key_cache_ptr + page[None, :] * stride_kcp + slot[None, :] * stride_kcs
                    + kvh * stride_kch + offs_d[:, None],
                    mask=n_valid[None, :] & d_valid[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        v = tl.load(value_cache_ptr + page[:, None] * stride_vcp + slot[:, None] * stride_vcs
                    + kvh * stride_vch + offs_d[None, :],
                    mask=n_valid[:, None] & d_valid[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        m_i, l_i, acc = _online_update(q, k, v, n_valid[None, :], m_i, l_i, acc, scale_log2, IS_FP32)

    o_mask = m_valid[:, None] & d_valid[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(out_ptr + tok[:, None] * stride_ot + row_h[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=o_mask)
    else:
        # an empty split (no keys) has l_i == 0: it stores o = 0, lse = -inf (weight 0 in the merge)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        base = (split * total_rows + tok) * num_q_heads + row_h
        tl.store(o_part_ptr + base[:, None] * HEAD_DIM + offs_d[None, :], out, mask=o_mask)
        tl.store(lse_part_ptr + base, lse, mask=m_valid)


@triton.jit
def mask_attention_reduce_kernel(
    out_ptr,  # [total_rows, Hq, D]
    o_part_ptr,  # [NUM_SPLITS, total_rows, Hq, D] fp32
    lse_part_ptr,  # [NUM_SPLITS, total_rows, Hq] fp32
    stride_ot, stride_oh,
    total_rows, num_q_heads,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,  # next_pow2(NUM_SPLITS)
):
    # split 0 always holds the block's own keys, so at least one lse is finite
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    s_valid = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, BLOCK_D)
    d_valid = offs_d < HEAD_DIM
    base = (offs_s * total_rows + t) * num_q_heads + h
    lse = tl.load(lse_part_ptr + base, mask=s_valid, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, axis=0))
    w = w / tl.sum(w, axis=0)
    o = tl.load(o_part_ptr + base[:, None] * HEAD_DIM + offs_d[None, :],
                mask=s_valid[:, None] & d_valid[None, :], other=0.0)
    out = tl.sum(w[:, None] * o, axis=0)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_valid)


# ---- launchers -------------------------------------------------------------------------
def _heads_per_prog(block_size: int, rep: int) -> int:
    # largest divisor of rep keeping BLOCK_M = block_size * heads <= MAX_ROWS_PER_PROGRAM
    best = 1
    for h in range(1, rep + 1):
        if rep % h == 0 and block_size * h <= MAX_ROWS_PER_PROGRAM:
            best = h
    return best


def _auto_splits(programs: int, max_ctx: int, block_n: int, device: torch.device) -> int:
    # flash-decoding: split the context only when the grid cannot fill the GPU
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    if programs >= sms:
        return 1
    return max(1, min(16, triton.cdiv(2 * sms, programs), triton.cdiv(max_ctx, 4 * block_n)))


def mask_attention(
    q: torch.Tensor,  # [total_rows, Hq, D] fp16 / bf16 / fp32
    k_blk: torch.Tensor,  # [total_rows, Hkv, D]
    v_blk: torch.Tensor,  # [total_rows, Hkv, D]
    key_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    value_cache: torch.Tensor,  # [num_pages, page_size, Hkv, D]
    block_table: torch.Tensor,  # [num_reqs, max_pages] int32 (any int dtype)
    blk_req: torch.Tensor,  # [num_q_blocks] int: block_table row of each query block
    blk_ctx: torch.Tensor,  # [num_q_blocks] int: real keys visible to each query block
    scale: float,
    block_size: int,
    *,
    out: torch.Tensor | None = None,  # [total_rows, Hq, D]
    num_splits: int | None = None,  # kv splits; None = heuristic (no host sync)
    max_ctx_len: int | None = None,  # upper bound on blk_ctx for the split heuristic
    block_n: int = 64,
    use_triton: bool | None = None,
) -> torch.Tensor:  # [total_rows, Hq, D]
    """Mask attention over the paged cache; Triton on CUDA, `mask_attention_ref` otherwise.

    The CUDA path never syncs with the host (CUDA-graph safe); blk_ctx values
    must not exceed the pages listed in block_table (not checked: it would sync).
    """
    total, Hq, D = q.shape
    num_pages, page_size, Hkv, Dk = key_cache.shape
    G = total // block_size
    assert total == G * block_size and block_size >= 1, "q rows must be whole blocks of block_size"
    assert Dk == D and value_cache.shape == key_cache.shape, "key/value cache shape mismatch"
    assert k_blk.shape == (total, Hkv, D) and v_blk.shape == k_blk.shape, "k_blk/v_blk must be [total_rows, Hkv, D]"
    assert Hq % Hkv == 0, "GQA needs Hq divisible by Hkv"
    assert blk_req.shape == (G,) and blk_ctx.shape == (G,), "one blk_req / blk_ctx entry per query block"
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported dtype {q.dtype}"
    assert k_blk.dtype == v_blk.dtype == key_cache.dtype == value_cache.dtype == q.dtype, "mixed dtypes"
    tensors = [q, k_blk, v_blk, key_cache, value_cache, block_table, blk_req, blk_ctx]
    if not want_triton(mask_attention_kernel, tensors, use_triton):
        ref = mask_attention_ref(q, k_blk, v_blk, key_cache, value_cache, block_table, blk_req, blk_ctx,
                                 scale, block_size)
        return ref if out is None else out.copy_(ref)
    for t in (q, k_blk, v_blk, key_cache, value_cache, block_table):
        assert t.stride(-1) == 1, "last dimension must be contiguous"
    if out is None:
        out = torch.empty_like(q)
    if G == 0:
        return out
    rep = Hq // Hkv
    hpp = _heads_per_prog(block_size, rep)
    grid_heads = Hq // hpp
    if num_splits is None:
        bound = max_ctx_len if max_ctx_len is not None else block_table.shape[1] * page_size
        num_splits = _auto_splits(G * grid_heads, bound, block_n, q.device)
    num_splits = max(1, int(num_splits))
    if num_splits > 1:
        o_part = torch.empty((num_splits, total, Hq, D), dtype=torch.float32, device=q.device)
        lse_part = torch.empty((num_splits, total, Hq), dtype=torch.float32, device=q.device)
    else:
        o_part = lse_part = out  # unused
    mask_attention_kernel[(G, grid_heads, num_splits)](
        out, o_part, lse_part, q, k_blk, v_blk, key_cache, value_cache, block_table, blk_req, blk_ctx,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_blk.stride(0), k_blk.stride(1),
        v_blk.stride(0), v_blk.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_table.stride(0),
        out.stride(0), out.stride(1),
        total, Hq,
        BLOCK_SIZE=block_size,
        PAGE_SIZE=page_size,
        HEAD_DIM=D,
        BLOCK_D=next_pow2(D),
        HEADS_PER_KV=rep,
        HEADS_PER_PROG=hpp,
        BLOCK_M=max(16, next_pow2(block_size * hpp)),
        BLOCK_N=block_n,
        BLOCK_B=max(16, next_pow2(block_size)),
        NUM_SPLITS=num_splits,
        IS_FP32=q.dtype == torch.float32,
    )
    if num_splits > 1:
        mask_attention_reduce_kernel[(total, Hq)](
            out, o_part, lse_part, out.stride(0), out.stride(1), total, Hq,
            HEAD_DIM=D, BLOCK_D=next_pow2(D), NUM_SPLITS=num_splits, BLOCK_S=next_pow2(num_splits),
        )
    return out


def paged_kv_views(
    kv_cache: torch.Tensor,  # one layer's vLLM KV cache (see `layout`)
    head_dim: int,
    layout: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:  # key_cache, value_cache: [num_pages, page_size, Hkv, D] views
    """Strided key/value views of a vLLM KV cache; nothing is copied.

    layout
      "flash"  vLLM 0.32 FLASH_ATTN / TRITON_ATTN: kv_cache [num_blocks, Hkv, block_size, 2*D]
               (logical; any physical stride order), slot content [K(D) | V(D)]; the
               backends read it as kv_cache.transpose(1, 2).split(D, dim=-1).
      "cpu"    vLLM 0.32 CPU_ATTN: the same 4-D shape, viewed as [num_blocks, Hkv, 2*block_size, D]:
               per page and head, block_size key rows then block_size value rows.
      "split"  older vLLM FLASH_ATTN: kv_cache [2, num_blocks, block_size, Hkv, D].
      None     5-D -> "split"; 4-D -> "flash" on CUDA, "cpu" elsewhere.
    """
    if layout is None:
        layout = "split" if kv_cache.dim() == 5 else ("flash" if kv_cache.is_cuda else "cpu")
    if layout == "split":
        assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.shape[-1] == head_dim, (
            f"layout 'split' expects kv_cache [2, num_pages, page_size, Hkv, {head_dim}], got {tuple(kv_cache.shape)}")
        return kv_cache[0], kv_cache[1]
    assert kv_cache.dim() == 4 and kv_cache.shape[-1] == 2 * head_dim, (
        f"layout {layout!r} expects kv_cache [num_pages, Hkv, page_size, {2 * head_dim}], got {tuple(kv_cache.shape)}")
    if layout == "flash":
        kv = kv_cache.transpose(1, 2)  # [num_pages, page_size, Hkv, 2D]
        return kv[..., :head_dim], kv[..., head_dim:]
    if layout == "cpu":
        nb, hkv, page, _ = kv_cache.shape
        kv = kv_cache.view(nb, hkv, 2 * page, head_dim)
        return kv[:, :, :page].transpose(1, 2), kv[:, :, page:].transpose(1, 2)
    raise ValueError(f"unknown KV-cache layout {layout!r}: use 'flash', 'cpu' or 'split'")


def mask_attention_for_blocks(
    q: torch.Tensor,  # [N, B, Hq, D] one query block per entry
    k: torch.Tensor,  # [N, B, Hkv, D] the blocks' own keys
    v: torch.Tensor,  # [N, B, Hkv, D]
    kv_cache: torch.Tensor,  # one layer's vLLM KV cache, see `paged_kv_views`
    block_table: torch.Tensor,  # [num_reqs, max_pages] int
    req_idx: torch.Tensor,  # [N] int: block_table row of each block
    ctx: torch.Tensor,  # [N] int: real keys each block sees
    scale: float,
    layout: str | None = None,
    **kw,
) -> torch.Tensor:  # [N, B, Hq, D]
    """The proposer's `attend` shape: [N, B, H, D] blocks over one layer's vLLM kv_cache tensor.

    On CUDA with vLLM 0.32 the cache is [num_blocks, Hkv, block_size, 2*D] ("flash" layout).
    """
    N, B, Hq, D = q.shape
    Hkv = k.shape[2]
    key_cache, value_cache = paged_kv_views(kv_cache, D, layout)
    out = mask_attention(
        q.reshape(N * B, Hq, D), k.reshape(N * B, Hkv, D), v.reshape(N * B, Hkv, D),
        key_cache, value_cache, block_table, req_idx, ctx, scale, B, **kw,
    )
    return out.view(N, B, Hq, D)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
