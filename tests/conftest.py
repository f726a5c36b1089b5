"""Shared fixtures. The README's test command prepares the model first;
a missing model is an error here, never a skip (a skipped suite proves nothing)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from flexdraft_vllm.prepare import default_model_dir, is_prepared

# Engine-internal tests run the engine in process so the test can inspect it;
# individual tests that need the multiprocess engine set this themselves.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def target_dir() -> Path:
    d = default_model_dir()
    if not is_prepared(d):
        pytest.fail(f"target model not prepared at {d}: run `./run.sh setup` (or python -m flexdraft_vllm.prepare)")
    return d
