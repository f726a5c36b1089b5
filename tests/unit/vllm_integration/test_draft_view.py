"""The mask path in its own precision (vllm_integration.draft_view).

A vLLM-like view is built over the tiny HF Llama: merged gate_up, linear
layers that kept only a packed copy of their weight (as vLLM's CPU linears do
after oneDNN packing), RoPE applied to flat q/k. Against it, the low-precision
view must (a) in float32 reproduce the mask path exactly, (b) in bfloat16 stay
close to it, (c) recover packed weights exactly.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.reference.drafter import dense_block_attend
from flexdraft_vllm.reference.target import TargetAdapter, rotate_half
from flexdraft_vllm.vllm_integration import cpu_gemm, draft_view
from flexdraft_vllm.vllm_integration.draft_view import DraftPrecisionView, linear_weight, resolve_draft_dtype
from tiny_models import make_tiny_target, tiny_drafter

SCALE = 8 ** -0.5  # tiny Llama: head_dim 8


class PackedLinear(nn.Module):
    """A vLLM CPU linear after packing: `weight` is emptied, forward returns (y, None)."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self._packed = w.detach().clone()
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)
        self.bias = None

    def forward(self, x):
        return x @ self._packed.t(), None


class MergedMLP(nn.Module):
    def __init__(self, hf_mlp):
        super().__init__()
        self.gate_up_proj = PackedLinear(torch.cat([hf_mlp.gate_proj.weight, hf_mlp.up_proj.weight]))
        self.down_proj = PackedLinear(hf_mlp.down_proj.weight)

    def forward(self, x):
        gate, up = self.gate_up_proj(x)[0].chunk(2, dim=-1)
        return self.down_proj(nn.functional.silu(gate) * up)[0]


class VllmLikeView(TargetAdapter):
    def __init__(self, hf_model):
        super().__init__(hf_model)
        self.layers = [types.SimpleNamespace(input_layernorm=l.input_layernorm, self_attn=l.self_attn,
                                             post_attention_layernorm=l.post_attention_layernorm, mlp=MergedMLP(l.mlp))
                       for l in hf_model.model.layers]

    def apply_rope(self, positions, q, k):  # flat [n, H*D] in, flat out (vLLM's rotary_emb contract)
        n = q.shape[0]
        cos, sin = self.rope(positions, q)
        c, s = cos[:, None], sin[:, None]
        q, k = q.view(n, -1, self.head_dim), k.view(n, -1, self.head_dim)
        return (q * c + rotate_half(q) * s).reshape(n, -1), (k * c + rotate_half(k) * s).reshape(n, -1)


@pytest.fixture(scope="module")
def setup():
    tiny = make_tiny_target()
    view = VllmLikeView(tiny.hf)
    drafter = tiny_drafter(tiny).eval()
    torch.manual_seed(3)
    T, G = 20, 3
    kv = {l: (torch.randn(T, view.num_kv_heads, view.head_dim), torch.randn(T, view.num_kv_heads, view.head_dim))
          for l in drafter.config.deep_layers}
    ctx = torch.tensor([5, 12, 20])
    bonus = torch.randint(0, 96, (G,))
    return tiny, view, drafter, kv, ctx, bonus


def _draft(drafter, view, kv, ctx, bonus):
    with torch.no_grad():
        h = drafter.draft_hidden(view, ctx, lambda l: dense_block_attend(*kv[l], ctx, SCALE))
        K = drafter.config.block_size - 1
        return drafter.draft_logits(view, h[:, 1:], bonus[:, None].expand(-1, K)).float()


def test_float32_copy_reproduces_the_mask_path(setup):
    tiny, view, drafter, kv, ctx, bonus = setup
    want = _draft(drafter, tiny, kv, ctx, bonus)  # the HF reference target
    assert torch.allclose(_draft(drafter, view, kv, ctx, bonus), want, atol=1e-5)  # the vLLM-like view itself
    low = DraftPrecisionView(view, drafter.config.deep_layers, torch.float32)
    torch.testing.assert_close(_draft(drafter, low, kv, ctx, bonus), want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("packed", [False, True])
def test_bfloat16_drafts_stay_close(setup, packed):
    """Only bf16 rounding of weights and activations separates the two: logits
    within 0.02 (their spread is ~0.13 on this random model; the top-2 gaps are
    >= 0.04, so every argmax must agree). packed: the CPU fast path (vLLM's
    prepacked GEMM, fused q/k/v, its rms_norm op), set up as the proposer does."""
    if packed and not cpu_gemm.available(torch.device("cpu"), torch.bfloat16):
        pytest.skip("this vLLM build has no oneDNN CPU GEMM")
    tiny, view, drafter, kv, ctx, bonus = setup
    want = _draft(drafter, tiny, kv, ctx, bonus)
    low = DraftPrecisionView(view, drafter.config.deep_layers, torch.bfloat16, packed=packed)
    d16 = copy.deepcopy(drafter).to(torch.bfloat16)
    if packed:
        assert cpu_gemm.pack_linears(d16) > 0
        low.fuse_qkv(d16.mask_attn)
        d16.head_matmul = cpu_gemm.PackedLinear(d16.head_weight(low))
    got = _draft(d16, low, kv, ctx, bonus)
    assert d16.head_weight(low).dtype == torch.bfloat16
    assert (got - want).abs().max() < 0.02
    top2 = want.topk(2, -1).values
    assert (top2[..., 0] - top2[..., 1]).min() > 0.04
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_packed_weights_are_read_back_exactly():
    w = torch.randn(12, 7)
    assert torch.equal(linear_weight(PackedLinear(w), 7, torch.float32), w)
    lin = nn.Linear(7, 12, bias=False)
    assert torch.equal(linear_weight(lin, 7, torch.bfloat16), lin.weight.detach().bfloat16())


def _cfg(value):
    tiny = make_tiny_target()
    base = FlexDraftConfig.for_target(tiny.cfg, split_layer=2, block_size=4)
    return base.with_runtime({"draft_dtype": value})


def test_draft_dtype_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_draft_dtype(_cfg("float16"), torch.float32, cpu) == torch.float16
    assert resolve_draft_dtype(_cfg("float32"), torch.bfloat16, cpu) == torch.float32
    monkeypatch.setattr(draft_view, "fast_bf16", lambda device: True)
    assert resolve_draft_dtype(_cfg("auto"), torch.float32, cpu) == torch.bfloat16
    assert resolve_draft_dtype(_cfg("auto"), torch.float16, cpu) == torch.float16  # already low precision
    assert resolve_draft_dtype(_cfg("auto"), torch.float32, cuda) == torch.float32  # kernel reads its cache dtype
    monkeypatch.setattr(draft_view, "fast_bf16", lambda device: False)
    assert resolve_draft_dtype(_cfg("auto"), torch.float32, cpu) == torch.float32  # emulated bf16 would be slower
