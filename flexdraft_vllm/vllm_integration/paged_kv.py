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


def unpack_cpu_pages(
    pages: torch.Tensor,  # [..., 2*block_size, D] K rows then V rows, as vLLM packed them
    perm_k: torch.Tensor,  # [block_size * D]
    perm_v: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:  # k, v: [..., block_size, D] row-major
    bs = pages.shape[-2] // 2
    d = pages.shape[-1]
    lead = pages.shape[:-2]
    k = pages[..., :bs, :].reshape(*lead, bs * d)[..., perm_k].view(*lead, bs, d)
    v = pages[..., bs:, :].reshape(*lead, bs * d)[..., perm_v].view(*lead, bs, d)
    return k, v
