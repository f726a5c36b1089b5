"""The ledger: every change FlexDraft makes to vLLM's own code, in one place.

Each entry says why it exists and which upstream change would remove it.
`apply()` is idempotent and only touches vLLM classes, never instances.

1. GPUModelRunner.propose_draft_token_ids (inherited by CPUModelRunner)
   Why: vLLM 0.32 calls custom_class proposers with sampled tokens and token
   ids only; FlexDraft's draft pass needs the runner's per-request block table
   and KV cache (it attends over the paged cache). The wrapper hands the
   runner to FlexDraftProposer and leaves every other proposer untouched.
   Remove when: custom proposers receive common_attn_metadata / the input
   batch (as EAGLE-style proposers already do in propose()).
"""

from __future__ import annotations

import functools

_APPLIED = False


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    original = GPUModelRunner.propose_draft_token_ids
    if getattr(original, "_flexdraft_wrapped", False):
        _APPLIED = True
        return

    @functools.wraps(original)
    def propose_draft_token_ids(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                                sample_hidden_states, aux_hidden_states, spec_decode_metadata,
                                common_attn_metadata, slot_mappings):
        from flexdraft_vllm.vllm_integration.proposer import FlexDraftProposer

        if isinstance(getattr(self, "drafter", None), FlexDraftProposer):
            self._draft_probs = None
            self._draft_prob_req_ids = None
            return self.drafter.propose_for_runner(self, sampled_token_ids, common_attn_metadata.block_table_tensor)
        return original(self, scheduler_output, sampled_token_ids, sampling_metadata, hidden_states,
                        sample_hidden_states, aux_hidden_states, spec_decode_metadata, common_attn_metadata,
                        slot_mappings)

    propose_draft_token_ids._flexdraft_wrapped = True  # type: ignore[attr-defined]
    GPUModelRunner.propose_draft_token_ids = propose_draft_token_ids
    _APPLIED = True
