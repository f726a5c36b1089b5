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

2. CpuPlatform.register_triton_kernel_overrides (CPU backend only)
   Why: vLLM 0.32's C++ fallback for rejection_sampler.expand_kernel
   (cpu_triton_utils._expand_kernel_impl) converts `output` and `input` to
   int64 copies. For the float tensors the rejection sampler expands
   (temperature, top_p) the result is written into a temporary and the real
   output stays uninitialised (and 0.7 would truncate to 0 anyway), so every
   speculative method (ngram, EAGLE, FlexDraft) samples from garbage logits at
   temperature > 0 on CPU. Greedy is unaffected. After vLLM registers its
   overrides we register a dtype-preserving torch implementation for that one
   kernel. Remove when: _expand_kernel_impl keeps the tensors' dtypes.

3. GPUModelRunner.sample_tokens (CPU generators only)
   Why: a request whose prefill is split into chunks gets a token sampled
   and discarded after each partial chunk; vLLM then rewinds the request's
   seeded generator with Generator.set_offset, which only CUDA (Philox)
   generators have. On CPU any seeded request (SamplingParams(seed=...)) whose
   prompt is chunked kills the engine ("CPU Generator does not use offset").
   The wrapper detaches the generators of those discarded rows while
   sampling (their throw-away token uses the global RNG), so the request's
   own stream is untouched: exactly what the rewind intends.
   Remove when: vLLM restores CPU generators by state instead of offset.

4. EngineArgs.create_engine_config (validation only, changes nothing)
   Why: custom_class proposers are constructed inside the engine-core
   process; a bad FlexDraft option (missing drafter, wrong target, invalid
   mode) would surface there as "Engine core initialization failed. See root
   cause above". Checking the same options right after vLLM built its config,
   in the caller's process, makes LLM(...) raise FlexDraftConfigError itself
   and `vllm serve` exit with the message. Remove when: vLLM validates
   custom proposers in the front-end (e.g. a classmethod hook on the class).

5. GPUModelRunner.execute_model (FlexDraft engines only)
   Why: parallel mode computes mask groups inside the verify forward, so the
   proposer must see the step's scheduler output before the forward runs (to
   plan the groups and time the step for the flex policy); vLLM 0.32 gives a
   custom_class proposer nothing before sampling. The wrapper calls
   FlexDraftProposer.begin_step, then vLLM's own execute_model. Remove when:
   proposers get a pre-forward hook with the scheduler output.

6. GPUModelRunner._prepare_inputs (FlexDraft engines only)
   Why: with a speculative config, vLLM 0.32 sends every step through the
   rejection sampler, also a step in which no request has drafts (for
   recurrent attention backends, which Llama/Qwen targets do not use). The
   flex policy's "off" steps are exactly such steps; through the rejection
   sampler they cost more than a plain decode step (+3.6 ms of sampling at
   batch 64 on a 2-core Xeon, 2% of the step). For a step without drafts the
   wrapper hides the speculative config while vLLM prepares the inputs, so it
   takes its plain path (spec_decode_metadata None, vLLM's own sampler,
   which the rejection sampler also uses for bonus tokens: same tokens, same
   RNG draws). Remove when: vLLM takes the plain path itself for steps
   without drafts on non-recurrent models.
