"""reference/target.py: the adapter's pieces recompose the HF model exactly."""

from __future__ import annotations

import pytest
import torch
import transformers

from flexdraft_vllm.reference.target import (
    SUPPORTED_ARCHITECTURES,
    TargetAdapter,
    UnsupportedModelError,
    check_architecture,
    load_target,
)


def adapter_forward(t: TargetAdapter, ids: torch.Tensor) -> torch.Tensor:
    """Full causal forward of one sequence built only from adapter pieces,
    with torch's SDPA as the attention (independent of reference/attention.py)."""
    n = ids.shape[0]
    pos = torch.arange(n)
    x = t.embed(ids)
    rep = t.num_heads // t.num_kv_heads
    for layer in t.layers:
        q, k, v = t.project_qkv(layer.self_attn, layer.input_layernorm(x), pos)
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        a = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True, scale=t.scale)
        x = x + layer.self_attn.o_proj(a.transpose(0, 1).reshape(n, -1))
        x = t.mlp_block(layer, x)
    return t.logits(t.final_hidden(x))


def test_check_architecture():
    for arch in SUPPORTED_ARCHITECTURES:
        check_architecture(arch)
    with pytest.raises(UnsupportedModelError) as e:
        check_architecture("GPT2LMHeadModel")
    msg = str(e.value)
    assert "GPT2LMHeadModel" in msg and "LlamaForCausalLM" in msg and "Qwen3ForCausalLM" in msg
    assert "plain vLLM" in msg


def _tiny_gpt2():
    cfg = transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                  architectures=["GPT2LMHeadModel"])
    return transformers.GPT2LMHeadModel(cfg)


def test_adapter_rejects_other_architectures():
    with pytest.raises(UnsupportedModelError, match="this target is GPT2LMHeadModel"):
        TargetAdapter(_tiny_gpt2())


def test_load_target_rejects_other_architectures(tmp_path):
    _tiny_gpt2().save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_target(str(tmp_path))


def test_real_target_layout(target):
    assert (target.num_layers, target.num_heads, target.num_kv_heads, target.head_dim) == (30, 9, 3, 64)
    assert target.scale == pytest.approx(64**-0.5)
    assert target.dtype == torch.float32 and target.device.type == "cpu"
    assert target.lm_head_weight.shape == (49152, 576)
    assert target.lm_head_weight.data_ptr() == target.embed_tokens.weight.data_ptr()  # tied on SmolLM2
    assert not any(p.requires_grad for p in target.hf.parameters())


def test_real_target_reproduces_hf_logits(target, tokenizer):
    ids = torch.tensor(tokenizer("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.")["input_ids"])
    with torch.no_grad():
        want = target.hf(ids[None]).logits[0].float()
        got = adapter_forward(target, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_rope_uses_absolute_positions(target):
    # the rotation at position p is the HF rotary embedding at p, whatever the batch start
    x = torch.randn(4, 576)
    cos, sin = target.rope(torch.tensor([0, 7, 100, 1000]), x)
    ref_cos, ref_sin = target.rotary_emb(x, torch.arange(1001)[None])
    torch.testing.assert_close(cos, ref_cos[0, [0, 7, 100, 1000]])
    torch.testing.assert_close(sin, ref_sin[0, [0, 7, 100, 1000]])


@pytest.mark.parametrize("arch", ["Llama", "Qwen2", "Qwen3", "Mistral"])
def test_family_members_reproduce_hf_logits(arch):
    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=128, architectures=[f"{arch}ForCausalLM"])).float()
    t = TargetAdapter(hf)
    if arch == "Qwen3":
        assert t.layers[0].self_attn.q_norm is not None  # the per-head q/k norm path is exercised
    if arch == "Qwen2":
        assert t.layers[0].self_attn.q_proj.bias is not None  # the qkv-bias path is exercised
    ids = torch.randint(0, 64, (11,))
    with torch.no_grad():
        torch.testing.assert_close(adapter_forward(t, ids), hf(ids[None]).logits[0], rtol=1e-4, atol=1e-4)
