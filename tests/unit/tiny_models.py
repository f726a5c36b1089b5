"""Tiny random models shared by the unit tests (on the path via pytest.ini's
`pythonpath`): a Llama small enough to build in milliseconds, and a drafter
for it whose every weight is moved off its init, so a lost tensor shows."""

from __future__ import annotations

import torch

from flexdraft_vllm.config import FlexDraftConfig
from flexdraft_vllm.reference.drafter import FlexDraftDrafter


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_tiny_target(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    from flexdraft_vllm.reference.target import TargetAdapter

    torch.manual_seed(seed)
    return TargetAdapter(LlamaForCausalLM(tiny_llama_config(**kw)).float())


def tiny_drafter(target, *, split=2, block=4, calibrator="tied", fingerprint="feedfacefeedface", seed=1,
                 draft_vocab_size=0, bonus_in_block=False):
    cfg = FlexDraftConfig.for_target(target.cfg, split_layer=split, block_size=block, target_model_id="tiny/llama",
                                     target_fingerprint=fingerprint, calibrator=calibrator, calib_rank=16,
                                     draft_vocab_size=draft_vocab_size, bonus_in_block=bonus_in_block)
    d = FlexDraftDrafter(cfg, target)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # move every weight away from its init, so a lost tensor shows
        for p in d.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return d
