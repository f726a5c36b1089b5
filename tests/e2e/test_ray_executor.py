"""vLLM's Ray executor (its multi-node backend).

1. Everywhere: a Ray worker process loads vLLM's general plugins the way
   vLLM's Ray workers do at start-up (`vllm.plugins.load_general_plugins`), and
   FlexDraft is registered there with its vLLM patches applied. This is what
   "the plugin loads in Ray workers" rests on: the entry point is found in
   Ray's worker environment.
2. Where vLLM's platform runs the Ray executor (CUDA/ROCm/XPU): a real engine
   with distributed_executor_backend="ray" drafts with FlexDraft inside the
   Ray worker, with output identical to plain vLLM. vLLM 0.32's CPU platform
   refuses the Ray executor itself ("current platform cpu does not support
   ray": CpuPlatform.ray_device_key is empty, upstream vllm#21602; the CPU Ray
   executor PR vllm#25386 was closed unmerged), so on CPU this part skips
   with that reason.
"""

from __future__ import annotations

import pytest

from llm_helpers import make_llm, shutdown, spec_metrics

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "<|im_start|>user\nWrite a python function that adds two numbers.<|im_end|>\n<|im_start|>assistant\n"]


def _worker_state(worker):
    import os

    import flexdraft_vllm

    return {"registered": flexdraft_vllm.is_registered(), "pid": os.getpid(),
            "drafter": type(getattr(worker.model_runner, "drafter", None)).__name__}


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray", reason="ray is a test dependency; install flexdraft-vllm[test]")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


def test_plugin_loads_in_ray_worker(ray_session):  # ~15 s: in the default run
    import os

    ray = ray_session

    def plugin_state_after_vllm_plugin_load():  # defined here: Ray ships it by value
        """Runs inside a Ray worker: vLLM's own plugin loading, then what it did."""
        import os

        from vllm.plugins import load_general_plugins

        load_general_plugins()
        import flexdraft_vllm
        from flexdraft_vllm.vllm_integration import patches
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner

        return {"pid": os.getpid(), "registered": flexdraft_vllm.is_registered(),
                "runner_patched": getattr(GPUModelRunner.propose_draft_token_ids, "_flexdraft_wrapped", False),
                "ledger_applied": patches._APPLIED}

    state = ray.get(ray.remote(plugin_state_after_vllm_plugin_load).remote(), timeout=300)
    assert state["pid"] != os.getpid(), "the task ran in the driver, not in a Ray worker"
    assert state["registered"] and state["runner_patched"] and state["ledger_applied"], state


@pytest.mark.slow
def test_flexdraft_under_ray_executor(target_dir, ray_session):
    from vllm.platforms import current_platform
    from vllm import SamplingParams

    if not current_platform.ray_device_key:
        pytest.skip(f"vLLM {current_platform.device_name} platform does not run the Ray executor "
                    "(empty ray_device_key; upstream vllm#21602): engine part runs on CUDA machines")
    sp = SamplingParams(temperature=0, max_tokens=48)
    llm = make_llm(target_dir, flexdraft={"mode": "sequential"}, distributed_executor_backend="ray")  # drafts every step
    try:
        states = llm.collective_rpc(_worker_state)
        got = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        drafted = spec_metrics(llm).get("num_draft_tokens", 0)
    finally:
        shutdown(llm)
    assert states and all(s["registered"] and s["drafter"] == "FlexDraftProposer" for s in states), states
    assert drafted > 0
    plain = make_llm(target_dir)
    try:
        want = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, sp, use_tqdm=False)]
    finally:
        shutdown(plain)
    assert got == want
