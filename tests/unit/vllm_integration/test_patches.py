"""The ledger: apply() is idempotent, and the CPU expand replacement is exact."""

from __future__ import annotations

import torch

from flexdraft_vllm.vllm_integration import patches


def test_apply_is_idempotent_and_wraps_once():
    from vllm.engine.arg_utils import EngineArgs
    from vllm.platforms.cpu import CpuPlatform
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def wrapped():
        return (GPUModelRunner.propose_draft_token_ids, GPUModelRunner.sample_tokens, GPUModelRunner.execute_model,
                GPUModelRunner._prepare_inputs,
                EngineArgs.create_engine_config, CpuPlatform.register_triton_kernel_overrides.__func__)

    patches.apply()
    first = wrapped()
    patches._APPLIED = False  # force a second pass: must not wrap the wrappers
    patches.apply()
    again = wrapped()
    assert first == again
    assert all(getattr(f, "_flexdraft_wrapped", False) for f in first)


def test_expand_keeps_dtype_and_replaces_sentinel():
    cu = torch.tensor([2, 2, 5, 6], dtype=torch.int32)  # request 1 has no drafts
    temp = torch.tensor([0.7, 1.3, -1.0, 0.2])  # -1 stands for "greedy" here
    out = torch.full((6,), float("nan"))
    patches.expand_batch_to_tokens_impl(out, temp, cu, -1.0, 1.0)
    torch.testing.assert_close(out, torch.tensor([0.7, 0.7, 1.0, 1.0, 1.0, 0.2]))
    top_k = torch.tensor([5, 0, 7], dtype=torch.int32)
    out_k = torch.full((4,), -9, dtype=torch.int32)
    patches.expand_batch_to_tokens_impl(out_k, top_k, torch.tensor([1, 3, 4]), 0, 0)
    assert out_k.tolist() == [5, 0, 0, 7]


def test_vllm_cpu_rejection_sampler_respects_temperature_after_patch():
    """vLLM's own apply_sampling_constraints on CPU scales logits by 1/T
    (before the fix the expanded temperatures were uninitialised memory)."""
    import types

    from vllm.platforms import current_platform
    from vllm.v1.sample import rejection_sampler as rs

    patches.apply()
    current_platform.register_triton_kernel_overrides()
    logits = torch.randn(6, 11)
    md = types.SimpleNamespace(all_greedy=False, all_random=True, temperature=torch.tensor([0.5, 2.0]),
                               top_k=None, top_p=None)
    got = rs.apply_sampling_constraints(logits.clone(), torch.tensor([4, 6]), md)
    want = logits / torch.tensor([0.5] * 4 + [2.0] * 2)[:, None]
    torch.testing.assert_close(got, want)


def test_steps_without_drafts_take_the_plain_path():
    """Entry 6: a FlexDraft step in which no request has drafts is prepared
    with the speculative config hidden (vLLM's plain sampling path); steps
    with drafts, other proposers, and the config afterwards are untouched."""
    import types

    from flexdraft_vllm.vllm_integration.proposer import FlexDraftProposer

    seen = []

    def prepare(runner, so, fail=False):
        seen.append(runner.speculative_config)
        if fail:
            raise RuntimeError("boom")
        return "inputs"

    wrapped = patches.plain_step_inputs(prepare)
    flex = types.SimpleNamespace(speculative_config="spec", drafter=FlexDraftProposer.__new__(FlexDraftProposer))
    other = types.SimpleNamespace(speculative_config="spec", drafter=object())
    no_drafts = types.SimpleNamespace(scheduled_spec_decode_tokens={})
    drafts = types.SimpleNamespace(scheduled_spec_decode_tokens={"r0": [5, 6]})
    assert wrapped(flex, no_drafts) == "inputs" and seen[-1] is None and flex.speculative_config == "spec"
    assert wrapped(flex, drafts) == "inputs" and seen[-1] == "spec"
    assert wrapped(other, no_drafts) == "inputs" and seen[-1] == "spec"  # e.g. ngram: vLLM's own behaviour
    try:
        wrapped(flex, no_drafts, fail=True)
    except RuntimeError:
        pass
    assert flex.speculative_config == "spec"  # restored on errors too
