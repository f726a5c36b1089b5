"""vLLM's Ray executor (its multi-node backend): the plugin is loaded inside the
Ray worker and FlexDraft drafts there, with output identical to plain vLLM."""

from __future__ import annotations

import pytest

from conftest import make_llm, shutdown, spec_metrics

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"]


def _worker_state(worker):
    import os

    import flexdraft_vllm

    return {"registered": flexdraft_vllm.is_registered(), "pid": os.getpid(),
            "drafter": type(getattr(worker.model_runner, "drafter", None)).__name__}


@pytest.mark.slow
def test_flexdraft_under_ray_executor(target_dir):
    ray = pytest.importorskip("ray", reason="ray is a test dependency; install flexdraft-vllm[test]")
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=48)
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        llm = make_llm(target_dir, flexdraft={"mode": "sequential"}, distributed_executor_backend="ray")  # drafts every step
        try:
            states = llm.collective_rpc(_worker_state)
            got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
            drafted = spec_metrics(llm).get("num_draft_tokens", 0)
        finally:
            shutdown(llm)
    finally:
        ray.shutdown()
    assert states and all(s["registered"] and s["drafter"] == "FlexDraftProposer" for s in states), states
    assert drafted > 0
    plain = make_llm(target_dir)
    try:
        want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, sp, use_tqdm=False)]
    finally:
        shutdown(plain)
    assert got == want
