"""Training pieces that need no model: loss weights, block sampling, config loading."""

from __future__ import annotations

import json
import random

import pytest
import torch

from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_vllm.training.train import TrainConfig, block_batch, position_weights
from project_paths import BUNDLED_DRAFTER, TRAIN_CONFIGS
from tiny_models import make_tiny_target, tiny_drafter


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


# ---- the batched training forward ----------------------------------------------------
def _tiny(seed=0, draft_vocab_size=0):
    target = make_tiny_target(seed)
    return target, tiny_drafter(target, draft_vocab_size=draft_vocab_size)


def _items(target, drafter, lengths):
    from flexdraft_vllm.training.data import deep_kv_for

    out = []
    for i, T in enumerate(lengths):
        ids = torch.randint(0, 96, (T,), generator=torch.Generator().manual_seed(i))
        out.append({"ids": ids, "prompt_len": 3, "kv": deep_kv_for(target, ids.tolist(), drafter.config.deep_layers)})
    return out


def test_batched_training_forward_equals_the_per_sequence_decoding_path():
    """Training pads sequences of different lengths into one batch; every block
    must still see exactly the K/V the decoder's dense path gives it."""
    from flexdraft_vllm.reference.drafter import dense_block_attend
    from flexdraft_vllm.training.train import collate, draft_forward

    target, drafter = _tiny()
    items = _items(target, drafter, [9, 17, 12])
    cfg = TrainConfig(block_size=4, seqs_per_step=3, blocks_per_seq=5)
    samples = block_batch(items, random.Random(0), cfg)
    kv, ctx, tgt, bonus = collate(samples)
    assert kv.shape[2:4] == (3, 17) and ctx.shape == (3, 5) and tgt.shape == (3, 5, 3)
    with torch.no_grad():
        got = draft_forward(target, drafter, kv, ctx).view(3, 5, 4, -1)
        s = drafter.config.split_layer
        for n, (it, c, *_) in enumerate(samples):
            want = drafter.draft_hidden(
                target, c, lambda l, it=it, c=c: dense_block_attend(it["kv"][l - s, 0], it["kv"][l - s, 1], c,
                                                                     target.scale))
            torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("calibrated", [False, True])
def test_step_loss_trains_only_what_the_stage_owns(calibrated):
    from flexdraft_vllm.training.train import collate, step_loss

    target, drafter = _tiny(1)
    items = _items(target, drafter, [10, 14])
    batch = collate(block_batch(items, random.Random(1), TrainConfig(block_size=4, seqs_per_step=2, blocks_per_seq=4)))
    loss, st = step_loss(target, drafter, batch, calibrated, pos_decay=2.0)
    assert torch.isfinite(loss) and st["n"] == int((batch[2] != -100).sum()) and 0 < st["n1"] <= 8
    loss.backward()
    calib_grad = any(p.grad is not None and p.grad.abs().sum() > 0 for p in drafter.calibrator.parameters())
    assert calib_grad == calibrated, "the calibrator learns only from calibrated logits"
    assert drafter.mask_embedding.grad is not None and drafter.mask_embedding.grad.abs().sum() > 0
    assert all(p.grad is None for p in target.hf.parameters()), "the target stays frozen"


def test_bonus_in_block_training_sees_the_true_bonus_and_drops_it_on_request():
    """bonus_in_block: every block of a training batch starts from the embedding
    of its true bonus (the token at its anchor), exactly as the sequential
    pass runs it; bonus_rate=0 trains the block as a parallel pass runs it."""
    from flexdraft_vllm.reference.drafter import dense_block_attend
    from flexdraft_vllm.training.train import collate, draft_forward, step_loss

    target = make_tiny_target(2)
    drafter = tiny_drafter(target, bonus_in_block=True)
    items = _items(target, drafter, [11, 15])
    samples = block_batch(items, random.Random(2), TrainConfig(block_size=4, seqs_per_step=2, blocks_per_seq=3))
    batch = collate(samples)
    kv, ctx, tgt, bonus = batch
    with torch.no_grad():
        got = draft_forward(target, drafter, kv, ctx, bonus_emb=target.embed(bonus.reshape(-1))).view(2, 3, 4, -1)
        s = drafter.config.split_layer
        for n, (it, c, _, b) in enumerate(samples):
            assert torch.equal(b, it["ids"][c])  # the bonus is the token in the block's slot 0
            want = drafter.draft_hidden(
                target, c, lambda l, it=it, c=c: dense_block_attend(it["kv"][l - s, 0], it["kv"][l - s, 1], c,
                                                                     target.scale),
                bonus_emb=target.embed(b))
            torch.testing.assert_close(got[n], want, rtol=1e-5, atol=1e-5)
    for rate, learns in ((1.0, True), (0.0, False)):
        drafter.zero_grad(set_to_none=True)
        loss, _ = step_loss(target, drafter, batch, True, 2.0, bonus_rate=rate)
        loss.backward()
        g = drafter.bonus_proj.weight.grad
        assert (g is not None and g.abs().sum() > 0) == learns


