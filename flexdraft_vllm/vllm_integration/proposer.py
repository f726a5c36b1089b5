"""FlexDraftProposer: FlexDraft as a vLLM 0.32 speculative proposer.

vLLM loads it through `speculative_config={"model": "flexdraft_vllm.FlexDraft",
"num_speculative_tokens": K}` (method "custom_class"). Terms per step and request:

  bonus      the token vLLM just sampled for the request (accepted drafts +
             recovered/bonus token are already in its output); not yet in the
             KV cache; it sits at position ctx = num_tokens_no_spec - 1.
  draft pass one block of B masks at positions ctx .. ctx+B-1 through the deep
             layers only, attending to the request's paged KV cache [0, ctx)
             (which now holds exactly the accepted tokens) plus its own block.
             Slot 0 is the bonus slot; slots 1..B-1 give drafts, calibrated
             with the bonus. This is parallel mode's group `a` computed after
             verification instead of speculatively before it.
  drafts     argmax of the calibrated logits, trimmed by confidence
             (verify_length). vLLM verifies drafts as one-hot proposals, which
             is lossless for any draft choice; argmax maximises acceptance.

Invariants: the target's weights and real-token K/V are only read; mask K/V
live in temporaries; a request gets no drafts when its prefill is unfinished,
when the policy says "off", or when drafts would pass max_model_len.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch

from flexdraft_vllm.config import FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.attention import batched_block_attention
from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_kernels.rejection_sampler import calibrated_drafts
from flexdraft_vllm.vllm_integration import paged_kv
from flexdraft_vllm.vllm_integration.policy import FlexPolicy
from flexdraft_vllm.vllm_integration.options import check_vllm_config

# a child of "vllm" so vLLM's logging config (handler, level, VLLM_LOGGING_LEVEL) applies
logger = logging.getLogger("vllm.flexdraft")


class FlexDraftProposer:
    def __init__(self, vllm_config):
        from flexdraft_vllm.version_check import check_vllm_version

        check_vllm_version()
        from flexdraft_vllm.vllm_integration import patches

        patches.apply()  # the runner hook; idempotent (normally done by register())
        self.vllm_config = vllm_config
        model_cfg = vllm_config.model_config
        opts = check_vllm_config(vllm_config)
        self.config: FlexDraftConfig = opts.config
        self.drafter_path: Path = opts.drafter_path
        spec = vllm_config.speculative_config
        self.max_drafts = min(self.config.num_drafts, spec.num_speculative_tokens)
        self.max_model_len = model_cfg.max_model_len
        self.policy = FlexPolicy(mode=self.config.mode)
        # FLEXDRAFT_RECORD_DRAFTS=N keeps the first N (prefix, drafts, confidences)
        # for tests that check the paged draft pass against the reference.
        self.record_limit = int(os.environ.get("FLEXDRAFT_RECORD_DRAFTS", "0"))
        self.records: list[dict] = []
        self.drafter: FlexDraftDrafter | None = None
        self.view = None
        self.draft_seconds = 0.0
        self._log_at = time.monotonic() + 30.0

    # ---- vLLM hooks ---------------------------------------------------------------
    def load_model(self, target_model: torch.nn.Module) -> None:
        from safetensors.torch import load_file

        from flexdraft_vllm.reference.drafter import WEIGHTS_FILE
        from flexdraft_vllm.vllm_integration.target_view import VllmTargetView

        self.view = VllmTargetView(target_model)
        drafter = FlexDraftDrafter(self.config, self.view)
        sd = load_file(str(self.drafter_path / WEIGHTS_FILE))
        missing, unexpected = drafter.load_state_dict({k: v.to(self.view.dtype) for k, v in sd.items()}, strict=False)
        if missing or unexpected:
            raise FlexDraftConfigError(
                f"drafter checkpoint {self.drafter_path} does not fit this target "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): retrain it for this model"
            )
        self.drafter = drafter.to(device=self.view.device, dtype=self.view.dtype).eval()
        logger.info("FlexDraft drafter loaded from %s (split layer %d, block %d, mode %s)",
                    self.drafter_path, self.config.split_layer, self.config.block_size, self.config.mode)

    def propose(self, *args, **kwargs):
        raise RuntimeError(
            "FlexDraft's model-runner hook is not installed in this process, so drafts cannot be "
            "computed. The flexdraft_vllm plugin must be loaded by vLLM (pip install flexdraft-vllm "
            "registers it; check VLLM_PLUGINS does not exclude 'flexdraft')."
        )

    # ---- the draft pass ------------------------------------------------------------
    @torch.inference_mode()
    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]], block_table: torch.Tensor) -> list[list[int]]:
        """Called by the patched runner after sampling; returns drafts per request."""
        n_req = len(sampled_token_ids)
        self.policy.observe(sum(len(s) for s in sampled_token_ids))
        drafts: list[list[int]] = [[] for _ in range(n_req)]
        live = [i for i, s in enumerate(sampled_token_ids) if s]
        if not live or self.drafter is None or self.policy.decide(len(live)) == "off":
            return drafts
        t0 = time.perf_counter()
        ntok = runner.input_batch.num_tokens_no_spec
        B = self.config.block_size
        # room for drafts: positions up to max_model_len - 1 (the bonus sits at ctx)
        rows = [(i, int(ntok[i]) - 1) for i in live if int(ntok[i]) + 1 < self.max_model_len]
        if rows:
            idx = torch.tensor([i for i, _ in rows], device=self.view.device)
            ctx = torch.tensor([c for _, c in rows], device=self.view.device)
            bonus = torch.tensor([sampled_token_ids[i][-1] for i, _ in rows], device=self.view.device)
            normed = self.drafter.draft_hidden(self.view, ctx, lambda l: self._attend(l, block_table, idx, ctx))
            logits = self.drafter.draft_logits(self.view, normed[:, 1 : 1 + self.max_drafts],
                                               bonus[:, None].expand(-1, min(B - 1, self.max_drafts)))
            # argmax drafts, their confidences and the verify length (Triton on CUDA)
            cd = calibrated_drafts(logits, None, self.config.verify_rule, self.config.tau,
                                   self.config.min_confidence, max_len=self.max_drafts)
            conf, ids, n = cd.conf, cd.argmax_ids, cd.num_drafts  # [N, K], [N, K], [N]
            ids, n = ids.tolist(), n.tolist()
            if len(self.records) < self.record_limit:
                self._record(runner, rows, ids, conf, n)
            for r, (i, c) in enumerate(rows):
                room = self.max_model_len - (c + 1) - 1
                drafts[i] = ids[r][: max(0, min(n[r], room))]
        self.draft_seconds += time.perf_counter() - t0
        self._maybe_log()
        return drafts

    def _record(self, runner, rows, ids, conf, n) -> None:
        tok = runner.input_batch.token_ids_cpu
        for r, (i, c) in enumerate(rows):
            if len(self.records) >= self.record_limit:
                return
            self.records.append({"prefix": tok[i, : c + 1].tolist(), "ids": ids[r], "conf": conf[r].tolist(), "n": n[r]})

    def _attend(self, layer_idx: int, block_table: torch.Tensor, idx: torch.Tensor, ctx: torch.Tensor):
        kv_cache = self.view.kv_cache(layer_idx)
        scale = self.view.scale
        max_ctx = int(ctx.max())

        def attend(q, k, v):  # [N, B, H, D]: one block per request
            if kv_cache.is_cuda:
                from flexdraft_kernels.mask_attention import mask_attention_for_blocks

                return mask_attention_for_blocks(q, k, v, kv_cache, block_table, idx, ctx, scale, max_ctx_len=max_ctx)
            if kv_cache.dim() == 4:  # CPU_ATTN layout: one batched gather + attention
                kc, vc = paged_kv.gather_batch_cpu_layout(kv_cache, block_table[idx], max_ctx, self._cpu_perms(kv_cache))
                return batched_block_attention(q, k, v, kc, vc, ctx, scale)
            raise NotImplementedError(
                f"FlexDraft cannot read this CPU KV-cache layout {tuple(kv_cache.shape)}; supported: CPU_ATTN "
                f"[num_blocks, Hkv, block_size, 2*D] (unquantized)")

        return attend

    def _cpu_perms(self, kv_cache: torch.Tensor):
        """vLLM's CPU attention packs K (and V) per block in an ISA-specific order; learn it once."""
        if getattr(self, "_perms", None) is None:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
            isa = _get_attn_isa(kv_cache.dtype, bs, d, self.vllm_config.cache_config.cache_dtype)
            self._perms = paged_kv.cpu_block_permutations(isa, bs, d, kv_cache.dtype)
        return self._perms

    def _maybe_log(self) -> None:
        if time.monotonic() < self._log_at:
            return
        self._log_at = time.monotonic() + 30.0
        logger.info("FlexDraft: policy %s, draft pass %.1f s total", self.policy.summary(), self.draft_seconds)
