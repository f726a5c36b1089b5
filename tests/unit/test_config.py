"""flexdraft_vllm/config.py: validation, runtime overrides, (de)serialisation,
checkpoint loading and target checks. Every error must be a FlexDraftConfigError
whose message names the offending value and how to fix it."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from flexdraft_vllm.config import CONFIG_KEY, FORMAT_VERSION, FlexDraftConfig, FlexDraftConfigError

BASE = dict(
    target_model_id="org/model",
    target_fingerprint="0123456789abcdef",
    target_architecture="LlamaForCausalLM",
    num_hidden_layers=30,
    hidden_size=576,
    vocab_size=49152,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    split_layer=20,
    block_size=8,
)


def cfg(**kw) -> FlexDraftConfig:
    return FlexDraftConfig(**{**BASE, **kw})


def smollm_like(**kw) -> LlamaConfig:
    d = dict(vocab_size=49152, hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
             num_key_value_heads=3, head_dim=64, architectures=["LlamaForCausalLM"])
    d.update(kw)
    return LlamaConfig(**d)


def test_valid_defaults():
    c = cfg()
    assert c.mode == "flex" and c.verify_rule == "cumprod" and c.tau == 0.01
    assert c.num_drafts == 7
    assert list(c.deep_layers) == list(range(20, 30))


# ---- invalid values -> clear errors ---------------------------------------------
@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"mode": "turbo"}, "mode='turbo': use one of flex, parallel, sequential, off"),
        ({"mode": None}, "mode=None"),
        ({"verify_rule": "product"}, "verify_rule='product': use cumprod or min"),
        ({"tau": -0.1}, "tau=-0.1 must be in [0, 1]"),
        ({"tau": 1.5}, "tau=1.5 must be in [0, 1]"),
        ({"tau": float("nan")}, "tau=nan"),
        ({"min_confidence": 1.01}, "min_confidence=1.01 must be in [0, 1]"),
        ({"min_confidence": -1}, "min_confidence=-1"),
        ({"block_size": 1}, "block_size=1 must be >= 2"),
        ({"block_size": 0}, "block_size=0"),
        ({"split_layer": 0}, "split_layer=0 must be in [1, 29]"),
        ({"split_layer": 30}, "split_layer=30 must be in [1, 29]"),
        ({"max_verify": 0}, "max_verify=0 must be in [1, block_size-1=7]"),
        ({"max_verify": 8}, "max_verify=8 must be in [1, block_size-1=7]"),
        ({"max_parallel_groups": 0}, "max_parallel_groups=0 must be >= 1"),
        ({"calibrator": "mlp"}, "calibrator='mlp': use tied or full"),
        ({"draft_dtype": "fp8"}, "draft_dtype='fp8': use auto, float32, bfloat16 or float16"),
        ({"bonus_in_block": "yes"}, "bonus_in_block='yes' must be true or false"),
    ],
)
def test_invalid_values_are_clear_errors(kw, needle):
    with pytest.raises(FlexDraftConfigError) as e:
        cfg(**kw)
    assert needle in str(e.value)
    assert str(e.value).startswith("invalid FlexDraft config")


@pytest.mark.parametrize("kw", [{"max_verify": 1}, {"max_verify": 7}, {"tau": 0.0}, {"tau": 1.0},
                                {"mode": "off"}, {"verify_rule": "min"}, {"max_parallel_groups": 1},
                                {"draft_dtype": "bfloat16"}, {"draft_dtype": "float32"}])
def test_boundary_values_are_valid(kw):
    cfg(**kw)


def test_max_verify_caps_num_drafts():
    assert cfg(max_verify=3).num_drafts == 3
    assert cfg(block_size=4).num_drafts == 3


def test_a_block_is_trimmed_to_the_verify_cap():
    c = cfg(block_size=8)
    assert [c.block_for(k) for k in (0, 1, 2, 3, 7, 9)] == [2, 2, 3, 4, 8, 8]  # bonus slot + one per draft


@pytest.mark.parametrize(
    "kw",
    [
        {"tau": "0.5"},  # a string from a CLI / JSON file
        {"min_confidence": "high"},
        {"max_verify": "3"},
        {"max_verify": 2.5},  # would slice drafts with a float later
        {"block_size": 8.5},
        {"max_parallel_groups": "2"},
    ],
)
def test_wrongly_typed_values_are_clear_errors(kw):
    """Runtime knobs arrive from JSON / CLI strings: a wrong type must be a
    FlexDraftConfigError naming the option, not a TypeError from a comparison
    (or silently accepted)."""
    name = next(iter(kw))
    with pytest.raises(FlexDraftConfigError, match=name):
        cfg(**kw)


# ---- runtime overrides ---------------------------------------------------------
def test_with_runtime_overrides_and_validates():
    c = cfg()
    assert c.with_runtime(None) is c and c.with_runtime({}) is c
    r = c.with_runtime({"mode": "sequential", "tau": 0.2, "max_verify": 4})
    assert (r.mode, r.tau, r.num_drafts) == ("sequential", 0.2, 4)
    assert c.mode == "flex"  # frozen original untouched
    with pytest.raises(FlexDraftConfigError, match="mode='fast'"):
        c.with_runtime({"mode": "fast"})
    with pytest.raises(FlexDraftConfigError, match="tau=2"):
        c.with_runtime({"tau": 2})


def test_with_runtime_rejects_unknown_and_weight_fields():
    c = cfg()
    with pytest.raises(FlexDraftConfigError) as e:
        c.with_runtime({"temprature": 0.5})
    assert "temprature" in str(e.value) and "allowed" in str(e.value) and "tau" in str(e.value)
    with pytest.raises(FlexDraftConfigError) as e:
        c.with_runtime({"block_size": 4})
    assert "block_size" in str(e.value) and "checkpoint" in str(e.value)


# ---- (de)serialisation ---------------------------------------------------------------
def test_weights_dict_round_trip_drops_runtime_fields():
    c = cfg(mode="parallel", tau=0.3, calibrator="full", calib_rank=64)
    d = c.weights_dict()
    assert not set(FlexDraftConfig.RUNTIME_FIELDS) & set(d)
    assert d["format_version"] == FORMAT_VERSION
    back = FlexDraftConfig.from_dict(json.loads(json.dumps(d)))
    assert back == cfg(calibrator="full", calib_rank=64)  # runtime knobs back to defaults


def test_from_dict_errors():
    d = cfg().weights_dict()
    with pytest.raises(FlexDraftConfigError, match="unknown keys"):
        FlexDraftConfig.from_dict({**d, "bogus": 1})
    with pytest.raises(FlexDraftConfigError, match="format_version 99 .*retrain or upgrade"):
        FlexDraftConfig.from_dict({**d, "format_version": 99})
    incomplete = dict(d)
    incomplete.pop("hidden_size")
    with pytest.raises(FlexDraftConfigError, match="incomplete.*hidden_size"):
        FlexDraftConfig.from_dict(incomplete)


def test_from_checkpoint(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FlexDraftConfigError) as e:
        FlexDraftConfig.from_checkpoint(missing)
    assert str(missing) in str(e.value) and "missing config.json" in str(e.value)
    assert "flexdraft_vllm.training.train" in str(e.value)

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(FlexDraftConfigError, match="not a FlexDraft drafter"):
        FlexDraftConfig.from_checkpoint(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({CONFIG_KEY: cfg().weights_dict()}))
    c = FlexDraftConfig.from_checkpoint(tmp_path, {"mode": "parallel"})
    assert c.mode == "parallel" and c.block_size == 8
    with pytest.raises(FlexDraftConfigError, match="split_layer"):
        FlexDraftConfig.from_checkpoint(tmp_path, {"split_layer": 3})


# ---- target checks ---------------------------------------------------------------------
def test_for_target_reads_hf_config():
    c = FlexDraftConfig.for_target(smollm_like(), split_layer=20, block_size=8, target_model_id="x")
    assert (c.num_hidden_layers, c.hidden_size, c.head_dim, c.num_key_value_heads) == (30, 576, 64, 3)
    assert c.target_architecture == "LlamaForCausalLM"
    # head_dim / kv heads derived when the HF config omits them
    t = smollm_like(head_dim=None, num_key_value_heads=None)
    t.head_dim = None
    c2 = FlexDraftConfig.for_target(t, split_layer=20, block_size=8)
    assert c2.head_dim == 64


def test_check_target_accepts_its_target():
    cfg().check_target(smollm_like(), "0123456789abcdef")
    cfg().check_target(smollm_like(), None)  # fingerprint unknown: not checked
    cfg(target_fingerprint="").check_target(smollm_like(), "ffff")  # drafter without fingerprint


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"hidden_size": 540}, "hidden_size: drafter 576 vs target 540"),
        ({"vocab_size": 32000}, "vocab_size: drafter 49152 vs target 32000"),
        ({"num_key_value_heads": 9}, "num_key_value_heads: drafter 3 vs target 9"),
        ({"num_hidden_layers": 24}, "num_hidden_layers: drafter 30 vs target 24"),
        # a target with fewer layers than the drafter's split layer: still a mismatch
        # message (not a complaint about split_layer, which the user did not set)
        ({"num_hidden_layers": 16}, "num_hidden_layers: drafter 30 vs target 16"),
    ],
)
def test_check_target_shape_mismatch(kw, needle):
    with pytest.raises(FlexDraftConfigError) as e:
        cfg().check_target(smollm_like(**kw))
    msg = str(e.value)
    assert needle in msg
    assert "org/model" in msg and "python -m flexdraft_vllm.training.train" in msg


def test_check_target_fingerprint_mismatch():
    with pytest.raises(FlexDraftConfigError) as e:
        cfg().check_target(smollm_like(), "ffffffffffffffff")
    msg = str(e.value)
    assert "0123456789abcdef" in msg and "ffffffffffffffff" in msg and "Retrain" in msg