def test_a_plain_drafter_seeds_a_bonus_in_block_one(tmp_path):
    """init_from a plain drafter: every weight carried over, bonus_proj at zero."""
    import flexdraft_vllm.training.train as train_mod

    target = make_tiny_target(3)
    plain = tiny_drafter(target)
    plain.save(tmp_path / "plain", dtype=torch.float32)
    cfg = TrainConfig(init_from=str(tmp_path / "plain"), bonus_in_block=True)
    seeded = train_mod.seed_drafter(FlexDraftDrafter(tiny_drafter(target, bonus_in_block=True).config, target),
                                    cfg, target)
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(seeded.state_dict()[k], v)
    assert not seeded.bonus_proj.weight.any()


def test_chain_anchors_are_the_true_previous_tokens():
    """Teacher forcing: slot 1 on the bonus, slot k on the true token of slot k-1;
    this is the anchor decoding uses whenever slot k can be accepted."""
    from flexdraft_vllm.training.train import calib_anchors

    bonus = torch.tensor([5, 6])
    tgt = torch.tensor([[11, 12, 13], [21, -100, -100]])
    assert calib_anchors("bonus", bonus, tgt).tolist() == [[5, 5, 5], [6, 6, 6]]
    got = calib_anchors("chain", bonus, tgt)
    assert got[0].tolist() == [5, 11, 12] and got[1, :2].tolist() == [6, 21]  # [1, 2] is past the end: unscored


def test_leading_hits_count_the_accepted_prefix_of_complete_blocks():
    from flexdraft_vllm.training.train import leading_hits

    valid = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 0, 0], [1, 1, 1]], dtype=torch.bool)
    hit = torch.tensor([1, 0, 1, 1, 1, 1, 1, 0, 0, 0], dtype=torch.bool)  # row-major over the valid slots
    assert leading_hits(valid, hit).tolist() == [1, 3, 0]  # the third block ends early: not a full block


def test_frequent_tokens_and_the_draft_vocabulary_index():
    from flexdraft_vllm.training.train import draft_vocab_index, frequent_tokens

    items = [{"ids": torch.tensor([9, 9, 5, 5, 5, 7, 7, 3]), "prompt_len": 2},  # prompt tokens 9, 9 do not count
             {"ids": torch.tensor([1, 7, 7, 9]), "prompt_len": 1}]
    assert frequent_tokens(items, 3, 12).tolist() == [7, 5, 3]  # 7 x4, 5 x3, then 3 and 9 tie x1: lower id
    target, drafter = _tiny(draft_vocab_size=4)
    drafter.set_draft_vocab(torch.tensor([50, 3, 20, 7]))
    assert drafter.draft_vocab.tolist() == [3, 7, 20, 50]
    tgt = torch.tensor([[3, 50, -100], [8, 20, 7]])
    assert draft_vocab_index(drafter, tgt).tolist() == [[0, 3, -1], [-1, 2, 1]]


def test_step_loss_with_a_draft_vocabulary_counts_undraftable_targets_as_misses():
    from flexdraft_vllm.training.train import collate, step_loss

    target, drafter = _tiny(draft_vocab_size=8)
    drafter.set_draft_vocab(torch.arange(8) * 3)
    items = _items(target, drafter, [12, 15])
    batch = collate(block_batch(items, random.Random(2), TrainConfig(block_size=4, seqs_per_step=2, blocks_per_seq=6)))
    loss, st = step_loss(target, drafter, batch, True, pos_decay=0.0)
    tgt = batch[2]
    in_vocab = ((tgt >= 0) & (tgt % 3 == 0) & (tgt < 24)).sum()
    assert st["n"] == int(in_vocab) and torch.isfinite(loss)
    first = tgt[..., 0]
    assert st["n1"] == int((first != -100).sum()) and st["correct1"] <= int(((first % 3 == 0) & (first < 24)).sum())


def test_boolean_options_parse_false_as_false():
    """`--joint false` must turn joint off (argparse's type=bool reads any non-empty string as True)."""
    import argparse

    from flexdraft_vllm.training.train import _flag

    assert _flag("false") is False and _flag("True") is True and _flag("0") is False
    with pytest.raises(argparse.ArgumentTypeError, match="true or false"):
        _flag("maybe")


def test_the_shipped_configs_chain_to_the_bundled_drafter():
    """README's training commands reproduce the bundled drafter: each round
    starts from the previous round's output, the last writes the bundled
    folder, and the bundled train_config.json is that last config."""
    names = ["smollm2_135m", "smollm2_135m_chain", "smollm2_135m_bonus", "smollm2_135m_round4", "smollm2_135m_round5",
             "smollm2_135m_round6", "smollm2_135m_round7"]
    chain = [TrainConfig.load(str(TRAIN_CONFIGS / f"{n}.json"), {}) for n in names]
    assert chain[0].init_from in (None, "")
    for prev, cfg in zip(chain, chain[1:]):
        assert cfg.init_from == prev.out and cfg.work_dir == prev.work_dir
        assert cfg.state_file != prev.state_file  # a round never resumes another's state
    assert chain[-1].out == "flexdraft_vllm/drafters/smollm2-135m"
    shipped = json.loads((BUNDLED_DRAFTER / "train_config.json").read_text())
    assert {k: v for k, v in shipped.items() if k != "target"} == {
        k: v for k, v in vars(chain[-1]).items() if k != "target"}
