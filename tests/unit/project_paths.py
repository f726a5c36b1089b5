"""Paths of project files the unit tests read (a uniquely named module: see tests/conftest.py)."""

from pathlib import Path

BUNDLED_DRAFTER = Path(__file__).resolve().parents[2] / "flexdraft_vllm" / "drafters" / "smollm2-135m"
