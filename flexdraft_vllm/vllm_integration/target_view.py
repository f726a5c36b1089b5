"""VllmTargetView: FlexDraft's view of a target model as vLLM built it.

The same interface as reference.target.TargetAdapter (layers, project_qkv,
mlp_block, final_hidden, embed, lm_head_weight, make_mask_projector), over
vLLM's modules: merged qkv/gate_up projections, vLLM RMSNorm and RoPE. vLLM's
Llama, Mistral, Qwen2 and Qwen3 classes share this layout, so one view serves
the families; the drafter's mask path (reference.drafter) runs unchanged on it.
Only tensor-parallel size 1 and one pipeline stage are supported.
"""

from __future__ import annotations

import torch
from torch import nn

from flexdraft_vllm.reference.drafter import MaskProjector
from flexdraft_vllm.reference.target import check_architecture


class VllmTargetView:
    def __init__(self, vllm_model: nn.Module):
        check_architecture(type(vllm_model).__name__)
        inner = vllm_model.model
        self.cfg = vllm_model.config
        self.layers = inner.layers
        self.norm = inner.norm
        self.embed_tokens = inner.embed_tokens
        self.lm_head_weight = vllm_model.lm_head.weight  # [V, h] (tied to embed_tokens on SmolLM2)
        attn = self.layers[0].self_attn
        self.num_heads = attn.num_heads
        self.num_kv_heads = attn.num_kv_heads
        self.head_dim = attn.head_dim
        self.scale = attn.scaling
        self.num_layers = len(self.layers)
        if self.num_heads * self.head_dim != attn.q_size or getattr(attn, "total_num_heads", self.num_heads) != self.num_heads:
            raise NotImplementedError("FlexDraft supports tensor_parallel_size=1 only")

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    def make_mask_projector(self, layer_idx: int) -> MaskProjector:
        attn = self.layers[layer_idx].self_attn
        qkv_bias = getattr(attn.qkv_proj, "bias", None) is not None
        qk_norm = getattr(attn, "q_norm", None) is not None
        eps = getattr(self.cfg, "rms_norm_eps", 1e-6)
        return MaskProjector(self.cfg.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim,
                             qkv_bias=qkv_bias, qk_norm=qk_norm, eps=eps)

    def project_qkv(self, proj: MaskProjector, x: torch.Tensor, positions: torch.Tensor):
        """Mask-row q/k/v with vLLM's RoPE: q [n, Hq, D], k/v [n, Hkv, D]."""
        n = x.shape[0]
        q, k, v = proj.q_proj(x), proj.k_proj(x), proj.v_proj(x)
        if proj.q_norm is not None:
            q = proj.q_norm(q.view(n, self.num_heads, self.head_dim)).reshape(n, -1)
            k = proj.k_norm(k.view(n, self.num_kv_heads, self.head_dim)).reshape(n, -1)
        q, k = self.apply_rope(positions, q, k)
        return (q.view(n, self.num_heads, self.head_dim), k.view(n, self.num_kv_heads, self.head_dim),
                v.view(n, self.num_kv_heads, self.head_dim))

    def apply_rope(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """vLLM's RoPE on flat q [n, Hq*D], k [n, Hkv*D] (in the cos/sin cache's dtype)."""
        rope = self.layers[0].self_attn.rotary_emb  # same RoPE module in every layer
        # Masks near max_model_len may sit past RoPE's table; those slots never
        # become drafts (no room), so clamping only keeps the lookup in range.
        positions = positions.clamp(max=rope.cos_sin_cache.shape[0] - 1)
        return rope(positions, q.contiguous(), k.contiguous())

    def mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        flat = h.reshape(-1, h.shape[-1])
        return (flat + layer.mlp(layer.post_attention_layernorm(flat))).view_as(h)

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h.reshape(-1, h.shape[-1])).view_as(h)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(ids, self.embed_tokens.weight)

    def kv_cache(self, layer_idx: int) -> torch.Tensor:
        kv = self.layers[layer_idx].self_attn.attn.kv_cache
        return kv[0] if isinstance(kv, (list, tuple)) else kv
