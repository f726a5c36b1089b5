"""Fixtures for the reference-implementation tests.

* `target` / `drafter` / `tokenizer`: the project's real SmolLM2 target and the
  bundled drafter (flexdraft_vllm/drafters/smollm2-135m), loaded once.
* `tiny_target`: a random tiny Llama (fast; for shape / checkpoint tests;
  built by tests/unit/tiny_models.py, shared with the training tests).

The reference code is small-batch, Python-heavy torch: on a shared 2-core box a
second intra-op thread only adds synchronisation stalls (about 10x slower when
another job holds a core), so these tests run single-threaded.
"""

from __future__ import annotations

import os

import pytest
import torch
from project_paths import BUNDLED_DRAFTER
from tiny_models import make_tiny_target



@pytest.fixture(scope="package", autouse=True)
def _single_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("FLEXDRAFT_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="package")
def target(target_dir):
    from flexdraft_vllm.reference.target import load_target

    return load_target(str(target_dir))


@pytest.fixture(scope="package")
def drafter(target, target_dir):
    from flexdraft_vllm.prepare import weights_fingerprint
    from flexdraft_vllm.reference.drafter import FlexDraftDrafter

    if not (BUNDLED_DRAFTER / "config.json").is_file():
        pytest.fail(f"bundled drafter missing at {BUNDLED_DRAFTER}")
    return FlexDraftDrafter.load(BUNDLED_DRAFTER, target, target_fingerprint=weights_fingerprint(target_dir))


@pytest.fixture(scope="package")
def tokenizer(target_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(target_dir))


@pytest.fixture
def tiny_target():
    return make_tiny_target()


@pytest.fixture
def make_tiny():
    """Factory: make_tiny(seed=0, **LlamaConfig overrides) -> TargetAdapter."""
    return make_tiny_target
