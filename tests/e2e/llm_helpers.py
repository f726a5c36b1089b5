"""Real vLLM engines for the e2e tests: start (make_llm), stop (shutdown), and read
their speculative-decoding counters (spec_metrics, metric)."""

from __future__ import annotations


def make_llm(target_dir, flexdraft: dict | None = None, **overrides):
    """A real vLLM engine on the prepared model; FlexDraft when `flexdraft` is
    given (its items are flexdraft_engine_kwargs arguments)."""
    from vllm import LLM

    from flexdraft_vllm.engine_defaults import default_engine_kwargs
    from flexdraft_vllm.vllm_integration.speculative import flexdraft_engine_kwargs

    kw = default_engine_kwargs(max_model_len=1024, disable_log_stats=False)
    if flexdraft is not None:
        kw.update(flexdraft_engine_kwargs(**flexdraft))
    kw.update(overrides)
    return LLM(model=str(target_dir), **kw)


def shutdown(llm) -> None:
    import gc

    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass
    del llm
    gc.collect()


def spec_metrics(llm) -> dict:
    """vLLM's own spec-decode counters (the numbers Prometheus exports)."""
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            out[m.name.removeprefix("vllm:spec_decode_")] = getattr(m, "values", None) or getattr(m, "value", None)
    return out


def metric(llm, name: str) -> float:
    """One of vLLM's own counters/gauges (e.g. "vllm:num_preemptions"), summed over labels."""
    total = 0.0
    for m in llm.get_metrics():
        if m.name == name:
            total += float(getattr(m, "value", 0) or 0)
    return total


def generate_in_batches(llm, prompts, sp, batch: int):
    """Submit `batch` prompts at a time, so the engine runs at that batch size."""
    out = []
    for i in range(0, len(prompts), batch):
        out += llm.generate(prompts[i : i + batch], sp, use_tqdm=False)
    return out
