"""FlexDraft speculative decoding for vLLM (arXiv 2605.20022).

vLLM calls `register()` through the `vllm.general_plugins` entry point in every
process it starts (API server, engine core, workers, Ray actors). It must be
cheap, idempotent and import nothing heavy: the real work lives in
`flexdraft_vllm.vllm_integration` and is imported lazily by vLLM itself (the
model class is registered by its import path).
"""

__version__ = "0.1.0"

_REGISTERED = False


def register() -> None:
    """vLLM general-plugin entry point. Safe to call any number of times."""
    global _REGISTERED
    if _REGISTERED:
        return
    from flexdraft_vllm.vllm_integration.registration import register_with_vllm

    register_with_vllm()
    _REGISTERED = True


def is_registered() -> bool:
    return _REGISTERED


def __getattr__(name: str):
    # `speculative_config={"model": "flexdraft_vllm.FlexDraft"}` resolves here,
    # importing the vLLM-side code only when FlexDraft is actually enabled.
    if name == "FlexDraft":
        from flexdraft_vllm.vllm_integration.proposer import FlexDraftProposer

        return FlexDraftProposer
    raise AttributeError(f"module 'flexdraft_vllm' has no attribute {name!r}")
