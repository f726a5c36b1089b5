"""Where FlexDraft's settings come from inside vLLM, resolved once.

  additional_config={"flexdraft": {"drafter": PATH, "mode": ..., "tau": ...}}
    drafter  folder of a trained drafter; default: the bundled drafter whose
             target matches this model (SmolLM2-135M-Instruct ships with us)
    other    runtime fields of FlexDraftConfig (mode, verify_rule, tau,
             min_confidence, max_verify, max_parallel_groups)
vLLM's speculative config forbids extra keys, hence additional_config.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flexdraft_vllm.config import FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.target import check_architecture

BUNDLED = Path(__file__).resolve().parent.parent / "drafters"
ADDITIONAL_CONFIG_KEY = "flexdraft"


@dataclass(frozen=True)
class ResolvedOptions:
    config: FlexDraftConfig
    drafter_path: Path


def bundled_drafters() -> list[Path]:
    return sorted(p for p in BUNDLED.glob("*") if (p / "config.json").is_file())


def _target_fingerprint(model_cfg: Any) -> str | None:
    """The prepared model's recorded fingerprint, when the target is a local folder."""
    stamp = Path(str(model_cfg.model)) / "flexdraft_prepared.json"
    if stamp.is_file():
        return json.loads(stamp.read_text()).get("weights_sha256_16")
    return None


def resolve_options(additional_config: dict | None, model_cfg: Any) -> ResolvedOptions:
    raw = dict((additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {})
    if not isinstance(raw, dict):
        raise FlexDraftConfigError(f"additional_config['{ADDITIONAL_CONFIG_KEY}'] must be a JSON object")
    hf_cfg = model_cfg.hf_config
    check_architecture((getattr(hf_cfg, "architectures", None) or ["?"])[0])
    fingerprint = _target_fingerprint(model_cfg)
    drafter = raw.pop("drafter", None)
    if drafter is not None:
        path = Path(drafter).expanduser()
        cfg = FlexDraftConfig.from_checkpoint(path, raw)
        cfg.check_target(hf_cfg, fingerprint)
        return ResolvedOptions(cfg, path)
    errors = []
    for path in bundled_drafters():
        cfg = FlexDraftConfig.from_checkpoint(path, raw)
        try:
            cfg.check_target(hf_cfg, fingerprint)
        except FlexDraftConfigError as e:
            errors.append(f"{path.name}: {e}")
            continue
        return ResolvedOptions(cfg, path)
    raise FlexDraftConfigError(
        f"no FlexDraft drafter given for {model_cfg.model} and no bundled drafter fits it "
        f"({'; '.join(errors) or 'none bundled'}). Train one with `python -m flexdraft_vllm.training.train "
        f"--target {model_cfg.model} --out DIR` and pass additional_config={{\"flexdraft\": {{\"drafter\": \"DIR\"}}}}."
    )


PROPOSER_PATHS = ("flexdraft_vllm.FlexDraft", "flexdraft_vllm.vllm_integration.proposer.FlexDraftProposer")


def uses_flexdraft(vllm_config: Any) -> bool:
    spec = getattr(vllm_config, "speculative_config", None)
    return spec is not None and spec.method == "custom_class" and spec.model in PROPOSER_PATHS


def runs_eagerly(vllm_config: Any) -> bool:
    """Python hooks inside the model forward run: no torch.compile, no CUDA graphs."""
    return bool(getattr(vllm_config.model_config, "enforce_eager", False))


def check_vllm_config(vllm_config: Any) -> ResolvedOptions:
    """Everything FlexDraft needs from an engine config, checked once with clear
    errors: runs in the front-end process (patches.py entry 4) and again in the
    proposer."""
    opts = resolve_options(vllm_config.additional_config, vllm_config.model_config)
    par = vllm_config.parallel_config
    if par.tensor_parallel_size != 1 or par.pipeline_parallel_size != 1:
        raise FlexDraftConfigError(
            f"FlexDraft supports tensor_parallel_size=1 and pipeline_parallel_size=1 only "
            f"(got {par.tensor_parallel_size} and {par.pipeline_parallel_size}); drop -tp/-pp or FlexDraft"
        )
    if opts.config.mode == "parallel" and not runs_eagerly(vllm_config):
        raise FlexDraftConfigError(
            "FlexDraft mode 'parallel' runs mask rows inside the target's forward, which needs eager "
            "execution: add enforce_eager=True (--enforce-eager), or use mode 'flex' (it uses "
            "parallel only where the model runs eagerly) or 'sequential'"
        )
    k = vllm_config.speculative_config.num_speculative_tokens
    if k is None or k < 1:
        raise FlexDraftConfigError(f"num_speculative_tokens must be >= 1 for FlexDraft (got {k}); use "
                                   f"{opts.config.block_size - 1} (block_size - 1 of the drafter)")
    return opts
