"""Training pieces that need no model: loss weights, block sampling, config loading."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexdraft_vllm.training.train import TrainConfig, block_batch, position_weights


def test_position_weights_decay_from_slot_one():
    w = position_weights(7, 2.0)
    assert w[0] == 1.0 and torch.all(w[1:] < w[:-1])
    torch.testing.assert_close(w[1] / w[0], torch.tensor(float(torch.exp(torch.tensor(-0.5)))))
    assert torch.equal(position_weights(7, 0.0), torch.ones(7))


def test_block_batch_targets_are_the_next_tokens_and_pad_past_the_end():
    ids = torch.arange(100, 130)  # 30 tokens, prompt 10
    cfg = TrainConfig(block_size=8, seqs_per_step=1, blocks_per_seq=64)
    [(it, ctx, tgt, bonus)] = block_batch([{"ids": ids, "prompt_len": 10}], random.Random(0), cfg)
    assert tgt.shape == (64, 7) and torch.all(ctx >= 10) and torch.all(ctx <= 28)
    for c, t, b in zip(ctx.tolist(), tgt.tolist(), bonus.tolist()):
        assert b == 100 + c  # the bonus is the token in the anchor slot
        want = [100 + c + k if c + k < 30 else -100 for k in range(1, 8)]
        assert t == want
    assert (tgt == -100).any(), "anchors near the end must produce ignored slots"


def test_config_rejects_unknown_options(tmp_path):
    p = tmp_path / "c.json"
    p.write_text(json.dumps({"tune_steps": 3, "blocks_per_sq": 2}))
    with pytest.raises(SystemExit, match="blocks_per_sq"):
        TrainConfig.load(str(p), {})
    assert TrainConfig.load(None, {"tune_steps": 5, "seed": None}).tune_steps == 5
