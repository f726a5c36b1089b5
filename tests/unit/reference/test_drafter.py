"""reference/drafter.py: weights, calibrator, checkpoint format and its checks."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from flexdraft_vllm.config import CONFIG_KEY, FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.confidence import VerifyCut
from flexdraft_vllm.reference.drafter import (
    WEIGHTS_FILE,
    Calibrator,
    FlexDraftDrafter,
    MaskProjector,
    dense_block_attend,
)

from project_paths import BUNDLED_DRAFTER
from tiny_models import tiny_drafter


def _saved(tmp_path, target, **kw):
    d = tiny_drafter(target, **kw)
    path = tmp_path / "drafter"
    d.save(path, dtype=torch.float32)
    return d, path


# ---- projectors ---------------------------------------------------------------------
def test_mask_projector_is_a_trainable_independent_copy(tiny_target):
    attn = tiny_target.layers[3].self_attn
    m = MaskProjector.copy_of(attn)
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        torch.testing.assert_close(getattr(m, name).weight, getattr(attn, name).weight, rtol=0, atol=0)
    assert m.q_norm is None and m.k_norm is None  # Llama has none
    assert all(p.requires_grad for p in m.parameters())
    assert not any(p.requires_grad for p in tiny_target.hf.parameters())  # target stays frozen
    with torch.no_grad():
        m.q_proj.weight.add_(1.0)
    assert not torch.equal(m.q_proj.weight, attn.q_proj.weight)


def test_drafter_layout(tiny_target):
    d = tiny_drafter(tiny_target, split=1, block=5)
    assert len(d.mask_attn) == 3  # deep layers 1..3 of 4
    assert d.mask_embedding.shape == (48,)
    names = set(d.state_dict())
    assert "mask_embedding" in names and "calibrator.fc1.weight" in names
    assert "mask_attn.2.o_proj.weight" in names and "mask_attn.3.q_proj.weight" not in names


# ---- calibrator -----------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["tied", "full"])
def test_calibrator_is_identity_at_init(kind):
    torch.manual_seed(0)
    h, V = 16, 40
    cal = Calibrator(h, 8, V, kind)
    lm = torch.randn(V, h)
    normed, bonus = torch.randn(3, 5, h), torch.randn(3, 5, h)
    torch.testing.assert_close(cal(normed, bonus, lambda x: x @ lm.t()), normed @ lm.t())


@pytest.mark.parametrize("kind", ["tied", "full"])
def test_trained_calibrator_uses_the_bonus(kind):
    torch.manual_seed(0)
    h, V = 16, 40
    cal = Calibrator(h, 8, V, kind)
    torch.nn.init.normal_(cal.fc2.weight)
    lm = torch.randn(V, h)
    normed, bonus = torch.randn(4, h), torch.randn(4, h)
    head = lambda x: x @ lm.t()  # noqa: E731
    out = cal(normed, bonus, head)
    c = cal.fc2(torch.nn.functional.silu(cal.fc1(torch.cat([bonus, normed], -1))))
    want = (normed + c) @ lm.t() if kind == "tied" else normed @ lm.t() + c
    torch.testing.assert_close(out, want)
    assert not torch.allclose(cal(normed, bonus.flip(0), head), out)  # anchored on the bonus


def test_fresh_drafter_logits_are_the_lm_head(tiny_target):
    cfg = FlexDraftConfig.for_target(tiny_target.cfg, split_layer=2, block_size=4)
    d = FlexDraftDrafter(cfg, tiny_target)
    normed = torch.randn(2, 3, 48)
    bonus = torch.tensor([[1, 2, 3], [4, 5, 6]])
    torch.testing.assert_close(d.draft_logits(tiny_target, normed, bonus), tiny_target.logits(normed))


@pytest.mark.parametrize("anchor", ["bonus", "chain"])
def test_block_logits_anchors(tiny_target, anchor):
    cfg = FlexDraftConfig.for_target(tiny_target.cfg, split_layer=2, block_size=4, calib_anchor=anchor)
    d = FlexDraftDrafter(cfg, tiny_target)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in d.calibrator.parameters():
            p.copy_(torch.randn(p.shape))
    normed, bonus = torch.randn(2, 3, 48), torch.tensor([7, 9])
    got = d.block_logits(tiny_target, normed, bonus)
    want, prev = [], bonus
    for k in range(3):
        want.append(d.draft_logits(tiny_target, normed[:, k], prev if anchor == "chain" else bonus))
        prev = want[-1].argmax(-1)
    torch.testing.assert_close(got, torch.stack(want, 1))
    if anchor == "chain":  # a sampler's own picks become the anchors
        fixed = lambda lg, k: torch.full((lg.shape[0],), 3 + k)  # noqa: E731
        got = d.block_logits(tiny_target, normed, bonus, pick=fixed)
        torch.testing.assert_close(got[:, 2], d.draft_logits(tiny_target, normed[:, 2], torch.tensor([4, 4])))
        assert not torch.allclose(got[:, 2], want[2])
        # a cut after slot 2 (max_len 2): the chain computes no further slot
        cut = VerifyCut("cumprod", tau=0.0, max_len=2)
        torch.testing.assert_close(d.block_logits(tiny_target, normed, bonus, cut=cut), torch.stack(want[:2], 1))


def test_calib_anchor_is_checked_and_saved(tmp_path, tiny_target):
    with pytest.raises(FlexDraftConfigError, match="calib_anchor='next'.*bonus or chain"):
        FlexDraftConfig.for_target(tiny_target.cfg, split_layer=2, block_size=4, calib_anchor="next")
    cfg = FlexDraftConfig.for_target(tiny_target.cfg, split_layer=2, block_size=4, calib_anchor="chain")
    FlexDraftDrafter(cfg, tiny_target).save(tmp_path / "d")
    assert FlexDraftDrafter.load(tmp_path / "d", tiny_target).config.calib_anchor == "chain"
    raw = json.loads((tmp_path / "d" / "config.json").read_text())
    del raw[CONFIG_KEY]["calib_anchor"]  # a checkpoint from before the option: the paper's anchoring
    (tmp_path / "d" / "config.json").write_text(json.dumps(raw))
    assert FlexDraftDrafter.load(tmp_path / "d", tiny_target).config.calib_anchor == "bonus"


# ---- checkpoint round trip ------------------------------------------------------------
def _assert_same_weights(a, b, **tol):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], **tol, msg=k)


def test_save_load_round_trip_float32(tmp_path, tiny_target):
    d, path = _saved(tmp_path, tiny_target)
    cfg_json = json.loads((path / "config.json").read_text())
    assert cfg_json["architectures"] == ["FlexDraftDrafter"]
    assert cfg_json[CONFIG_KEY] == d.config.weights_dict()
    back = FlexDraftDrafter.load(path, tiny_target, target_fingerprint="feedfacefeedface")
    _assert_same_weights(d, back, rtol=0, atol=0)
    assert back.config == d.config and not back.training
    # same drafts: one block after a 6-token context
    L, B = tiny_target.num_layers, d.config.block_size
    kv = {l: (torch.randn(6, 2, 8), torch.randn(6, 2, 8)) for l in range(L)}
    ctx = torch.tensor([6])
    att = lambda l: dense_block_attend(*kv[l], ctx, tiny_target.scale)  # noqa: E731
    with torch.no_grad():
        torch.testing.assert_close(back.draft_hidden(tiny_target, ctx, att), d.draft_hidden(tiny_target, ctx, att))
    assert back.draft_hidden(tiny_target, ctx, att).shape == (1, B, 48)
    # a trimmed block: its own rows only; the bonus slot and at least one draft
    assert d.draft_hidden(tiny_target, ctx, att, block=2).shape == (1, 2, 48)
    for bad in (1, B + 1):
        with pytest.raises(AssertionError):
            d.draft_hidden(tiny_target, ctx, att, block=bad)


def test_default_save_is_half_precision(tmp_path, tiny_target):
    d = tiny_drafter(tiny_target)
    d.save(tmp_path / "fp16")
    with safe_open(str(tmp_path / "fp16" / WEIGHTS_FILE), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    back = FlexDraftDrafter.load(tmp_path / "fp16", tiny_target)
    for k, v in d.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v.half().float(), rtol=0, atol=0, msg=k)
    assert back.mask_embedding.dtype == tiny_target.dtype


def test_load_with_runtime_options(tmp_path, tiny_target):
    _, path = _saved(tmp_path, tiny_target)
    back = FlexDraftDrafter.load(path, tiny_target, runtime={"mode": "sequential", "max_verify": 2})
    assert back.config.mode == "sequential" and back.config.num_drafts == 2
    with pytest.raises(FlexDraftConfigError, match="block_size"):
        FlexDraftDrafter.load(path, tiny_target, runtime={"block_size": 3})


# ---- checkpoint problems -> clear errors ------------------------------------------------------
@pytest.mark.parametrize(
    "override,needle",
    [
        ({"hidden_size": 60}, "hidden_size: drafter 48 vs target 60"),
        ({"num_hidden_layers": 6}, "num_hidden_layers: drafter 4 vs target 6"),
        ({"vocab_size": 100}, "vocab_size: drafter 96 vs target 100"),
        ({"num_key_value_heads": 3}, "num_key_value_heads: drafter 2 vs target 3"),
    ],
)
def test_load_against_a_different_target(tmp_path, tiny_target, make_tiny, override, needle):
    _, path = _saved(tmp_path, tiny_target)
    other = make_tiny(**override)
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(path, other)
    msg = str(e.value)
    assert needle in msg, msg
    assert "tiny/llama" in msg and "python -m flexdraft_vllm.training.train" in msg


def test_load_against_a_shallower_target(tmp_path, make_tiny):
    big = make_tiny(num_hidden_layers=6)
    _, path = _saved(tmp_path, big, split=4)
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(path, make_tiny(num_hidden_layers=3))
    assert "num_hidden_layers: drafter 6 vs target 3" in str(e.value)


def test_load_with_another_target_fingerprint(tmp_path, tiny_target):
    _, path = _saved(tmp_path, tiny_target)
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(path, tiny_target, target_fingerprint="0000000000000000")
    msg = str(e.value)
    assert "feedfacefeedface" in msg and "0000000000000000" in msg and "Retrain" in msg


def test_missing_checkpoint_folder(tmp_path, tiny_target):
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(tmp_path / "does-not-exist", tiny_target)
    assert "does-not-exist" in str(e.value) and "missing config.json" in str(e.value)


def test_missing_config_json(tmp_path, tiny_target):
    _, path = _saved(tmp_path, tiny_target)
    (path / "config.json").unlink()
    with pytest.raises(FlexDraftConfigError, match="missing config.json"):
        FlexDraftDrafter.load(path, tiny_target)


def test_missing_weights_file(tmp_path, tiny_target):
    _, path = _saved(tmp_path, tiny_target)
    (path / WEIGHTS_FILE).unlink()
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(path, tiny_target)
    assert WEIGHTS_FILE in str(e.value) and str(path) in str(e.value)


def test_weights_missing_a_tensor(tmp_path, tiny_target):
    _, path = _saved(tmp_path, tiny_target)
    sd = load_file(str(path / WEIGHTS_FILE))
    sd.pop("mask_attn.1.k_proj.weight")
    save_file(sd, str(path / WEIGHTS_FILE))
    with pytest.raises(FlexDraftConfigError, match="does not match its config.*mask_attn.1.k_proj.weight"):
        FlexDraftDrafter.load(path, tiny_target)


def test_weights_with_wrong_shapes(tmp_path, tiny_target):
    """config.json and weights disagree (e.g. calib_rank edited, or files from two
    checkpoints mixed): a FlexDraftConfigError, not a bare torch RuntimeError."""
    _, path = _saved(tmp_path, tiny_target)
    cfg = json.loads((path / "config.json").read_text())
    cfg[CONFIG_KEY]["calib_rank"] = 8
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FlexDraftConfigError, match="does not match its config"):
        FlexDraftDrafter.load(path, tiny_target)


def test_not_a_drafter_folder(tmp_path, tiny_target, target_dir):
    shutil.copy(target_dir / "config.json", tmp_path / "config.json")  # a model folder, not a drafter
    with pytest.raises(FlexDraftConfigError, match="not a FlexDraft drafter"):
        FlexDraftDrafter.load(tmp_path, tiny_target)


# ---- Qwen-family targets (q/k norms, qkv biases) go through the same code --------------------
@pytest.mark.parametrize("arch", ["Qwen2", "Qwen3"])
def test_round_trip_for_qwen_targets(tmp_path, arch):
    import transformers

    from flexdraft_vllm.reference.target import TargetAdapter

    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    torch.manual_seed(0)
    hf = model_cls(cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                           max_position_embeddings=128, architectures=[f"{arch}ForCausalLM"])).float()
    t = TargetAdapter(hf)
    d = tiny_drafter(t, split=1, block=3)
    keys = set(d.state_dict())
    if arch == "Qwen3":
        assert "mask_attn.0.q_norm.weight" in keys and "mask_attn.1.k_norm.weight" in keys
    else:
        assert "mask_attn.0.q_proj.bias" in keys and "mask_attn.0.o_proj.bias" not in keys
    d.save(tmp_path / arch, dtype=torch.float32)
    _assert_same_weights(d, FlexDraftDrafter.load(tmp_path / arch, t), rtol=0, atol=0)


# ---- the bundled drafter -------------------------------------------------------------------------
def test_bundled_drafter_fits_the_target(drafter, target):
    cfg = drafter.config
    assert cfg.target_architecture == "LlamaForCausalLM"
    assert cfg.num_hidden_layers == target.num_layers and cfg.hidden_size == target.cfg.hidden_size
    assert len(drafter.mask_attn) == target.num_layers - cfg.split_layer
    size_mb = (BUNDLED_DRAFTER / WEIGHTS_FILE).stat().st_size / 2**20
    assert size_mb < 40, f"bundled drafter is {size_mb:.1f} MB"
    with safe_open(str(BUNDLED_DRAFTER / WEIGHTS_FILE), "pt") as f:
        dtypes = {k: f.get_tensor(k).dtype for k in f.keys()}
    # weights in half precision; only the draft vocabulary (token ids) is integer
    assert {d for k, d in dtypes.items() if k != "draft_vocab"} <= {torch.float16, torch.bfloat16}
    if cfg.draft_vocab_size:
        assert dtypes["draft_vocab"] == torch.int64
        ids = drafter.draft_vocab
        assert ids.numel() == cfg.draft_vocab_size and bool((ids[1:] > ids[:-1]).all()) and int(ids[-1]) < cfg.vocab_size


def test_load_against_another_architecture_with_the_same_shapes(tmp_path, tiny_target):
    """A Llama drafter on a same-shaped Qwen2 (qkv biases): the message must say
    the architecture differs, not that the checkpoint is corrupt."""
    import transformers

    from flexdraft_vllm.reference.target import TargetAdapter

    _, path = _saved(tmp_path, tiny_target)
    c = tiny_target.cfg
    qwen = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, architectures=["Qwen2ForCausalLM"]))
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftDrafter.load(path, TargetAdapter(qwen))
    msg = str(e.value)
    assert "LlamaForCausalLM" in msg and "Qwen2ForCausalLM" in msg, msg
    assert "python -m flexdraft_vllm.training.train" in msg


def test_draft_vocabulary_round_trip_and_sliced_head(tmp_path, tiny_target):
    """Token ids survive the half-precision save exactly (ids up to 95 here; fp16
    would corrupt ids above 2048 on a real vocabulary), and draft logits are the
    full-vocabulary logits restricted to the draft vocabulary."""
    import dataclasses

    base = tiny_drafter(tiny_target)
    d = FlexDraftDrafter(dataclasses.replace(base.config, draft_vocab_size=5), tiny_target)
    d.load_state_dict({**base.state_dict(), "draft_vocab": d.draft_vocab}, strict=False)
    d.set_draft_vocab(torch.tensor([95, 2, 40, 7, 61]))
    d.save(tmp_path / "dv")
    with safe_open(str(tmp_path / "dv" / WEIGHTS_FILE), "pt") as f:
        assert f.get_tensor("draft_vocab").dtype == torch.int64
    back = FlexDraftDrafter.load(tmp_path / "dv", tiny_target)
    assert back.draft_vocab.tolist() == [2, 7, 40, 61, 95]
    normed = torch.randn(3, 48)
    bonus = torch.tensor([1, 2, 3])
    with torch.no_grad():
        got = back.draft_logits(tiny_target, normed, bonus)
        assert got.shape == (3, 5)
        full = FlexDraftDrafter(base.config, tiny_target)
        full.load_state_dict({k: v for k, v in back.state_dict().items() if k != "draft_vocab"}, strict=False)
        # the tied calibrator's correction lives in hidden space: same c, full head vs its slice
        c_full = full.draft_logits(tiny_target, normed, bonus)
    torch.testing.assert_close(got, c_full[:, back.draft_vocab], rtol=1e-5, atol=1e-5)
    assert back.token_ids(torch.tensor([[4, 0]])).tolist() == [[95, 2]]


# ---- bonus in block -------------------------------------------------------------------
def test_bonus_in_block_starts_the_block_from_the_bonus(tmp_path, tiny_target):
    """A sequential pass knows the bonus: slot 0 starts at mask_embedding + W0 e(b),
    the draft slots at mask_embedding + W1 e(b). No bonus (a parallel pass) or a
    zero embedding gives the plain block; a plain drafter ignores the bonus."""
    d = tiny_drafter(tiny_target, bonus_in_block=True)
    plain = tiny_drafter(tiny_target)
    assert d.bonus_proj.weight.shape == (96, 48) and plain.bonus_proj is None
    emb = tiny_target.embed(torch.tensor([5, 7]))  # [2, h]
    with torch.no_grad():
        h = d.initial_mask_hidden(2, 4, emb)
        scaled = emb * d.mask_embedding.pow(2).mean().sqrt() / emb.pow(2).mean(-1, keepdim=True).sqrt()
        w0, w1 = (scaled @ d.bonus_proj.weight.t()).chunk(2, -1)
        torch.testing.assert_close(h[:, 0], d.mask_embedding + w0)
        torch.testing.assert_close(h[:, 1:], (d.mask_embedding + w1)[:, None].expand(2, 3, -1))
        torch.testing.assert_close(d.initial_mask_hidden(2, 4, torch.zeros_like(emb)), d.initial_mask_hidden(2, 4))
        assert torch.equal(plain.initial_mask_hidden(2, 4, emb), plain.initial_mask_hidden(2, 4))

        T = 9
        k = torch.randn(T, 2, 8)
        v = torch.randn(T, 2, 8)
        ctx = torch.tensor([6, 9])
        att = lambda l: dense_block_attend(k, v, ctx, 0.3)  # noqa: E731
        with_b = d.draft_hidden(tiny_target, ctx, att, bonus_emb=emb)
        without = d.draft_hidden(tiny_target, ctx, att)
        assert (with_b - without).abs().amax(-1).min() > 1e-4, "every slot sees the bonus"
        # freshly built: bonus_proj starts at zero, so training starts from the plain block
        fresh = FlexDraftDrafter(d.config, tiny_target)
        assert torch.equal(fresh.bonus_proj.weight, torch.zeros(96, 48))

    path = tmp_path / "drafter"
    d.save(path, dtype=torch.float32)
    back = FlexDraftDrafter.load(path, tiny_target)
    assert back.config.bonus_in_block
    torch.testing.assert_close(back.bonus_proj.weight, d.bonus_proj.weight)
    with torch.no_grad():
        torch.testing.assert_close(back.draft_hidden(tiny_target, ctx, att, bonus_emb=emb), with_b)
