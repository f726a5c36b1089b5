"""FlexDraft configuration: one frozen dataclass.

Two sources, merged once:
  * the drafter checkpoint's config.json, block `flexdraft_config`: what the
    weights were trained for (target identity, split layer, block size, ...);
  * runtime knobs from vLLM's `additional_config={"flexdraft": {...}}` or the
    speculative config (mode, tau, verify rule, ...).
Checkpoint fields cannot be overridden at run time (they describe weights).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

CONFIG_KEY = "flexdraft_config"
FORMAT_VERSION = 1

Mode = Literal["flex", "parallel", "sequential", "off"]
VerifyRule = Literal["cumprod", "min"]
CalibratorKind = Literal["tied", "full"]
CalibAnchor = Literal["bonus", "chain"]
DraftDtype = Literal["auto", "float32", "bfloat16", "float16"]


class FlexDraftConfigError(ValueError):
    """A FlexDraft configuration or checkpoint problem, with the fix in the message."""


def trimmed_block(block_size: int, max_drafts: int) -> int:
    """Masks per block for a step verifying at most max_drafts drafts: slot 0
    (the bonus slot) and one per draft, at least 2 and at most block_size.
    Masks past the last verified draft are never read; they only feed the
    others through in-block attention, and held-out slot accuracy does not
    depend on them (benchmarks/results/drafter-eval/block-trim.md)."""
    return max(2, min(block_size, max_drafts + 1))


@dataclass(frozen=True)
class FlexDraftConfig:
    # ---- describes the weights (from the checkpoint) -------------------------
    target_model_id: str
    target_fingerprint: str  # sha256[:16] of the target's weight files ("" = unchecked)
    target_architecture: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    split_layer: int  # layers [split_layer, L) are "deep": masks enter here
    block_size: int  # B masks per block; the first sits in the bonus slot -> B-1 drafts
    calibrator: CalibratorKind = "tied"
    calib_rank: int = 256
    # which token calibrates draft slot k: "bonus" (the paper): the resolved bonus
    # for every slot; "chain": slot 1 the bonus, slot k>1 the draft chosen for
    # slot k-1, so slots are calibrated one after another. A draft only counts
    # when every earlier one was accepted, and then its anchor IS the true
    # previous token: what the calibrator was trained on (teacher forcing).
    calib_anchor: CalibAnchor = "bonus"
    # drafts come from the draft_vocab_size most frequent tokens of the training
    # data (0 = the full vocabulary): the draft head then reads a K-row slice of
    # the LM head instead of all of it, which is most of a draft pass's memory
    # traffic. Verification is over the full vocabulary, so output is unchanged.
    draft_vocab_size: int = 0
    # ours: a sequential draft pass runs after sampling, so the bonus is known;
    # with bonus_in_block the block starts from it: slot 0 = mask_embedding +
    # W0 embed(bonus), slots 1.. = mask_embedding + W1 embed(bonus) (the
    # drafter's bonus_proj, zero-initialised: untrained it is the paper's block).
    # A parallel pass cannot know its groups' bonuses (the target produces them
    # in the same forward) and runs the plain block; training drops the bonus
    # from a share of blocks (TrainConfig.bonus_drop) so one checkpoint serves both.
    bonus_in_block: bool = False
    format_version: int = FORMAT_VERSION
    # ---- runtime knobs (additional_config / speculative config) -------------
    mode: Mode = "flex"
    verify_rule: VerifyRule = "cumprod"
    tau: float = 0.01  # cumprod rule: keep drafts while prod(p_i) >= tau
    min_confidence: float = 0.3  # min rule: keep drafts while every p_i >= this
    max_verify: int | None = None  # cap on drafts verified per step (None: B-1)
    max_parallel_groups: int | None = None  # cap on G in parallel mode (None: n+1)
    # precision of the mask path (drafter weights and its copy of the deep
    # layers' norms/MLPs). Drafts are proposals, so this moves speed and
    # acceptance, never the output. "auto": bfloat16 when the target runs in
    # float32 on hardware with fast bf16 matmuls (CUDA, AVX512-BF16/AMX CPUs),
    # else the target's dtype.
    draft_dtype: DraftDtype = "auto"
    # prompt lookup beside FlexDraft (ours; 0 = off): a request whose last n
    # tokens (prompt_lookup_min <= n <= prompt_lookup_max) occurred earlier in
    # its prompt or output takes the tokens that followed them as drafts
    # instead of the mask block's (vllm_integration/lookup.py). On by default
    # (vLLM ngram's range, 2-4): in every interleaved sweep on the 2-core CPU
    # flex + lookup ran 1.48-1.66x plain at batch 1 against flex's 1.31-1.39x,
    # 1.40-1.61x at batch 2 against 1.22-1.36x, and from batch 8 on between 8%
    # below and 8% above flex alone; the flex policy verifies a lookup draft
    # only while its measured acceptance pays for its verify row.
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2

    RUNTIME_FIELDS = ("mode", "verify_rule", "tau", "min_confidence", "max_verify", "max_parallel_groups", "draft_dtype",
                      "prompt_lookup_max", "prompt_lookup_min")

    def __post_init__(self) -> None:
        def bad(msg: str) -> None:
            raise FlexDraftConfigError(f"invalid FlexDraft config: {msg}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        for name in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "split_layer", "block_size", "calib_rank",
                     "draft_vocab_size"):
            if not is_int(getattr(self, name)):
                bad(f"{name}={getattr(self, name)!r} must be an integer")
        for name in ("max_verify", "max_parallel_groups"):
            if getattr(self, name) is not None and not is_int(getattr(self, name)):
                bad(f"{name}={getattr(self, name)!r} must be an integer or null")
        for name in ("tau", "min_confidence"):
            if not (is_int(getattr(self, name)) or isinstance(getattr(self, name), float)):
                bad(f"{name}={getattr(self, name)!r} must be a number")

        if not 0 < self.split_layer < self.num_hidden_layers:
            bad(f"split_layer={self.split_layer} must be in [1, {self.num_hidden_layers - 1}]")
        if self.block_size < 2:
            bad(f"block_size={self.block_size} must be >= 2 (one bonus slot + at least one draft)")
        if self.mode not in ("flex", "parallel", "sequential", "off"):
            bad(f"mode={self.mode!r}: use one of flex, parallel, sequential, off")
        if self.verify_rule not in ("cumprod", "min"):
            bad(f"verify_rule={self.verify_rule!r}: use cumprod or min")
        if not 0.0 <= self.tau <= 1.0:
            bad(f"tau={self.tau} must be in [0, 1]")
        if not 0.0 <= self.min_confidence <= 1.0:
            bad(f"min_confidence={self.min_confidence} must be in [0, 1]")
        if self.max_verify is not None and not 1 <= self.max_verify <= self.block_size - 1:
            bad(f"max_verify={self.max_verify} must be in [1, block_size-1={self.block_size - 1}]")
        if self.max_parallel_groups is not None and self.max_parallel_groups < 1:
            bad(f"max_parallel_groups={self.max_parallel_groups} must be >= 1")
        if self.draft_dtype not in ("auto", "float32", "bfloat16", "float16"):
            bad(f"draft_dtype={self.draft_dtype!r}: use auto, float32, bfloat16 or float16")
        for name in ("prompt_lookup_max", "prompt_lookup_min"):
            if not is_int(getattr(self, name)):
                bad(f"{name}={getattr(self, name)!r} must be an integer")
        if self.prompt_lookup_min < 1:
            bad(f"prompt_lookup_min={self.prompt_lookup_min} must be >= 1")
        if self.prompt_lookup_max and self.prompt_lookup_max < self.prompt_lookup_min:
            bad(f"prompt_lookup_max={self.prompt_lookup_max} must be 0 (off) or >= "
                f"prompt_lookup_min={self.prompt_lookup_min}")
        if self.calibrator not in ("tied", "full"):
            bad(f"calibrator={self.calibrator!r}: use tied or full")
        if self.calib_anchor not in ("bonus", "chain"):
            bad(f"calib_anchor={self.calib_anchor!r}: use bonus or chain")
        if not isinstance(self.bonus_in_block, bool):
            bad(f"bonus_in_block={self.bonus_in_block!r} must be true or false")
        if not 0 <= self.draft_vocab_size <= self.vocab_size:
            bad(f"draft_vocab_size={self.draft_vocab_size} must be in [0 (full vocabulary), vocab_size={self.vocab_size}]")

    # ---- derived -------------------------------------------------------------
    @property
    def num_drafts(self) -> int:
        """Most drafts one block can propose."""
        return self.block_size - 1 if self.max_verify is None else self.max_verify

    def block_for(self, max_drafts: int) -> int:
        """Masks per block for a step that verifies at most max_drafts drafts."""
        return trimmed_block(self.block_size, max_drafts)

    @property
    def deep_layers(self) -> range:
        return range(self.split_layer, self.num_hidden_layers)

    # ---- (de)serialisation ---------------------------------------------------
    def weights_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for k in self.RUNTIME_FIELDS:
            d.pop(k)
        return d

    def with_runtime(self, overrides: dict[str, Any] | None) -> "FlexDraftConfig":
        if not overrides:
            return self
        unknown = set(overrides) - set(self.RUNTIME_FIELDS)
        if unknown:
            fixed = sorted(unknown & {f.name for f in dataclasses.fields(self)})
            hint = f" ({', '.join(fixed)} describe the trained weights and come from the checkpoint)" if fixed else ""
            raise FlexDraftConfigError(
                f"unknown FlexDraft runtime option(s) {sorted(unknown)}{hint}; "
                f"allowed: {list(self.RUNTIME_FIELDS)}"
            )
        return dataclasses.replace(self, **overrides)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "FlexDraftConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise FlexDraftConfigError(f"unknown keys {sorted(unknown)} in {CONFIG_KEY}")
        if d.get("format_version", FORMAT_VERSION) != FORMAT_VERSION:
            raise FlexDraftConfigError(
                f"checkpoint format_version {d.get('format_version')} is not supported by this "
                f"flexdraft-vllm (expects {FORMAT_VERSION}); retrain or upgrade flexdraft-vllm"
            )
        try:
            return cls(**d)
        except TypeError as e:
            raise FlexDraftConfigError(f"{CONFIG_KEY} is incomplete: {e}") from None

    @classmethod
    def from_checkpoint(cls, path: str | Path, runtime: dict[str, Any] | None = None) -> "FlexDraftConfig":
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise FlexDraftConfigError(
                f"no FlexDraft drafter at {path} (missing config.json). Point the drafter path at a "
                f"folder made by `python -m flexdraft_vllm.training.train`, or use the bundled one "
                f"(flexdraft_vllm/drafters/)."
            )
        raw = json.loads(cfg_file.read_text())
        if CONFIG_KEY not in raw:
            raise FlexDraftConfigError(f"{cfg_file} has no '{CONFIG_KEY}' block: not a FlexDraft drafter checkpoint")
        return cls.from_dict(raw[CONFIG_KEY]).with_runtime(runtime)

    @classmethod
    def for_target(cls, target_cfg: Any, *, split_layer: int, block_size: int, target_model_id: str = "",
                   target_fingerprint: str = "", **kw: Any) -> "FlexDraftConfig":
        """Build from an HF PretrainedConfig of the target."""
        heads = target_cfg.num_attention_heads
        return cls(
            target_model_id=target_model_id,
            target_fingerprint=target_fingerprint,
            target_architecture=(target_cfg.architectures or ["?"])[0],
            num_hidden_layers=target_cfg.num_hidden_layers,
            hidden_size=target_cfg.hidden_size,
            vocab_size=target_cfg.vocab_size,
            num_attention_heads=heads,
            num_key_value_heads=getattr(target_cfg, "num_key_value_heads", None) or heads,
            head_dim=getattr(target_cfg, "head_dim", None) or target_cfg.hidden_size // heads,
            split_layer=split_layer,
            block_size=block_size,
            **kw,
        )

    def check_target(self, target_cfg: Any, target_fingerprint: str | None = None) -> None:
        """Fail with a clear message when this drafter was trained for another target."""
        # split_layer=1: only the target's shapes are compared; the drafter's own split
        # layer need not fit a (mismatched) shallower target
        mine = FlexDraftConfig.for_target(target_cfg, split_layer=1, block_size=self.block_size)
        fields = ["target_architecture", "num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                  "num_key_value_heads", "head_dim"]
        diffs = [f"{f}: drafter {getattr(self, f)} vs target {getattr(mine, f)}" for f in fields
                 if getattr(self, f) != getattr(mine, f) and not (f == "target_architecture" and "?" in (getattr(self, f), getattr(mine, f)))]
        if diffs:
            raise FlexDraftConfigError(
                f"drafter was trained for {self.target_model_id or 'another model'} and does not fit this target ("
                + "; ".join(diffs) + "). Train a drafter for this target with `python -m flexdraft_vllm.training.train`."
            )
        if target_fingerprint and self.target_fingerprint and target_fingerprint != self.target_fingerprint:
            raise FlexDraftConfigError(
                f"drafter was trained for target weights {self.target_fingerprint} "
                f"({self.target_model_id}) but this target's weights are {target_fingerprint}. "
                f"Same shapes, different weights: drafts would be poor. Retrain for this target "
                f"with `python -m flexdraft_vllm.training.train --target <model dir>`."
            )
