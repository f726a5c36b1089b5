"""Paths of project files the unit tests read (a uniquely named module: see tests/conftest.py)."""

from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "flexdraft_vllm"
BUNDLED_DRAFTER = PACKAGE / "drafters" / "smollm2-135m"
TRAIN_CONFIGS = PACKAGE / "configs"
