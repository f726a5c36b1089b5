"""How users switch FlexDraft on: the exact vLLM arguments.

  LLM(model, **flexdraft_engine_kwargs(mode="flex"))
  vllm serve MODEL $(flexdraft-vllm serve-args --mode flex)      # or: flexdraft-vllm serve MODEL

which expand to
  speculative_config={"model": "flexdraft_vllm.FlexDraft", "num_speculative_tokens": 7}
  additional_config={"flexdraft": {"mode": "flex", ...}}   # optional
"""

from __future__ import annotations

import json
from typing import Any

from flexdraft_vllm.config import FlexDraftConfig

PROPOSER_PATH = "flexdraft_vllm.FlexDraft"
DEFAULT_NUM_SPECULATIVE_TOKENS = 7  # = block_size - 1 of the bundled drafter


def flexdraft_speculative_config(num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS) -> dict[str, Any]:
    return {"model": PROPOSER_PATH, "num_speculative_tokens": num_speculative_tokens}


def flexdraft_engine_kwargs(mode: str = "flex", drafter: str | None = None,
                            num_speculative_tokens: int = DEFAULT_NUM_SPECULATIVE_TOKENS, **runtime: Any) -> dict[str, Any]:
    """kwargs to merge into vllm.LLM(...). Runtime options are validated here,
    in the caller's process, so a typo fails before any engine starts."""
    opts: dict[str, Any] = {"mode": mode, **runtime}
    bad = set(opts) - set(FlexDraftConfig.RUNTIME_FIELDS)
    if bad:
        raise ValueError(f"unknown FlexDraft option(s) {sorted(bad)}; allowed: {list(FlexDraftConfig.RUNTIME_FIELDS)}")
    _check_values(opts, drafter)
    if drafter is not None:
        opts["drafter"] = str(drafter)
    return {
        "speculative_config": flexdraft_speculative_config(num_speculative_tokens),
        "additional_config": {"flexdraft": opts},
    }


def _check_values(runtime: dict[str, Any], drafter: str | None) -> None:
    """Range-check runtime values against the drafter's (or a bundled) checkpoint."""
    from flexdraft_vllm.vllm_integration.options import bundled_drafters

    paths = [drafter] if drafter is not None else bundled_drafters()[:1]
    for path in paths:
        FlexDraftConfig.from_checkpoint(path, runtime)


def flexdraft_serve_args(mode: str = "flex", drafter: str | None = None, **runtime: Any) -> list[str]:
    """The same as `vllm serve` flags."""
    kw = flexdraft_engine_kwargs(mode, drafter, **runtime)
    return ["--speculative-config", json.dumps(kw["speculative_config"]),
            "--additional-config", json.dumps(kw["additional_config"])]
