"""Fixtures for the reference-implementation tests.

* `target` / `drafter` / `tokenizer`: the project's real SmolLM2 target and the
  bundled drafter (flexdraft_vllm/drafters/smollm2-135m), loaded once.
* `tiny_target`: a random tiny Llama (fast; for shape / checkpoint tests).

The reference code is small-batch, Python-heavy torch: on a shared 2-core box a
second intra-op thread only adds synchronisation stalls (about 10x slower when
another job holds a core), so these tests run single-threaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

BUNDLED_DRAFTER = Path(__file__).resolve().parents[3] / "flexdraft_vllm" / "drafters" / "smollm2-135m"


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


def tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=96, hidden_size=48, intermediate_size=96, num_hidden_layers=4,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, architectures=["LlamaForCausalLM"],
    )
    base.update(kw)
    return LlamaConfig(**base)


def make_tiny_target(seed: int = 0, **kw):
    from transformers import LlamaForCausalLM

    from flexdraft_vllm.reference.target import TargetAdapter

    torch.manual_seed(seed)
    return TargetAdapter(LlamaForCausalLM(tiny_llama_config(**kw)).float())


@pytest.fixture
def tiny_target():
    return make_tiny_target()


@pytest.fixture
def make_tiny():
    """Factory: make_tiny(seed=0, **LlamaConfig overrides) -> TargetAdapter."""
    return make_tiny_target
