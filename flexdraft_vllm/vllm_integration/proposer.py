"""FlexDraftProposer: FlexDraft as a vLLM 0.32 speculative proposer.

vLLM loads it through `speculative_config={"model": "flexdraft_vllm.FlexDraft",
"num_speculative_tokens": K}` (method "custom_class"). Terms per step and request:

  bonus      the token vLLM just sampled for the request (accepted drafts +
             recovered/bonus token are already in its output); not yet in the
             KV cache; it sits at position ctx = num_tokens_no_spec - 1.
  draft pass one block of B masks at positions ctx .. ctx+B-1 through the deep
             layers only, attending to the request's paged KV cache [0, ctx)
             (which now holds exactly the accepted tokens) plus its own block.
             B = the step's verify cap + 1, at most the drafter's block_size
             (config.trimmed_block): masks past the last verified draft are
             never read.
             Slot 0 is the bonus slot; slots 1..B-1 give drafts, calibrated
             with the bonus (calib_anchor="chain": slot k with draft k-1).
             This is parallel mode's group `a` computed after verification
             instead of speculatively before it, so it can know the bonus: a
             bonus_in_block drafter starts the block from its embedding.
  parallel   the same blocks computed DURING the verify forward, one group
             per possible outcome (parallel.py); after sampling, the group of
             the actual outcome is picked. Used when the policy chose
             "parallel" for this step and the model runs eagerly.
  drafts     argmax of the calibrated logits, trimmed by confidence
             (verify_length). vLLM verifies drafts as one-hot proposals, which
             is lossless for any draft choice; argmax maximises acceptance.

Invariants: the target's weights and real-token K/V are only read; mask K/V
live in temporaries; a request gets no drafts when its prefill is unfinished,
when the policy says "off" (prompt-lookup drafts aside, when enabled), or when
drafts would pass max_model_len.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from flexdraft_vllm.config import FlexDraftConfig, FlexDraftConfigError
from flexdraft_vllm.reference.confidence import VerifyCut
from flexdraft_vllm.reference.drafter import FlexDraftDrafter
from flexdraft_kernels.rejection_sampler import calibrated_drafts
from flexdraft_vllm.vllm_integration import cost_model, cpu_gemm, lookup, paged_kv
from flexdraft_vllm.vllm_integration.draft_view import DraftPrecisionView, resolve_draft_dtype
from flexdraft_vllm.vllm_integration.options import check_vllm_config, runs_eagerly
from flexdraft_vllm.vllm_integration.parallel import MaskStream, pick_groups, plan_groups
from flexdraft_vllm.vllm_integration.policy import FlexPolicy, probe_sample

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
        # parallel mode runs Python hooks inside the model forward: eager only
        self.parallel_ok = runs_eagerly(vllm_config)
        self.policy: FlexPolicy | None = None  # made in load_model (flex measures its cost model there)
        self._scheduled: dict[str, int] = {}  # drafts the running step verifies, per request id
        self._looked_up: set[str] = set()  # requests whose drafts for the running step came from prompt lookup
        # the policy's step cost: busy time of the running step (from begin_step) plus the
        # draft pass after the previous decision; NaN for steps that carry prefill chunks
        self._step_t0: float | None = None
        self._decode_only = False
        self._draft_s = 0.0
        # masks per block of the coming step's parallel stream (its verify cap + 1); None: the
        # policy did not choose "parallel" for it
        self._parallel_block: int | None = None
        self._pending = None  # (runner, scheduler_output, block) of a step that will carry mask groups
        self._building: MaskStream | None = None  # mask groups inside the running forward
        self._stream: MaskStream | None = None  # the finished step's mask groups
        self.parallel_blocks = 0  # groups computed in verify forwards (observability)
        self.lookup_requests = 0  # request-steps drafted by prompt lookup (observability)
        self._probes = 0  # probes that drafted for a sample of the batch (moves the sample)
        # FLEXDRAFT_RECORD_DRAFTS=N:FILE appends the first N (prefix, drafts,
        # confidences) to FILE as JSON lines, for tests that check the paged draft
        # pass against the reference (a file, not an RPC: it works however the
        # engine's processes are arranged).
        limit, _, self.record_file = os.environ.get("FLEXDRAFT_RECORD_DRAFTS", "0:").partition(":")
        self.record_limit = int(limit) if self.record_file else 0
        self.num_records = 0
        # FLEXDRAFT_STEP_TRACE=FILE appends one JSON line per engine step (requests, tokens,
        # the step's measured seconds, the policy's decision): what the policy saw, for
        # diagnosing its choices in a running server
        self.trace_file = os.environ.get("FLEXDRAFT_STEP_TRACE") or None
        self.drafter: FlexDraftDrafter | None = None
        self.view = None  # the target as vLLM built it (real rows, KV cache, hooks)
        self.mask_view = None  # what the mask path reads: the view, or its copy in draft_dtype
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
        missing, unexpected = drafter.load_state_dict(drafter.cast_weights(sd, self.view.dtype), strict=False)
        if missing or unexpected:
            raise FlexDraftConfigError(
                f"drafter checkpoint {self.drafter_path} does not fit this target "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]}): retrain it for this model"
            )
        dtype = resolve_draft_dtype(self.config, self.view.dtype, self.view.device)
        self.drafter = drafter.to(device=self.view.device, dtype=dtype).eval()
        # CPU: the mask path's linears through vLLM's prepacked oneDNN GEMM (cpu_gemm.py)
        packed = cpu_gemm.available(self.view.device, dtype)
        self.mask_view = (self.view if dtype == self.view.dtype
                          else DraftPrecisionView(self.view, self.config.deep_layers, dtype, packed=packed))
        if packed:
            cpu_gemm.pack_linears(self.drafter)  # tuned projectors, calibrator
            if self.mask_view is not self.view:
                self.mask_view.fuse_qkv(self.drafter.mask_attn)
            self.drafter.head_matmul = cpu_gemm.PackedLinear(self.drafter.head_weight(self.mask_view))
        if self.parallel_ok:
            for l in self.config.deep_layers:  # hooks on this engine's module instances
                self.view.layers[l].register_forward_hook(self._hook_for(l))
        self.policy = self._make_policy()
        logger.info("FlexDraft drafter loaded from %s (split layer %d, block %d, mode %s, drafts in %s)",
                    self.drafter_path, self.config.split_layer, self.config.block_size, self.config.mode,
                    str(dtype).removeprefix("torch."))

    def _make_policy(self) -> FlexPolicy:
        cost = None
        if self.config.mode == "flex":
            layer = self.view.layers[self.config.split_layer]
            attn = layer.self_attn

            def layer_work(x):  # the target's weight work per row: qkv, o, MLP
                qkv, _ = attn.qkv_proj(x)
                attn.o_proj(qkv[:, : attn.q_size].contiguous())
                layer.mlp(x)

            head_w = self.view.lm_head_weight
            draft_w = self.drafter.head_weight(self.mask_view)  # its draft-vocabulary slice, or all of it
            draft_head = self.drafter.head_matmul or (lambda x: torch.nn.functional.linear(x, draft_w))
            mv, proj, dtype = self.mask_view, self.drafter.mask_attn[0], self.drafter.mask_embedding.dtype
            mask_layer = mv.layers[self.config.split_layer]

            def mask_layer_work(x):  # a mask row's weight work: its projectors, the shared MLP
                x = x.to(dtype)
                proj.k_proj(x), proj.v_proj(x), proj.o_proj(proj.q_proj(x))
                mv.mlp_block(mask_layer, x)

            t0 = time.perf_counter()
            cost = cost_model.measure(layer_work, lambda x: torch.nn.functional.linear(x, head_w),
                                      self.view.cfg.hidden_size, num_layers=self.view.num_layers,
                                      num_deep=len(self.config.deep_layers), block_size=self.config.block_size,
                                      device=self.view.device, dtype=self.view.dtype,
                                      draft_head_work=lambda x: draft_head(x.to(dtype)),
                                      mask_layer_work=mask_layer_work)
            logger.info("FlexDraft cost model measured in %.1f s: rows %s -> forward %s ms",
                        time.perf_counter() - t0, list(cost.rows),
                        [round(cost.forward_s(r) * 1e3, 2) for r in cost.rows])
        return FlexPolicy(mode=self.config.mode, max_drafts=self.max_drafts, cost=cost,
                          allow_parallel=self.parallel_ok, max_groups=self.config.max_parallel_groups)

    def propose(self, *args, **kwargs):
        raise RuntimeError(
            "FlexDraft's model-runner hook is not installed in this process, so drafts cannot be "
            "computed. The flexdraft_vllm plugin must be loaded by vLLM (pip install flexdraft-vllm "
            "registers it; check VLLM_PLUGINS does not exclude 'flexdraft')."
        )

    # ---- parallel mode: mask groups inside the verify forward -------------------------
    def begin_step(self, runner, scheduler_output) -> None:
        """Called by the patched runner before a step's forward (patches.py entry 5)."""
        self._stream = self._building = None  # nothing survives from an earlier (maybe failed) step
        self._step_t0 = time.perf_counter()
        spec = scheduler_output.scheduled_spec_decode_tokens
        self._scheduled = {r: len(t) for r, t in spec.items()}
        # decode-only: every request runs its bonus + drafts, nothing from a prompt
        self._decode_only = all(n == 1 + self._scheduled.get(r, 0)
                                for r, n in scheduler_output.num_scheduled_tokens.items())
        self._pending = ((runner, scheduler_output, self._parallel_block)
                         if self._parallel_block is not None and self.drafter is not None else None)

    def _hook_for(self, layer_idx: int):
        first, last = self.config.split_layer, self.config.deep_layers[-1]

        def hook(module, args, output):
            if layer_idx == first and self._pending is not None:
                self._building = self._start_stream(*self._pending)
                self._pending = None
            st = self._building
            if st is None:
                return None
            # the real rows of this layer have written their K/V: candidates 0..g are visible to group g
            st.h = self.drafter.mask_layer(self.mask_view, layer_idx, st.h, st.positions,
                                           st.attend_for(layer_idx))
            if layer_idx == last:
                st.normed = self.mask_view.final_hidden(st.h)
                self._stream, self._building = st, None
                self.parallel_blocks += st.plan.num_blocks
            return None

        return hook

    def _start_stream(self, runner, so, block: int) -> MaskStream | None:
        ib = runner.input_batch
        R = ib.num_reqs
        req_ids = ib.req_ids[:R]
        plan = plan_groups(
            ib.num_computed_tokens_cpu[:R],
            np.array([so.num_scheduled_tokens.get(r, 0) for r in req_ids]),
            np.array([len(so.scheduled_spec_decode_tokens.get(r, ())) for r in req_ids]),
            ib.num_prompt_tokens[:R],
            self.max_model_len,
            self.config.max_parallel_groups,
        )
        if plan is None:
            return None
        bt = ib.block_table[0].get_device_tensor(R)
        stream = MaskStream(plan, bt, self.drafter.mask_embedding, block)
        stream.attend_for = self._attention(bt, stream.rows, stream.ctx, block)
        return stream

    # ---- drafts after sampling ---------------------------------------------------------
    @torch.inference_mode()
    def propose_for_runner(self, runner, sampled_token_ids: list[list[int]], block_table: torch.Tensor) -> list[list[int]]:
        """Called by the patched runner after sampling; returns drafts per request."""
        n_req = len(sampled_token_ids)
        req_ids = runner.input_batch.req_ids
        live = [i for i, s in enumerate(sampled_token_ids) if s]
        stream, self._stream = self._stream, None
        drafts: list[list[int]] = [[] for _ in range(n_req)]
        if self.policy is None:  # no drafter loaded (dummy runs)
            return drafts
        # (drafts verified, drafts accepted, request id) per request that drafted, by
        # source: the policy's acceptance estimates
        outcomes, lookup_outcomes = [], []
        for i in live:
            rid = req_ids[i]
            if self._scheduled.get(rid, 0):
                o = (self._scheduled[rid], len(sampled_token_ids[i]) - 1, rid)
                (lookup_outcomes if rid in self._looked_up else outcomes).append(o)
        timed = self._decode_only and self._step_t0 is not None
        step_s = time.perf_counter() - self._step_t0 + self._draft_s if timed else math.nan
        self._draft_s = 0.0
        emitted = sum(len(s) for s in sampled_token_ids)
        self.policy.observe(emitted, outcomes, step_s, lookup_outcomes)
        dec = self.policy.decide(len(live), [req_ids[i] for i in live]) if live else None
        if self.trace_file:
            self._trace(len(live), emitted, outcomes, step_s, dec)
        self._parallel_block = (self.config.block_for(dec.max_drafts) if dec is not None and dec.arm == "parallel"
                                else None)
        self._looked_up = set()
        lookup_on = dec is not None and dec.lookup and self.config.prompt_lookup_max > 0
        if dec is None or (dec.arm == "off" and not lookup_on):
            return drafts
        t0 = time.perf_counter()
        ntok = runner.input_batch.num_tokens_no_spec
        looked = self._lookup(runner, live, ntok, drafts) if lookup_on else set()  # drafted by prompt lookup
        self._looked_up = {req_ids[i] for i in looked}
        if dec.arm == "off":
            self.policy.drafted(sum(len(d) for d in drafts), masked=0)
            self._draft_s = time.perf_counter() - t0
            return drafts
        max_len = min(self.max_drafts, dec.max_drafts)
        K = self.config.block_for(max_len) - 1  # draft slots read per block
        # parallel: the group of the actual outcome; its slot 0 must sit on the new bonus
        par_rows, par_groups = ([], []) if stream is None or stream.normed is None else pick_groups(stream.plan, sampled_token_ids)
        group_ctx = stream.plan.group_ctx.reshape(-1) if par_rows else None  # host copy: no device sync per row
        keep = [j for j, (i, g) in enumerate(zip(par_rows, par_groups))
                if int(group_ctx[g]) == int(ntok[i]) - 1 and i not in looked]
        par_rows, par_groups = [par_rows[j] for j in keep], [par_groups[j] for j in keep]
        if par_rows:  # blocks sized by the previous decision: one width for parallel and sequential rows
            K = min(K, stream.normed.shape[1] - 1)
        done = set(par_rows) | looked
        # room for drafts: positions up to max_model_len - 1 (the bonus sits at ctx)
        seq_rows = [i for i in live if i not in done and int(ntok[i]) + 1 < self.max_model_len]
        if dec.requests is not None:  # a probe at a large batch: a few requests, others in turn
            seq_rows = probe_sample(seq_rows, dec.requests, self._probes)
            self._probes += 1
        parts = []
        if par_rows:
            parts.append(stream.normed[torch.tensor(par_groups, device=self.view.device), 1 : 1 + K])
        if seq_rows:
            idx = torch.tensor(seq_rows, device=self.view.device)
            ctx = torch.tensor([int(ntok[i]) - 1 for i in seq_rows], device=self.view.device)
            # the bonus is sampled by now: a bonus_in_block drafter starts its blocks from it
            emb = (self.mask_view.embed(torch.tensor([sampled_token_ids[i][-1] for i in seq_rows], device=self.view.device))
                   if self.drafter.bonus_proj is not None else None)
            normed = self.drafter.draft_hidden(self.mask_view, ctx,
                                               self._attention(block_table, idx, ctx[:, None], K + 1), block=K + 1,
                                               bonus_emb=emb)
            parts.append(normed[:, 1 : 1 + K])
        rows = [(i, int(ntok[i]) - 1) for i in par_rows + seq_rows]
        if rows:
            bonus = torch.tensor([sampled_token_ids[i][-1] for i, _ in rows], device=self.view.device)
            cut = VerifyCut(self.config.verify_rule, self.config.tau, self.config.min_confidence, min(max_len, K))
            logits = self.drafter.block_logits(self.mask_view, torch.cat(parts), bonus, cut=cut)  # [N, K'<=K, K_vocab]
            # argmax drafts, their confidences and the verify length (Triton on CUDA)
            cd = calibrated_drafts(logits, None, self.config.verify_rule, self.config.tau,
                                   self.config.min_confidence, max_len=min(max_len, K))
            conf, ids, n = cd.conf, self.drafter.token_ids(cd.argmax_ids), cd.num_drafts  # [N, K], [N, K], [N]
            ids, n = ids.tolist(), n.tolist()
            if self.num_records < self.record_limit:
                self._record(runner, rows, ids, conf, n, [g % stream.plan.max_groups for g in par_groups] if par_rows else [],
                             stream.normed.shape[1] if par_rows else None, K + 1)
            for r, (i, c) in enumerate(rows):
                room = self.max_model_len - (c + 1) - 1
                drafts[i] = ids[r][: max(0, min(n[r], room))]
        # parallel: the next forward carries mask groups for every request
        self.policy.drafted(sum(len(d) for d in drafts), masked=len(live) if dec.arm == "parallel" else len(seq_rows))
        self._draft_s = time.perf_counter() - t0
        self.draft_seconds += self._draft_s
        self._maybe_log()
        return drafts

    def _lookup(self, runner, live: list[int], ntok, drafts: list[list[int]]) -> set[int]:
        """Prompt lookup (config.prompt_lookup_max > 0, lookup.py): fills drafts[i]
        for the live requests whose recent tokens occurred before, as many as the
        policy finds worth verifying for that request; returns them. Matched
        first with the full draft budget, then cut to the policy's cap: the k
        tokens after a match start the same whatever k, and only matched
        requests need a cap."""
        cfg = self.config
        tok, req_ids = runner.input_batch.token_ids_cpu, runner.input_batch.req_ids
        matched = {}
        for i in live:
            d = lookup.lookup_drafts(tok[i, : int(ntok[i])], cfg.prompt_lookup_min, cfg.prompt_lookup_max,
                                     self.max_drafts, self.max_model_len - 1)  # the last draft fits below max_model_len
            if len(d):
                matched[i] = d
        caps = self.policy.lookup_caps(len(live), [req_ids[i] for i in matched])
        found = set()
        for (i, d), cap in zip(matched.items(), caps):
            if cap > 0:
                drafts[i] = d[:cap].tolist()
                found.add(i)
        self.lookup_requests += len(found)
        return found

    def _trace(self, n_live: int, emitted: int, outcomes, step_s: float, dec) -> None:
        with open(self.trace_file, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "t": time.perf_counter(), "mode": self.config.mode,
                                "live": n_live, "tokens": emitted,
                                "verified": sum(o[0] for o in outcomes), "accepted": sum(o[1] for o in outcomes),
                                "step_s": None if math.isnan(step_s) else round(step_s, 5),
                                "arm": dec.arm if dec else None, "k": dec.max_drafts if dec else 0,
                                "probe": bool(dec and dec.probe),
                                "requests": dec.requests if dec else None}) + "\n")

    def _record(self, runner, rows, ids, conf, n, par_groups: list[int], par_block: int | None, seq_block: int) -> None:
        """rows: the parallel rows (their group index in par_groups) then the sequential ones."""
        tok = runner.input_batch.token_ids_cpu
        with open(self.record_file, "a") as f:
            for r, (i, c) in enumerate(rows):
                if self.num_records >= self.record_limit:
                    return
                f.write(json.dumps({"prefix": tok[i, : c + 1].tolist(), "ids": ids[r], "conf": conf[r].tolist(),
                                    "n": n[r], "block": par_block if r < len(par_groups) else seq_block,
                                    "path": "parallel" if r < len(par_groups) else "sequential",
                                    "group": par_groups[r] if r < len(par_groups) else None}) + "\n")
                self.num_records += 1

    def _attention(self, block_table: torch.Tensor, rows: torch.Tensor, ctx: torch.Tensor, block: int):
        """layer -> the attend callback of one pass's mask blocks, laid out [N, G]
        (rows [N] of the block table, ctx [N, G]); the drafter passes them flat as
        [N*G, B, ...]. What does not depend on the layer is computed here, once."""
        scale = self.view.scale
        N, G = ctx.shape
        max_ctx = int(ctx.max())
        if self.view.device.type == "cuda":
            from flexdraft_kernels.mask_attention import mask_attention_for_blocks

            block_rows, flat_ctx = rows.repeat_interleave(G), ctx.reshape(-1)

            def for_layer(layer_idx: int):
                kv_cache = self.view.kv_cache(layer_idx)
                c = kv_cache.dtype

                def attend(q, k, v):  # [N*G, B, H, D]
                    # the kernel reads each block's pages in place: no per-group copies; it
                    # computes in the cache's dtype (draft_dtype may differ from it)
                    return mask_attention_for_blocks(q.to(c), k.to(c), v.to(c), kv_cache, block_table, block_rows,
                                                     flat_ctx, scale, max_ctx_len=max_ctx).to(q.dtype)

                return attend

            return for_layer
        table = block_table[rows]  # CPU_ATTN layout: one gather per request, shared by its groups
        mask = paged_kv.CpuBlockMask(ctx, block, self.view.device)
        grouped = lambda t: t.view(N, G, *t.shape[1:])  # noqa: E731

        def for_layer(layer_idx: int):
            kv_cache = self.view.kv_cache(layer_idx)
            if kv_cache.dim() != 4:
                raise NotImplementedError(
                    f"FlexDraft cannot read this CPU KV-cache layout {tuple(kv_cache.shape)}; supported: CPU_ATTN "
                    f"[num_blocks, Hkv, block_size, 2*D] (unquantized)")

            def attend(q, k, v):  # [N*G, B, H, D]
                kc, vc = paged_kv.gather_batch_cpu_layout(kv_cache, table, max_ctx, self._cpu_perms(kv_cache))
                return mask.attend(grouped(q), grouped(k), grouped(v), kc, vc, scale).flatten(0, 1)

            return attend

        return for_layer

    def _cpu_perms(self, kv_cache: torch.Tensor):
        """vLLM's CPU attention packs K (and V) per block in an ISA-specific order; learn it once."""
        if getattr(self, "_perms", None) is None:
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

            bs, d = kv_cache.shape[2], kv_cache.shape[3] // 2
            isa = _get_attn_isa(kv_cache.dtype, bs, d, self.vllm_config.cache_config.cache_dtype)
            perms = paged_kv.cpu_block_permutations(isa, bs, d, kv_cache.dtype)
            self._perms = tuple(paged_kv.packing_kind(p, bs, d) for p in perms)  # views instead of gathers
        return self._perms

    def _maybe_log(self) -> None:
        if time.monotonic() < self._log_at:
            return
        self._log_at = time.monotonic() + 30.0
        logger.info("FlexDraft: policy %s, draft pass %.1f s total, %d mask groups in verify forwards, "
                    "%d request-steps drafted by prompt lookup",
                    self.policy.summary() if self.policy else None, self.draft_seconds, self.parallel_blocks,
                    self.lookup_requests)
