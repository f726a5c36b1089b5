"""The real engine with the real model and the plugin installed (no FlexDraft yet
in this file): the plugin is loaded in vLLM's own worker process, and greedy
generation through the prepared SmolLM2 is sensible."""

from __future__ import annotations

import os

import pytest


def _worker_state(worker):
    import os as _os

    import flexdraft_vllm

    return {"registered": flexdraft_vllm.is_registered(), "pid": _os.getpid()}


@pytest.fixture(scope="module")
def mp_llm(target_dir):
    # conftest runs engines multiprocess: the worker is a process vLLM started itself.
    from vllm import LLM

    from flexdraft_vllm.engine_defaults import default_engine_kwargs

    llm = LLM(model=str(target_dir), max_model_len=1024, **default_engine_kwargs())
    yield llm
    llm.llm_engine.engine_core.shutdown()


def test_plugin_loaded_in_engine_worker(mp_llm):
    states = mp_llm.collective_rpc(_worker_state)
    assert states, "no worker answered"
    assert all(s["registered"] for s in states), states
    assert all(s["pid"] != os.getpid() for s in states), "worker ran in the test process"


def test_greedy_answers_are_sensible(mp_llm):
    from vllm import SamplingParams

    msgs = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "user", "content": "Write a python function that adds two numbers."}],
    ]
    outs = mp_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=48))
    texts = [o.outputs[0].text for o in outs]
    assert "Paris" in texts[0], texts[0]
    assert "def " in texts[1] and "return" in texts[1], texts[1]
    # greedy is deterministic: same request, same tokens
    again = mp_llm.chat(msgs[:1], SamplingParams(temperature=0, max_tokens=48))
    assert again[0].outputs[0].token_ids == outs[0].outputs[0].token_ids
