"""Shared fixtures. The README's test command prepares the model first;
a missing model is an error here, never a skip (a skipped suite proves nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flexdraft_vllm.prepare import default_model_dir, is_prepared

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Engines run multiprocess, as users run them: several engines in one pytest
# process then start and stop cleanly. Tests read engine state through
# collective_rpc with a callable, which needs pickled functions allowed.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"


@pytest.fixture(scope="session")
def target_dir() -> Path:
    d = default_model_dir()
    if not is_prepared(d):
        pytest.fail(f"target model not prepared at {d}: run `./run.sh setup` (or python -m flexdraft_vllm.prepare)")
    return d


# ---- real engines -------------------------------------------------------------------
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
