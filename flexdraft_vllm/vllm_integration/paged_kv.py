"""Real-token K/V of one request, read back from vLLM's paged KV cache.

CPU backend (CPU_ATTN) layout: kv_cache [num_blocks, Hkv, block_size, 2*D],
which the backend views as [num_blocks, Hkv, 2*block_size, D]: per block and
head, block_size key rows then block_size value rows.
CUDA backends (FLASH_ATTN, TRITON_ATTN) in vLLM 0.32 allocate the same 4-D
shape but read it as kv_cache.transpose(1, 2).split(D, -1): per block, slot
and head, the key in [:D] and the value in [D:]. There the Triton kernel
(flexdraft_kernels.mask_attention) reads the pages directly and nothing is
gathered; `gather` serves tests and the fallback. Older vLLMs used a 5-D
[2, num_blocks, block_size, Hkv, D] split layout, also accepted.

Invariant: only positions [0, n) are read; they hold committed (or this step's
just-verified) real tokens. Nothing is ever written.
"""

from __future__ import annotations

import torch


def gather_cpu_layout(
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D]
    block_row: torch.Tensor,  # [max_blocks] int, the request's block table row
    n: int,  # tokens to read
    perms: tuple[torch.Tensor, torch.Tensor] | None = None,  # cpu_block_permutations (None: row-major)
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [n, Hkv, D]
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    used = (n + bs - 1) // bs
    pages = kv_cache.view(nb, hkv, 2 * bs, d)[block_row[:used].long()]  # [used, Hkv, 2bs, D]
    if perms is not None:
        kp, vp = unpack_cpu_pages(pages, *perms)
    else:
        kp, vp = pages[:, :, :bs], pages[:, :, bs:]
    k = kp.permute(0, 2, 1, 3).reshape(used * bs, hkv, d)[:n]
    v = vp.permute(0, 2, 1, 3).reshape(used * bs, hkv, d)[:n]
    return k, v


def gather_flash_layout(
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D] read as [nb, bs, Hkv, 2D]
    block_row: torch.Tensor,  # [max_blocks]
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [n, Hkv, D]
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    used = (n + bs - 1) // bs
    pages = kv_cache[block_row[:used].long()].transpose(1, 2).reshape(used * bs, hkv, d2)[:n]
    return pages[..., :d], pages[..., d:]


