"""Bad input gets a clear error that names the problem and the fix, raised in
the caller's process before any engine starts (patches.py entry 4); a request
vLLM rejects leaves a running FlexDraft engine serving."""

from __future__ import annotations

import json
import shutil

import pytest

from llm_helpers import make_llm, shutdown
from flexdraft_vllm.config import FlexDraftConfigError


def _llm_error(target_dir, **flexdraft) -> str:
    with pytest.raises(FlexDraftConfigError) as e:
        make_llm(target_dir, flexdraft=flexdraft)
    return str(e.value)


def test_missing_drafter_checkpoint(target_dir, tmp_path):
    msg = _llm_error(target_dir, mode="flex", drafter=str(tmp_path / "nope"))
    assert "missing config.json" in msg and "training.train" in msg


def test_drafter_trained_for_another_target(target_dir, tmp_path):
    from flexdraft_vllm.vllm_integration.options import bundled_drafters

    d = tmp_path / "other"
    shutil.copytree(bundled_drafters()[0], d)
    cfg = json.loads((d / "config.json").read_text())
    block = cfg["flexdraft_config"]
    block["hidden_size"] = block["hidden_size"] * 2
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _llm_error(target_dir, drafter=str(d))
    assert "hidden_size" in msg and "training.train" in msg, msg


@pytest.mark.parametrize("opts, needle", [
    ({"mode": "bogus"}, "mode"),
    ({"mode": "flex", "tau": 2.0}, "tau"),
    ({"mode": "flex", "max_verify": 99}, "max_verify"),
    ({"mode": "flex", "verify_rule": "median"}, "verify_rule"),
])
def test_invalid_runtime_values(opts, needle):
    from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

    with pytest.raises(FlexDraftConfigError, match=needle):
        flexdraft_engine_kwargs(**opts)


def test_unknown_option_names_the_allowed_ones():
    from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

    with pytest.raises(ValueError, match="allowed"):
        flexdraft_engine_kwargs(mode="flex", block_size=4)


def test_raw_vllm_arguments_are_checked_in_the_front_end(target_dir):
    """Users who write vLLM's own arguments (no helper) get the same errors."""
    from vllm import LLM

    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    spec = {"model": "flexdraft_vllm.FlexDraft", "num_speculative_tokens": 7}
    with pytest.raises(FlexDraftConfigError, match="parallel.*enforce_eager"):
        LLM(model=str(target_dir), speculative_config=spec, max_model_len=1024,
            additional_config={"flexdraft": {"mode": "parallel"}}, **default_engine_kwargs(enforce_eager=False))
    with pytest.raises(FlexDraftConfigError, match="tau"):
        LLM(model=str(target_dir), speculative_config=spec, max_model_len=1024,
            additional_config={"flexdraft": {"tau": -1}}, **default_engine_kwargs())


def test_unsupported_target_architecture():
    from flexdraft_vllm.reference.target import UnsupportedModelError, check_architecture

    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        check_architecture("GPT2LMHeadModel")


def test_rejected_requests_leave_the_engine_serving(target_dir):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    llm = make_llm(target_dir, flexdraft={"mode": "flex"}, max_model_len=256)
    try:
        good = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        with pytest.raises(VLLMValidationError, match="maximum context length"):
            llm.generate(["word " * 400], SamplingParams(max_tokens=8), use_tqdm=False)  # prompt > max_model_len
        with pytest.raises(VLLMValidationError, match="temperature"):
            SamplingParams(temperature=-1.0)
        out = llm.generate([good], SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
        assert "Paris" in out[0].outputs[0].text
    finally:
        shutdown(llm)
