"""Reference attention for FlexDraft, dense and readable (fp32 softmax).

Two patterns, both per request:

* real rows: causal over [committed cache | this step's candidates].
* mask block: a block of B mask rows at positions ctx..ctx+B-1 attends to
  the first `ctx` real keys (everything before its bonus slot) and to all B
  rows of its own block (bidirectional). Mask K/V are temporary: they are
  passed in, never stored.

`block_attention` is the math the Triton kernel in kernels/ reproduces over a
paged KV cache.
"""

from __future__ import annotations

import torch


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    # [T, Hkv, D] -> [T, Hkv*n_rep, D] (GQA: query head h uses kv head h // n_rep)
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_attention(
    q: torch.Tensor,  # [n, Hq, D] new rows, positions T-n..T-1
    k: torch.Tensor,  # [T, Hkv, D] cache + new rows
    v: torch.Tensor,  # [T, Hkv, D]
    scale: float,
) -> torch.Tensor:  # [n, Hq, D]
    n, T = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = _expand_kv(k, rep), _expand_kv(v, rep)
    scores = torch.einsum("nhd,thd->hnt", q.float(), k.float()) * scale
    # row i sits at absolute index T-n+i and sees keys 0..T-n+i
    allowed = torch.arange(T, device=q.device)[None, :] <= (torch.arange(n, device=q.device)[:, None] + T - n)
    scores = scores.masked_fill(~allowed[None], float("-inf"))
    return torch.einsum("hnt,thd->nhd", scores.softmax(-1), v.float()).to(q.dtype)


def block_attention(
    q: torch.Tensor,  # [G, B, Hq, D] mask queries, G blocks of one request
    k_blk: torch.Tensor,  # [G, B, Hkv, D] the blocks' own keys (tuned projectors)
    v_blk: torch.Tensor,  # [G, B, Hkv, D]
    k_ctx: torch.Tensor,  # [T, Hkv, D] real keys of the request (frozen projectors)
    v_ctx: torch.Tensor,  # [T, Hkv, D]
    ctx_lens: torch.Tensor,  # [G] int: block g sees real keys [0, ctx_lens[g])
    scale: float,
) -> torch.Tensor:  # [G, B, Hq, D]
    G, B, Hq, D = q.shape
    T = k_ctx.shape[0]
    assert int(ctx_lens.max()) <= T, "a block cannot see more context than exists"
    rep = Hq // k_ctx.shape[1]
    kc, vc = _expand_kv(k_ctx, rep).float(), _expand_kv(v_ctx, rep).float()
    kb = _expand_kv(k_blk.reshape(G * B, -1, D), rep).view(G, B, Hq, D).float()
    vb = _expand_kv(v_blk.reshape(G * B, -1, D), rep).view(G, B, Hq, D).float()
    qf = q.float()
    s_ctx = torch.einsum("gbhd,thd->ghbt", qf, kc) * scale  # [G, Hq, B, T]
    visible = torch.arange(T, device=q.device)[None, :] < ctx_lens[:, None].to(q.device)  # [G, T]
    s_ctx = s_ctx.masked_fill(~visible[:, None, None, :], float("-inf"))
    s_blk = torch.einsum("gbhd,gchd->ghbc", qf, kb) * scale  # [G, Hq, B, B], bidirectional
    p = torch.cat([s_ctx, s_blk], dim=-1).softmax(-1)
    out = torch.einsum("ghbt,thd->gbhd", p[..., :T], vc) + torch.einsum("ghbc,gchd->gbhd", p[..., T:], vb)
    return out.to(q.dtype)


def batched_block_attention(
    q: torch.Tensor,  # [N, G, B, Hq, D] G mask blocks for each of N requests
    k_blk: torch.Tensor,  # [N, G, B, Hkv, D] the blocks' own keys
    v_blk: torch.Tensor,  # [N, G, B, Hkv, D]
    k_ctx: torch.Tensor,  # [N, T, Hkv, D] real keys, padded to the longest context
    v_ctx: torch.Tensor,  # [N, T, Hkv, D]
    ctx_lens: torch.Tensor,  # [N, G] int: block (n, g) sees real keys [0, ctx_lens[n, g])
    scale: float,
) -> torch.Tensor:  # [N, G, B, Hq, D]
    """block_attention for N requests at once (no Python loop over requests):
    the sequential draft pass has G = 1 block per request, parallel mode's
    groups share their request's context and differ only in how much of it
    they see. Keys past a block's ctx_len are masked out, so padding contents
    never matter."""
    N, G, B, Hq, D = q.shape
    T = k_ctx.shape[1]
    rep = Hq // k_ctx.shape[2]
    kc = k_ctx.float().repeat_interleave(rep, dim=2) if rep > 1 else k_ctx.float()
    vc = v_ctx.float().repeat_interleave(rep, dim=2) if rep > 1 else v_ctx.float()
    kb = k_blk.float().repeat_interleave(rep, dim=3) if rep > 1 else k_blk.float()
    vb = v_blk.float().repeat_interleave(rep, dim=3) if rep > 1 else v_blk.float()
    qf = q.float()
    pos = torch.arange(T, device=q.device)
    visible = pos[None, None, :] < ctx_lens[:, :, None].to(q.device)  # [N, G, T]
    # rows past every block's context may hold anything (unwritten pages, NaN):
    # zero them, since a masked probability of 0 times a NaN value would still poison the output
    any_visible = visible.any(1)  # [N, T]
    kc = kc.masked_fill(~any_visible[:, :, None, None], 0.0)
    vc = vc.masked_fill(~any_visible[:, :, None, None], 0.0)
    s_ctx = torch.einsum("ngbhd,nthd->nghbt", qf, kc) * scale  # [N, G, Hq, B, T]
    s_ctx = s_ctx.masked_fill(~visible[:, :, None, None, :], float("-inf"))
    s_blk = torch.einsum("ngbhd,ngchd->nghbc", qf, kb) * scale  # [N, G, Hq, B, B], bidirectional
    p = torch.cat([s_ctx, s_blk], dim=-1).softmax(-1)
    out = torch.einsum("nghbt,nthd->ngbhd", p[..., :T], vc) + torch.einsum("nghbc,ngchd->ngbhd", p[..., T:], vb)
    return out.to(q.dtype)