def gather_split_layout(
    kv_cache: torch.Tensor,  # [2, num_blocks, block_size, Hkv, D]
    block_row: torch.Tensor,  # [max_blocks]
    n: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [n, Hkv, D]
    _, nb, bs, hkv, d = kv_cache.shape
    used = (n + bs - 1) // bs
    idx = block_row[:used].long()
    k = kv_cache[0, idx].reshape(used * bs, hkv, d)[:n]
    v = kv_cache[1, idx].reshape(used * bs, hkv, d)[:n]
    return k, v


def gather(kv_cache: torch.Tensor, block_row: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    if kv_cache.dim() == 4:
        layout = gather_flash_layout if kv_cache.is_cuda else gather_cpu_layout
        return layout(kv_cache, block_row, n)
    if kv_cache.dim() == 5 and kv_cache.shape[0] == 2:
        return gather_split_layout(kv_cache, block_row, n)
    raise NotImplementedError(
        f"FlexDraft cannot read this KV-cache layout {tuple(kv_cache.shape)}; supported: the CPU_ATTN "
        f"and FLASH_ATTN/TRITON_ATTN layouts (unquantized KV cache)"
    )


def gather_batch_cpu_layout(
    kv_cache: torch.Tensor,  # [num_blocks, Hkv, block_size, 2*D]
    block_rows: torch.Tensor,  # [N, max_blocks] int: the requests' block-table rows
    n_max: int,  # longest context to read
    perms: tuple[torch.Tensor, torch.Tensor] | None = None,  # cpu_block_permutations (None: row-major)
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [N, T, Hkv, D], T = pages * block_size >= n_max
    """All N requests' first n_max positions in one gather. Rows past a
    request's own context come from whatever pages its table lists there
    (possibly block 0 / stale): callers must mask by context length."""
    nb, hkv, bs, d2 = kv_cache.shape
    d = d2 // 2
    used = max(1, (n_max + bs - 1) // bs)
    N = block_rows.shape[0]
    pages = kv_cache.view(nb, hkv, 2 * bs, d)[block_rows[:, :used].long()]  # [N, used, Hkv, 2bs, D]
    if perms is not None:
        kp, vp = unpack_cpu_pages(pages, *perms)
    else:
        kp, vp = pages[:, :, :, :bs], pages[:, :, :, bs:]
    k = kp.permute(0, 1, 3, 2, 4).reshape(N, used * bs, hkv, d)
    v = vp.permute(0, 1, 3, 2, 4).reshape(N, used * bs, hkv, d)
    return k, v


def cpu_block_permutations(
    isa: str, block_size: int, head_dim: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:  # perm_k, perm_v: [block_size * head_dim] int64
    """How vLLM's CPU attention packs one (block, head) of K and V for `isa`.

    cpu_attn_reshape_and_cache stores K in an ISA-specific order (e.g. for
    "vec16" transposed: element (t, j) at j * block_size + t), so the cache
    cannot be read as plain [block_size, D] rows. Rather than hard-coding each
    ISA's packing, write distinct values through vLLM's own op into a scratch
    block once and read back where each (t, j) landed: block_flat[perm] is the
    [block_size, D] row-major order."""
    from vllm import _custom_ops as ops

    n = block_size * head_dim
    scratch = torch.zeros(1, 1, 2 * block_size, head_dim, dtype=dtype)
    kc, vc = scratch.chunk(2, dim=2)
    ids = torch.arange(n, dtype=torch.float32).view(block_size, 1, head_dim).to(dtype)
    ops.cpu_attn_reshape_and_cache(ids, ids.clone(), kc, vc, torch.arange(block_size), isa)
    k_flat, v_flat = kc.reshape(n).float().round().long(), vc.reshape(n).float().round().long()
    perms = []
    for flat in (k_flat, v_flat):
        if sorted(flat.tolist()) != list(range(n)):
            raise NotImplementedError(f"FlexDraft cannot decode vLLM's CPU KV packing for isa={isa!r}")
        perm = torch.empty(n, dtype=torch.long)
        perm[flat] = torch.arange(n)  # value i (= row-major index of (t, j)) sits at flat position perm[i]
        perms.append(perm)
    return perms[0], perms[1]


def packing_kind(perm: torch.Tensor, block_size: int, head_dim: int) -> str | torch.Tensor:
    """A permutation from cpu_block_permutations, named when it is a plain layout:
    "rows" (row-major [block_size, D]) or "cols" (transposed: (t, j) at j * block_size + t,
    how the vec16 ISA packs K). Named layouts unpack as views; others keep the gather."""
    n = block_size * head_dim
    i = torch.arange(n)
    if torch.equal(perm, i):
        return "rows"
    if torch.equal(perm, (i % head_dim) * block_size + i // head_dim):
        return "cols"
    return perm


def _unpack(part: torch.Tensor, perm: str | torch.Tensor) -> torch.Tensor:  # [..., bs, D] -> [..., bs, D]
    *lead, bs, d = part.shape
    if isinstance(perm, str):
        assert perm in ("rows", "cols"), perm
        return part if perm == "rows" else part.reshape(*lead, d, bs).transpose(-1, -2)
    return part.reshape(*lead, bs * d)[..., perm].view(*lead, bs, d)


def unpack_cpu_pages(
    pages: torch.Tensor,  # [..., 2*block_size, D] K rows then V rows, as vLLM packed them
    perm_k: str | torch.Tensor,  # [block_size * D] permutation, or its packing_kind
    perm_v: str | torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [..., block_size, D] row-major (maybe strided views)
    bs = pages.shape[-2] // 2
    return _unpack(pages[..., :bs, :], perm_k), _unpack(pages[..., bs:, :], perm_v)


class CpuBlockMask:
    """What cpu_block_attention needs that does not depend on the layer: the
    key mask of N requests x G blocks of B masks over [real keys | own block].
    A draft pass runs every deep layer with the same blocks, so it is built
    once per pass (at a handful of rows, small ops are most of the time)."""

    def __init__(
        self,
        ctx_lens: torch.Tensor,  # [N, G] int: block (n, g) sees real keys [0, ctx_lens[n, g])
        B: int,
        device: torch.device,
    ):
        ctx_lens = ctx_lens.to(device)
        N, G = ctx_lens.shape
        self.lo, self.T = int(ctx_lens.min()), int(ctx_lens.max())  # CPU tensors: no device sync
        T = self.T
        self.seen = self.mask = None
        if self.lo < T:
            visible = torch.arange(T, device=device)[None, None, :] < ctx_lens[:, :, None]  # [N, G, T]
            # rows past every block's context may hold anything (stale or unwritten pages):
            # they are zeroed, since a masked weight of 0 times NaN would still poison the output
            self.seen = visible.any(1)[:, :, None, None]  # [N, T, 1, 1]
            self.mask = torch.cat([visible[:, :, None, :].expand(N, G, B, T),
                                   torch.ones(N, G, B, B, dtype=torch.bool, device=device)],
                                  dim=-1).flatten(0, 1)[:, None]  # [N*G, 1, B, T+B]
        # else every block sees all T real keys and its whole block: no mask at all

    def attend(
        self,
        q: torch.Tensor,  # [N, G, B, Hq, D]
        k_blk: torch.Tensor,  # [N, G, B, Hkv, D] the blocks' own keys
        v_blk: torch.Tensor,  # [N, G, B, Hkv, D]
        k_ctx: torch.Tensor,  # [N, >=T, Hkv, D] real keys (gather_batch_cpu_layout)
        v_ctx: torch.Tensor,  # [N, >=T, Hkv, D]
        scale: float,
    ) -> torch.Tensor:  # [N, G, B, Hq, D]
        N, G, B, Hq, D = q.shape
        T = self.T
        k_ctx, v_ctx = k_ctx[:, :T], v_ctx[:, :T]  # the gather pads to whole pages
        Hkv, c = k_ctx.shape[2], k_ctx.dtype
        if self.seen is not None:
            k_ctx, v_ctx = torch.where(self.seen, k_ctx, 0.0), torch.where(self.seen, v_ctx, 0.0)

        def keys(ctx_part, blk):  # -> [N*G, Hkv, T+B, D]
            ctx_part = ctx_part[:, None].expand(N, G, T, Hkv, D)
            return torch.cat([ctx_part, blk.to(c)], dim=2).flatten(0, 1).transpose(1, 2)

        out = torch.nn.functional.scaled_dot_product_attention(
            q.to(c).flatten(0, 1).transpose(1, 2), keys(k_ctx, k_blk), keys(v_ctx, v_blk),
            attn_mask=self.mask, scale=scale, enable_gqa=Hq != Hkv,
        )  # [N*G, Hq, B, D]
        return out.transpose(1, 2).reshape(N, G, B, Hq, D).to(q.dtype)


def cpu_block_attention(
    q: torch.Tensor,  # [N, G, B, Hq, D] G mask blocks for each of N requests
    k_blk: torch.Tensor,  # [N, G, B, Hkv, D] the blocks' own keys
    v_blk: torch.Tensor,  # [N, G, B, Hkv, D]
    k_ctx: torch.Tensor,  # [N, T, Hkv, D] real keys (gather_batch_cpu_layout), T >= max ctx
    v_ctx: torch.Tensor,  # [N, T, Hkv, D]
    ctx_lens: torch.Tensor,  # [N, G] int: block (n, g) sees real keys [0, ctx_lens[n, g])
    scale: float,
) -> torch.Tensor:  # [N, G, B, Hq, D]
    """reference.attention.batched_block_attention through torch's fused SDPA.

    The CPU counterpart of the Triton kernel: one masked attention over
    [real keys | own block] per block, GQA without repeating K/V. The
    reference's ~20 small ops per layer cost ~0.5 ms at 8 rows x 216 keys on
    a 2-core Xeon, more than the layer's matmuls. Computed in the cache's
    dtype (float32 here), like the reference. A draft pass builds the
    CpuBlockMask once and calls its `attend` per layer.
    """
    return CpuBlockMask(ctx_lens, q.shape[2], q.device).attend(q, k_blk, v_blk, k_ctx, v_ctx, scale)