"""

from __future__ import annotations

import functools

import torch

_APPLIED = False
EXPAND_KERNEL = "vllm.v1.sample.rejection_sampler.expand_kernel"


def apply() -> None:
    global _APPLIED
    if _APPLIED:
        return
    _patch_runner_propose()
    _patch_cpu_kernel_overrides()
    _patch_seeded_discard_on_cpu()
    _patch_frontend_validation()
    _patch_runner_begin_step()
    _patch_runner_plain_steps()
    _APPLIED = True


def expand_batch_to_tokens_impl(
    output: torch.Tensor,  # [num_tokens] any dtype
    input_val: torch.Tensor,  # [batch_size] same dtype
    cu_num_tokens: torch.Tensor,  # [batch_size] int, cumulative tokens per request
    replace_from,
    replace_to,
    MAX_NUM_TOKENS=None,
) -> None:
    """What expand_kernel computes: output[t] = input[req(t)], with
    replace_from -> replace_to, in the tensors' own dtypes."""
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    vals = torch.where(input_val == replace_from, torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    n = int(cu_num_tokens[-1]) if cu_num_tokens.numel() else 0
    output[:n] = vals.repeat_interleave(counts)


def _wrap(owner, name: str, make, *, as_classmethod: bool = False) -> None:
    """Replace `owner.name` by `make(original)`, once: a second call finds the
    `_flexdraft_wrapped` mark and leaves the wrapper in place."""
    original = getattr(owner, name)
    original = getattr(original, "__func__", original)  # a classmethod's function
    if getattr(original, "_flexdraft_wrapped", False):
        return
    wrapper = functools.wraps(original)(make(original))
    wrapper._flexdraft_wrapped = True
    setattr(owner, name, classmethod(wrapper) if as_classmethod else wrapper)


def _patch_cpu_kernel_overrides() -> None:
    from vllm.platforms.cpu import CpuPlatform

    def make(original):
        def register_triton_kernel_overrides(cls) -> None:
            original(cls)
            from vllm.triton_utils.dispatcher import _registry, register_kernels

            if EXPAND_KERNEL in _registry:  # vLLM installed its C++ fallback: replace that one
                _registry.pop(EXPAND_KERNEL)  # a deliberate replacement, not the "overwriting" warning case
                register_kernels({EXPAND_KERNEL: expand_batch_to_tokens_impl})

        return register_triton_kernel_overrides

    _wrap(CpuPlatform, "register_triton_kernel_overrides", make, as_classmethod=True)


def _patch_seeded_discard_on_cpu() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def sample_tokens(self, *args, **kwargs):
            gens = self.input_batch.generators
            if not gens or getattr(self, "execute_model_state", None) is None:
                return original(self, *args, **kwargs)
            num_reqs = self.input_batch.num_reqs
            discard = self.discard_request_mask.np[:num_reqs].nonzero()[0]
            detached = {int(i): gens.pop(int(i)) for i in discard
                        if int(i) in gens and gens[int(i)].device.type == "cpu"}
            try:
                return original(self, *args, **kwargs)
            finally:
                gens.update(detached)

        return sample_tokens

    _wrap(GPUModelRunner, "sample_tokens", make)


def _patch_frontend_validation() -> None:
    from vllm.engine.arg_utils import EngineArgs

    def make(original):
        def create_engine_config(self, *args, **kwargs):
            vllm_config = original(self, *args, **kwargs)
            from flexdraft_vllm.vllm_integration.options import check_vllm_config, uses_flexdraft

            if uses_flexdraft(vllm_config):
                check_vllm_config(vllm_config)
            return vllm_config

        return create_engine_config

    _wrap(EngineArgs, "create_engine_config", make)


def _patch_runner_propose() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
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

        return propose_draft_token_ids

    _wrap(GPUModelRunner, "propose_draft_token_ids", make)


def _patch_runner_begin_step() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    def make(original):
        def execute_model(self, scheduler_output, *args, **kwargs):
            from flexdraft_vllm.vllm_integration.proposer import FlexDraftProposer

            drafter = getattr(self, "drafter", None)
            if isinstance(drafter, FlexDraftProposer):
                drafter.begin_step(self, scheduler_output)
            return original(self, scheduler_output, *args, **kwargs)

        return execute_model

    _wrap(GPUModelRunner, "execute_model", make)


def plain_step_inputs(original):
    """Entry 6's wrapper of GPUModelRunner._prepare_inputs (module level for tests)."""

    def _prepare_inputs(self, scheduler_output, *args, **kwargs):
        from flexdraft_vllm.vllm_integration.proposer import FlexDraftProposer

        spec = self.speculative_config
        if (spec is None or scheduler_output.scheduled_spec_decode_tokens
                or not isinstance(getattr(self, "drafter", None), FlexDraftProposer)):
            return original(self, scheduler_output, *args, **kwargs)
        self.speculative_config = None  # read only as "use_spec_decode" in _prepare_inputs
        try:
            return original(self, scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = spec

    return _prepare_inputs


def _patch_runner_plain_steps() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    _wrap(GPUModelRunner, "_prepare_inputs", plain_step_inputs)
