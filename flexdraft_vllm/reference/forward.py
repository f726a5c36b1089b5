"""One FlexDraft forward over a ragged batch (reference, pure torch).

Per request the step has
  * candidates: real tokens at positions cache_len .. cache_len+n (the bonus and
    the drafts being verified; at prefill: the prompt). They run through ALL
    layers with the frozen weights, causal over [cache | candidates].
  * optionally G mask blocks, block g anchored on candidate anchor_g: it sits at
    positions ctx_g .. ctx_g+B-1 with ctx_g = cache_len + anchor_g + 1 and sees
    real tokens [0, ctx_g) plus its own block. Masks enter at the split layer.

Invariants: real rows never read mask state; mask K/V are never stored; the
caller commits only the candidate K/V it accepts (RequestCache.commit).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from flexdraft_vllm.reference.attention import causal_attention
from flexdraft_vllm.reference.drafter import FlexDraftDrafter, dense_block_attend
from flexdraft_vllm.reference.target import TargetAdapter


@dataclass
class RequestCache:
    """Committed real-token K/V of one request, per layer: [T, Hkv, D]."""

    k: list[torch.Tensor] = field(default_factory=list)
    v: list[torch.Tensor] = field(default_factory=list)

    @property
    def length(self) -> int:
        return 0 if not self.k else self.k[0].shape[0]

    def layer_kv(self, layer: int, target: TargetAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.k:
            e = torch.empty(0, target.num_kv_heads, target.head_dim, dtype=target.dtype, device=target.device)
            return e, e
        return self.k[layer], self.v[layer]

    def commit(self, new_k: list[torch.Tensor], new_v: list[torch.Tensor], n: int) -> None:
        """Append the first n candidate rows' K/V (accepted tokens) to the cache."""
        if not self.k:
            self.k = [k[:n] for k in new_k]
            self.v = [v[:n] for v in new_v]
        else:
            self.k = [torch.cat([a, b[:n]]) for a, b in zip(self.k, new_k)]
            self.v = [torch.cat([a, b[:n]]) for a, b in zip(self.v, new_v)]


@dataclass
class StepOutput:
    logits: list[torch.Tensor]  # per request [n_cand, V]
    new_k: list[list[torch.Tensor]]  # per request, per layer [n_cand, Hkv, D]
    new_v: list[list[torch.Tensor]]
    mask_hidden: list[torch.Tensor | None]  # per request [G, B, h] final-normed, or None


@torch.no_grad()
def step_forward(
    target: TargetAdapter,
    drafter: FlexDraftDrafter | None,
    caches: list[RequestCache],
    candidates: list[torch.Tensor],  # per request [n_cand] token ids
    anchors: list[list[int]] | None = None,  # per request: candidate index each mask block follows
    block: int | None = None,  # masks per block (default the drafter's block_size; fewer: trimmed)
) -> StepOutput:
    dev = target.device
    lens = [int(c.numel()) for c in candidates]
    positions = torch.cat([torch.arange(c.length, c.length + n, device=dev) for c, n in zip(caches, lens)])
    x = target.embed(torch.cat(candidates).to(dev))
    splits = torch.tensor(lens).cumsum(0).tolist()
    starts = [0] + splits[:-1]

    B = (block or drafter.config.block_size) if drafter is not None else 0
    s = drafter.config.split_layer if drafter is not None else target.num_layers
    anchors = anchors if (anchors is not None and drafter is not None) else [[] for _ in caches]
    ctx_lens = [torch.tensor([c.length + a + 1 for a in anc], device=dev, dtype=torch.long) for c, anc in zip(caches, anchors)]
    mask_h: list[torch.Tensor | None] = [
        drafter.initial_mask_hidden(len(anc), B) if anc else None for anc in anchors
    ]
    mask_pos = [cl[:, None] + torch.arange(B, device=dev)[None] if len(cl) else None for cl in ctx_lens]

    new_k: list[list[torch.Tensor]] = [[] for _ in caches]
    new_v: list[list[torch.Tensor]] = [[] for _ in caches]
    for l, layer in enumerate(target.layers):
        xn = layer.input_layernorm(x)
        q, k, v = target.project_qkv(layer.self_attn, xn, positions)
        outs = []
        for r, cache in enumerate(caches):
            a, b = starts[r], splits[r]
            ck, cv = cache.layer_kv(l, target)
            K, V = torch.cat([ck, k[a:b]]), torch.cat([cv, v[a:b]])
            new_k[r].append(k[a:b])
            new_v[r].append(v[a:b])
            outs.append(causal_attention(q[a:b], K, V, target.scale))
            if l >= s and mask_h[r] is not None:
                attend = dense_block_attend(K, V, ctx_lens[r], target.scale)
                mask_h[r] = drafter.mask_layer(target, l, mask_h[r], mask_pos[r], attend)
        x = x + layer.self_attn.o_proj(torch.cat(outs).reshape(x.shape[0], -1))
        x = target.mlp_block(layer, x)
    logits = target.logits(target.final_hidden(x))
    return StepOutput(
        logits=[logits[a:b] for a, b in zip(starts, splits)],
        new_k=new_k,
        new_v=new_v,
        mask_hidden=[target.final_hidden(h) if h is not None else None for h in mask_h],
    )


@torch.no_grad()
def draft_pass(
    target: TargetAdapter,
    drafter: FlexDraftDrafter,
    caches: list[RequestCache],
    block: int | None = None,  # masks per block (default the drafter's block_size)
    bonus_ids: list[int] | None = None,  # per request: its bonus (sampled, not yet in the cache)
) -> list[torch.Tensor]:  # per request [1, B, h] final-normed
    """Sequential mode: one block per request right after its cache (bonus slot
    = cache_len), deep layers only, over the committed K/V. The bonus is known
    here, and a bonus_in_block drafter starts its block from it."""
    out = []
    for r, cache in enumerate(caches):
        ctx = torch.tensor([cache.length], device=target.device)
        emb = target.embed(torch.tensor([bonus_ids[r]], device=target.device)) if bonus_ids is not None else None
        out.append(drafter.draft_hidden(
            target, ctx, lambda l, c=cache, ctx=ctx: dense_block_attend(*c.layer_kv(l, target), ctx, target.scale),
            block=block, bonus_emb=emb))
    return out
