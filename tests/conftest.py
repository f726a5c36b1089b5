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

# helpers that start and read real engines live in tests/e2e/llm_helpers.py: a module
# imported by name (`from conftest import ...` resolves to whichever conftest.py
# pytest imported last, which depends on the paths a run collects)
