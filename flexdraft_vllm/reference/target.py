"""TargetAdapter: the one place that knows how an HF decoder is laid out.

Llama, Qwen2 and Qwen3 (and Mistral) in transformers share one layout:

  model.model.embed_tokens, model.model.layers[i].{input_layernorm,
  self_attn.{q,k,v,o}_proj [+ q_norm, k_norm on Qwen3], post_attention_layernorm,
  mlp}, model.model.norm, model.model.rotary_emb, model.lm_head

Qwen2's q/k/v carry biases and Qwen3's q_norm/k_norm act per head; both are
handled by reading the modules, not by per-model code. The adapter exposes the
pieces FlexDraft needs (attention projections with RoPE, shared MLP, final
norm, LM head) so that one code path runs real rows through the frozen
projectors and mask rows through the tuned ones.
"""

from __future__ import annotations

import torch
from torch import nn

SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)


class UnsupportedModelError(ValueError):
    pass


def check_architecture(arch: str) -> None:
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"FlexDraft supports {', '.join(SUPPORTED_ARCHITECTURES)}; this target is {arch}. "
            f"Use plain vLLM (no speculative_config) or another speculative method for it."
        )


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class TargetAdapter:
    """Frozen view of an HF causal LM (Llama/Qwen family) for FlexDraft."""

    def __init__(self, hf_model: nn.Module):
        arch = type(hf_model).__name__
        check_architecture(arch)
        self.hf = hf_model.eval()
        for p in self.hf.parameters():
            p.requires_grad_(False)
        self.cfg = hf_model.config
        inner = hf_model.model
        self.embed_tokens = inner.embed_tokens
        self.layers = inner.layers
        self.norm = inner.norm
        self.rotary_emb = inner.rotary_emb
        self.lm_head_weight = hf_model.get_output_embeddings().weight  # [V, h] (tied on SmolLM2)
        self.num_layers = len(self.layers)
        self.num_heads = self.cfg.num_attention_heads
        self.num_kv_heads = getattr(self.cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(self.cfg, "head_dim", None) or self.cfg.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5

    @property
    def device(self) -> torch.device:
        return self.lm_head_weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head_weight.dtype

    # ---- pieces ----------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)

    def rope(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin: [n, head_dim] for flat positions [n]."""
        cos, sin = self.rotary_emb(like, positions[None])
        return cos[0], sin[0]

    def make_mask_projector(self, layer_idx: int) -> nn.Module:
        """A trainable copy of layer `layer_idx`'s attention projectors."""
        from flexdraft_vllm.reference.drafter import MaskProjector

        return MaskProjector.copy_of(self.layers[layer_idx].self_attn)

    def project_qkv(self, attn: nn.Module, x: torch.Tensor, positions: torch.Tensor):
        """q: [n, Hq, D], k/v: [n, Hkv, D] with RoPE applied at `positions` [n].

        `attn` is either the target layer's self_attn (frozen, real rows) or a
        FlexDraft mask projector with the same attribute names (mask rows).
        """
        n = x.shape[0]
        cos, sin = self.rope(positions, x)
        q = attn.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = attn.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        if getattr(attn, "q_norm", None) is not None:  # Qwen3: per-head RMSNorm before RoPE
            q = attn.q_norm(q)
            k = attn.k_norm(k)
        c, s = cos[:, None, :], sin[:, None, :]
        q = q * c + rotate_half(q) * s
        k = k * c + rotate_half(k) * s
        return q, k, v

    def mlp_block(self, layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
        """Residual MLP half of a decoder layer (shared by real and mask rows)."""
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def final_hidden(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h)

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return normed @ self.lm_head_weight.t()


def load_target(model_dir: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> TargetAdapter:
    """Load a prepared HF folder (see flexdraft_vllm.prepare) as a TargetAdapter."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    return TargetAdapter(model)
